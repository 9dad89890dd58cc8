"""--method spo: Step-aware Preference Optimization (Liang et al. 2024, RockeyCoss/SPO), with NPO's two readings.

    python npo.py train --method spo --reward pickscore:/models/PickScore_v1 --prompts-file p.txt --out runs/spo
    python npo.py train --method spo ... --npo                                  # δ: every pair swapped (eq. 8)
    python npo.py train --method spo ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg, labels kept

Each micro-batch samples its prompts with DDIM (η_ddim = 1) and CFG (`rollout`). The first --spo-plain-steps steps
are plain sampling. At every later step, k = --spo-candidates candidates x_{t−1} are drawn from the one shared
x_t, each with its own noise; each candidate's x̂_0 (at the last step: the sample x_0 itself) is decoded and scored
at the candidate's own timestep, and the best and the worst candidates form a pair when their softmaxed scores
differ by more than the threshold (`pick_pairs`). One random candidate continues the chain. With
--spo-inner-steps N > 0 (SPO's num_inner_step, its SDXL setting 3) the candidates first run N more steps each along
its own chain, and the pair is every step of the best and the worst chain since they left x_t (`blocks`). The loss
(losses.spo_loss) compares each kept pair's step log-probability under θ with the reference's, the same UNet
and CFG with the trained offset off:

    r = clamp(p_θ(x_{t−1} | x_t) / p_ref(x_{t−1} | x_t), 1 − ε, 1 + ε)      L = −log σ(β (log r_w − log r_l))

averaged over the pairs (× their steps) kept on all ranks. The last step goes to ᾱ_0 (machinery.logprob_steps). NPO:
`--npo` swaps each pair (the worst candidate is preferred, the rule of eq. 8); `--train-branch uncond --lora ETA`
trains δ on the unconditional branch beside a frozen η with SPO's labels unchanged (the authors' RL-SPO-NPO). The
whole state of a run is its step, LoRA and optimizer: every random number of example i (its prompt, x_T, every
candidate's noise, the candidate that continues) comes from the generator of (seed, i), so a run resumes bit for bit
and W ranks train as one with W times the batch.

The scorer is --reward, scored on x̂_0. Ours are blind to the timestep; a reward that states `timestep_aware = True`
(rewards.takes_timesteps, as scorers' spm:PATH does) is called as `reward(images, prompts, timesteps=t)`, one
timestep per image.
"""
import dataclasses
from collections import Counter

import torch
import torch.distributed as dist

from . import data
from . import guided
from . import losses
from . import rewards
from . import sampler
from . import trainconfig
from .machinery import branch_weights, checkpoint_unet_blocks, draw_prompt, example_generator, logprob_steps
from .trainconfig import DTYPES

SHOWN = ("pairs", "reward", "ratio_w", "ratio_l")  # printed beside the loss (the log file has every metric)


def read_inputs(config, world_size):
    """The training prompts; the scorer is loaded and probed on them now, before the model loads."""
    prompts = data.read_prompts(config.prompts_file)
    scorer(config, prompts)
    return prompts


def describe(config, prompts):
    return (f"{len(prompts)} prompts, reward {config.reward}, {config.spo_candidates} candidates per step after "
            f"{config.spo_plain_steps} plain steps, {config.spo_inner_steps} inner steps, threshold "
            f"{config.spo_threshold:g} on softmax(scores × {config.spo_score_scale:g})")


def scorer(config, prompts):
    """SPO's preference model: --reward (mapped by --reward-range / --reward-sigmoid when given), checked at every
    call. Never 1 − R: SPO's NPO swaps the pairs instead (a swap is what ranking by 1 − R would give)."""
    return trainconfig.reward_objective(dataclasses.replace(config, npo=False), prompts)


def score(objective, images, prompts, timestep):
    """The scores (B,) of images decoded from latents at `timestep` (0: finished samples), float32."""
    t = torch.full((len(images),), int(timestep), dtype=torch.long, device=images.device)
    return rewards.score(objective, images, prompts, t).float()  # a reward blind to the timestep is called without it


def pick_pairs(scores, scale, threshold):
    """SPO's `preference_score_compare` on scores (B, k): the best and the worst of each example's k candidates,
    kept when p_best − p_worst > threshold with (p_best, p_worst) = softmax(scale · (s_best, s_worst)).

    A softmax of two is p_best − p_worst = tanh(scale · (s_best − s_worst) / 2), so a pair forms when the scores
    differ by more than 2·atanh(threshold) / scale: 0.62 / scale at SPO's 0.3 (0.85 / scale at SDXL's 0.4). SPO's
    preference model outputs CLIP logits (100·cos), for which scale 1 is SPO's rule. Returns (best, worst, kept),
    each (B,); a tie (all k equal) is never kept."""
    best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
    rows = torch.arange(len(scores), device=scores.device)
    p = torch.stack([scores[rows, best], scores[rows, worst]]).mul(scale).softmax(dim=0)
    return best, worst, (p[0] - p[1]) > threshold


@dataclasses.dataclass
class Rollout:
    """One micro-batch's sampling: the kept pairs, one entry per trained step j as (j, rows, x_t, x_w, x_l) with `rows`
    the examples of the batch that kept a pair there and x_t (rows, 1 or 2, C, h, w) where the pair left from (1: one
    shared x_t, a branch step; 2: the winner's and the loser's own, an inner step); `kept` (B, blocks) bool; `scores`
    of the last block's candidates (B, k), the finished samples; the batch's (unconditional, conditional)
    conditioning."""
    pairs: list
    kept: torch.Tensor
    scores: torch.Tensor
    neg: dict
    pos: dict


def conditioning(pipe, prompts, resolution):
    """(unconditional, conditional) conditioning dicts of the prompts; SDXL's carry the pooled text and time ids."""
    pos = pipe.conditioning(prompts, pipe.time_ids(resolution, resolution))
    return pipe.negative_conditioning(None, pos), pos


def rows_of(cond, rows):
    return {k: v[rows] for k, v in cond.items()}


def blocks(config, n):
    """The first step of each block of candidate steps: a branch step, then --spo-inner-steps N steps on which every
    candidate goes on along its own chain, so a block is N + 1 steps from --spo-plain-steps on (the last may be
    shorter). A block that would start at the last step starts there (SPO's SD1.5 pipeline, and N = 0 is it exactly);
    SPO's SDXL pipeline instead runs the block before it one step longer (at its 20 steps, 4 plain, N = 3, the blocks
    end on the last step and the two agree)."""
    return list(range(config.spo_plain_steps, n, config.spo_inner_steps + 1))


@torch.no_grad()
def rollout(run, prompts, objective, steps, schedule, first):
    """Sample examples first, first + 1, … with SPO's candidates and pairs (see the module docstring). Per example
    its generator draws, in order: the prompt, x_T, z of each plain step, then per candidate step the k candidates'
    noises (one (k, C, h, w) draw), and at the end of each block the candidate that continues (randint(k))."""
    config, pipe, device, dtype = run.config, run.pipe, run.device, DTYPES[run.config.dtype]
    size, k = config.batch_size, config.spo_candidates
    gens = [example_generator(config.seed, first + j) for j in range(size)]
    chosen = [draw_prompt(prompts, g) for g in gens]
    x = sampler.initial_latents(gens, config.resolution, config.resolution, pipe.unet.config.in_channels, device,
                                torch.float32, pipe.vae.downscale)
    neg, pos = conditioning(pipe, chosen, config.resolution)
    one = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance, branch_weights(config, run.files, size, device))
    each = torch.arange(size, device=device).repeat_interleave(k)  # candidate rows, example-major: b·k + i
    many = guided.guided_denoiser(pipe.unet, rows_of(neg, each), rows_of(pos, each), config.guidance,
                                    branch_weights(config, run.files, size * k, device))
    eps = one(x.to(dtype), steps[0][0]).float()
    pairs, kept, block, starts = [], [], [], blocks(config, len(steps))
    for j, (t, a_t, a_prev) in enumerate(steps):
        last = j == len(steps) - 1
        if j < config.spo_plain_steps:
            mean, sigma = sampler.ddim_posterior(x, eps, a_t, a_prev, schedule, config.ddim_eta)
            x = mean + sigma * sampler.randn(x.shape, gens, device)
            eps = None if last else one(x.to(dtype), steps[j + 1][0]).float()
            continue
        if j in starts:  # a branch step: k draws of x_{t−1} from the one shared x_t
            x_t, eps_t = x[:, None], eps[:, None]
        else:  # an inner step: each candidate one step further along its own chain
            x_t, eps_t = xs, eps_all.view(xs.shape)
        mean, sigma = sampler.ddim_posterior(x_t, eps_t, a_t, a_prev, schedule, config.ddim_eta)
        z = torch.stack([torch.randn((k, *x.shape[1:]), generator=g) for g in gens]).to(device)
        xs = mean + sigma * z  # (B, k, C, h, w)
        block.append((j, x_t, xs))
        if not last:  # every candidate's ε̂ at the next step: its x̂_0 there, or its next inner step
            eps_all = many(xs.flatten(0, 1).to(dtype), steps[j + 1][0]).float()
        if last or j + 1 in starts:  # the block ends: score, pair, and go on from one random candidate
            following = None if last else (steps[j + 1], eps_all)
            scores, keep, block_pairs = close_block(run, objective, chosen, block, schedule, following)
            pairs += block_pairs
            kept.append(keep)
            pick = torch.cat([torch.randint(k, (1,), generator=g) for g in gens]).to(device)
            rows = torch.arange(size, device=device)
            x = xs[rows, pick]
            eps = None if last else eps_all.view(xs.shape)[rows, pick]
            block = []
    return Rollout(pairs, torch.stack(kept, dim=1), scores, neg, pos)


def close_block(run, objective, prompts, block, schedule, following):
    """Score the block's k candidates of each example, each on its x̂_0 at the following step (`following`: that
    step and the candidates' ε̂ there; None after the last step, where the candidates are the finished samples x_0,
    scored at timestep 0), and pick the pairs. Returns (scores (B, k), kept (B,), the entries of Rollout.pairs: one
    per step of the block, for the examples that kept a pair)."""
    xs = block[-1][2]
    size, k = xs.shape[:2]
    if following is None:
        x0, t_score = xs.flatten(0, 1), 0
    else:
        (t_score, a_next, _), eps_all = following
        x0 = x0_of(xs.flatten(0, 1), eps_all, a_next, schedule)
    scores = score(objective, decode(run.pipe, x0), [c for c in prompts for _ in range(k)], t_score).view(size, k)
    best, worst, keep = pick_pairs(scores, run.config.spo_score_scale, run.config.spo_threshold)
    rows = keep.nonzero().flatten()
    b, w = best[rows], worst[rows]
    pairs = []
    for i, x_t, x_next in block if len(rows) else ():
        starts = x_t[rows] if x_t.shape[1] == 1 else torch.stack([x_t[rows, b], x_t[rows, w]], dim=1)
        pairs.append((i, rows, starts, x_next[rows, b], x_next[rows, w]))
    return scores, keep, pairs


def x0_of(x, eps, a_t, schedule):
    """x̂_0 of x_t as the DDIM step computes it (clipped where the scheduler clips)."""
    x0, _ = sampler.predict_x0(x, eps, a_t, schedule.prediction_type)
    return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range) if schedule.clip_sample else x0


def decode(pipe, latents):
    """Latents → images in [0, 1] (B, 3, H, W), float32."""
    pixels = pipe.vae.decode(latents.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def micro_step(run, prompts):
    """One micro-step of SPO: sample the micro-batch with candidates, then SPO's loss over its kept pairs, backward.
    The loss is normalised by the pairs kept on all ranks in this micro-step, so that W ranks, whose gradients the
    loop averages, train exactly as one rank with W times the batch."""
    config, pipe, device = run.config, run.pipe, run.device
    schedule, steps = logprob_steps(pipe.ddim_config(), config.sample_steps)  # the last step to ᾱ_0
    objective = scorer(config, prompts)
    if config.gradient_checkpointing:
        checkpoint_unet_blocks(pipe.unet)

    def step(first, weight):
        r = rollout(run, prompts, objective, steps, schedule, first)
        total = torch.tensor(float(sum(len(rows) for _, rows, *_ in r.pairs)), device=device)  # pairs × their steps
        if run.world_size > 1:
            dist.all_reduce(total)
        totals = Counter()
        for j, rows, x, win, lose in r.pairs:
            if config.npo:  # eq. 8: the worst candidate is preferred
                win, lose = losses.swap_pairs(win, lose)
            per_pair, metrics = pair_losses(run, r, rows, steps[j], schedule, x, win, lose)
            share = run.world_size / total.item()  # the mean over all ranks' pairs, after the loop's average
            (per_pair.sum() * share * weight).backward()
            totals.update(loss=per_pair.sum().item() * share, **{k: v.item() * share for k, v in metrics.items()})
        for p in run.params:  # a rank (or micro-batch) without pairs still takes part in the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = r.kept.float().mean(0)  # the share of examples that kept a pair, per block (named by its first step)
        return dict(loss=totals["loss"], ratio_w=totals["ratio_w"], ratio_l=totals["ratio_l"],
                    pairs=r.kept.float().sum(1).mean().item(), reward=r.scores.mean().item(),
                    **{f"kept_{j:02d}": v.item() for j, v in zip(blocks(config, len(steps)), kept, strict=True)})
    return step


def pair_losses(run, r, rows, step, schedule, x_t, win, lose):
    """SPO's loss of the pairs kept at one step: (per-pair losses with grad, summed metrics). θ is the UNet with the
    trained offset(s) at their branch weights; the reference is the same CFG with them at 0. x_t (n, m, C, h, w):
    m = 1, the one x_t both candidates left (a branch step); m = 2, the winner's and the loser's (an inner step)."""
    config, pipe, device, dtype = run.config, run.pipe, run.device, DTYPES[run.config.dtype]
    t, a_t, a_prev = step
    m = x_t.shape[1]
    x = x_t.transpose(0, 1).flatten(0, 1)  # (m·n, C, h, w): the winners' x_t, then the losers' own
    rows = rows.repeat(m)
    neg, pos = rows_of(r.neg, rows), rows_of(r.pos, rows)
    weights = branch_weights(config, run.files, len(rows), device)
    reference = {**weights, **{role: 0.0 for role in run.files}}
    theta = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance, weights)
    ref = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance, reference)
    with torch.no_grad():
        ref_mean, sigma = sampler.ddim_posterior(x, ref(x.to(dtype), t).float(), a_t, a_prev, schedule, config.ddim_eta)
    mean, sigma = sampler.ddim_posterior(x, theta(x.to(dtype), t).float(), a_t, a_prev, schedule, config.ddim_eta)
    mean, ref_mean = mean.unflatten(0, (m, -1)), ref_mean.unflatten(0, (m, -1))  # [0]: the winners', [-1]: the losers'
    per_pair, ratio_w, ratio_l = losses.spo_loss(
        losses.step_log_prob(win, mean[0], sigma), losses.step_log_prob(lose, mean[-1], sigma),
        losses.step_log_prob(win, ref_mean[0], sigma), losses.step_log_prob(lose, ref_mean[-1], sigma),
        config.spo_beta, config.spo_clip)
    return per_pair, {"ratio_w": ratio_w.detach().sum(), "ratio_l": ratio_l.detach().sum()}
