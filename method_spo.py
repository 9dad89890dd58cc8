"""--method spo: Step-aware Preference Optimization (Liang et al. 2024, RockeyCoss/SPO), with NPO's two readings.

    python npo.py train --method spo --reward pickscore:/models/PickScore_v1 --prompts-file p.txt --out runs/spo
    python npo.py train --method spo ... --npo                                  # δ: every pair swapped (eq. 8)
    python npo.py train --method spo ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg, labels kept

Each micro-batch samples its prompts with DDIM (η_ddim = 1) and CFG (`rollout`). The first --spo-plain-steps steps
are plain sampling. At every later step, k = --spo-candidates candidates x_{t−1} are drawn from the one shared
x_t, each with its own noise; each candidate's x̂_0 (at the last step: the sample x_0 itself) is decoded and scored
at the candidate's own timestep, and the best and the worst candidates form a pair when their softmaxed scores
differ by more than the threshold (`pick_pairs`). One random candidate continues the chain. The loss
(losses.spo_loss) compares each kept pair's step log-probability under θ with the reference's, the same UNet
and CFG with the trained offset off:

    r = clamp(p_θ(x_{t−1} | x_t) / p_ref(x_{t−1} | x_t), 1 − ε, 1 + ε)      L = −log σ(β (log r_w − log r_l))

averaged over the pairs kept on all ranks. NPO: `--npo` swaps each pair (the worst candidate is preferred, the
rule of eq. 8); `--train-branch uncond --lora ETA` trains δ on the unconditional branch beside a frozen η with
SPO's labels unchanged (the authors' RL-SPO-NPO). The whole state of a run is its step, LoRA and optimizer: every
random number of example i (its prompt, x_T, every candidate's noise, the candidate that continues) comes from the
generator of (seed, i), so a run resumes bit for bit and W ranks train as one with W times the batch.

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
from .checkpoint import UserError
from .machinery import branch_weights, checkpoint_unet_blocks, draw_prompt, example_generator
from .trainconfig import DTYPES

SHOWN = ("pairs", "reward", "ratio_w", "ratio_l")  # printed beside the loss (the log file has every metric)


def read_inputs(config, world_size):
    """The training prompts; the scorer is loaded and probed on them now, before the model loads."""
    prompts = data.read_prompts(config.prompts_file)
    scorer(config, prompts)
    return prompts


def describe(config, prompts):
    return (f"{len(prompts)} prompts, reward {config.reward}, {config.spo_candidates} candidates per step after "
            f"{config.spo_plain_steps} plain steps, threshold {config.spo_threshold:g} on softmax(scores × "
            f"{config.spo_score_scale:g})")


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
    """One micro-batch's sampling: the kept pairs, grouped by candidate step j as (j, rows, x_t, x_w, x_l) with
    `rows` the examples of the batch that kept a pair at j; `kept` (B, candidate steps) bool; `scores` of the last
    step's candidates (B, k), the finished samples; the batch's (unconditional, conditional) conditioning."""
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


@torch.no_grad()
def rollout(run, prompts, objective, steps, schedule, first):
    """Sample examples first, first + 1, … with SPO's candidates and pairs (see the module docstring). Per example
    its generator draws, in order: the prompt, x_T, z of each plain step, then per candidate step the k candidates'
    noises (one (k, C, h, w) draw) and the candidate that continues (randint(k))."""
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
    pairs, kept, scores = [], [], None
    for j, (t, a_t, a_prev) in enumerate(steps):
        mean, sigma = sampler.ddim_posterior(x, eps, a_t, a_prev, schedule, config.ddim_eta)
        last = j == len(steps) - 1
        if j < config.spo_plain_steps:
            x = mean + sigma * sampler.randn(x.shape, gens, device)
            eps = None if last else one(x.to(dtype), steps[j + 1][0]).float()
            continue
        z = torch.stack([torch.randn((k, *x.shape[1:]), generator=g) for g in gens]).to(device)
        candidates = mean[:, None] + sigma * z  # (B, k, C, h, w): k draws of x_{t−1} from one x_t
        flat = candidates.flatten(0, 1)
        if last:  # the candidates are finished samples x_0, scored at t = 0
            x0, t_score = flat, 0
        else:  # x̂_0 of each candidate at its own timestep; the continuing one's ε̂ is the next step's
            t_score, a_next, _ = steps[j + 1]
            eps_all = many(flat.to(dtype), t_score).float()
            x0 = x0_of(flat, eps_all, a_next, schedule)
        scores = score(objective, decode(pipe, x0), [c for c in chosen for _ in range(k)], t_score).view(size, k)
        best, worst, keep = pick_pairs(scores, config.spo_score_scale, config.spo_threshold)
        rows = keep.nonzero().flatten()
        if len(rows):
            pairs.append((j, rows, x[rows], candidates[rows, best[rows]], candidates[rows, worst[rows]]))
        kept.append(keep)
        pick = torch.cat([torch.randint(k, (1,), generator=g) for g in gens]).to(device)
        x = candidates[torch.arange(size, device=device), pick]
        if not last:
            eps = eps_all.view(size, k, *eps_all.shape[1:])[torch.arange(size, device=device), pick]
    return Rollout(pairs, torch.stack(kept, dim=1), scores, neg, pos)


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
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, config.sample_steps)
    if any(a_prev == 1 for _, _, a_prev in steps):  # σ_t = 0: a deterministic step has no log-probability
        raise UserError("this model's last DDIM step is deterministic (set_alpha_to_one in its scheduler config), "
                        "so SPO cannot score it; train with a scheduler config whose set_alpha_to_one is false.")
    objective = scorer(config, prompts)
    if config.gradient_checkpointing:
        checkpoint_unet_blocks(pipe.unet)

    def step(first, weight):
        r = rollout(run, prompts, objective, steps, schedule, first)
        total = torch.tensor(float(r.kept.sum()), device=device)
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
        kept = r.kept.float().mean(0)  # the share of examples that kept a pair, per candidate step
        return dict(loss=totals["loss"], ratio_w=totals["ratio_w"], ratio_l=totals["ratio_l"],
                    pairs=r.kept.float().sum(1).mean().item(), reward=r.scores.mean().item(),
                    **{f"kept_{config.spo_plain_steps + i:02d}": v.item() for i, v in enumerate(kept)})
    return step


def pair_losses(run, r, rows, step, schedule, x, win, lose):
    """SPO's loss of the pairs kept at one step: (per-pair losses with grad, summed metrics). θ is the UNet with the
    trained offset(s) at their branch weights; the reference is the same CFG with them at 0."""
    config, pipe, device, dtype = run.config, run.pipe, run.device, DTYPES[run.config.dtype]
    t, a_t, a_prev = step
    neg, pos = rows_of(r.neg, rows), rows_of(r.pos, rows)
    weights = branch_weights(config, run.files, len(rows), device)
    reference = {**weights, **{role: 0.0 for role in run.files}}
    theta = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance, weights)
    ref = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance, reference)
    with torch.no_grad():
        ref_mean, sigma = sampler.ddim_posterior(x, ref(x.to(dtype), t).float(), a_t, a_prev, schedule, config.ddim_eta)
    mean, sigma = sampler.ddim_posterior(x, theta(x.to(dtype), t).float(), a_t, a_prev, schedule, config.ddim_eta)
    per_pair, ratio_w, ratio_l = losses.spo_loss(
        losses.step_log_prob(win, mean, sigma), losses.step_log_prob(lose, mean, sigma),
        losses.step_log_prob(win, ref_mean, sigma), losses.step_log_prob(lose, ref_mean, sigma),
        config.spo_beta, config.spo_clip)
    return per_pair, {"ratio_w": ratio_w.detach().sum(), "ratio_l": ratio_l.detach().sum()}

