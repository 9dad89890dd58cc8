"""`npo.py train --method spo`: SPO's pairing rule and loss by hand, one SPO step (candidates, pairs, LoRA gradients)
against the same step built from diffusers' DDIMScheduler, UNet, VAE and peft adapters, --npo's exactly opposite
first update, a reward without a gradient trained up (SPO) and down (NPO), δ on the unconditional branch, resume,
two ranks against one, and the bad-input contract."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors import safe_open

from npo import checkpoint
from npo import guided
from npo import lora
from npo import losses
from npo import machinery
from npo import method_spo
import npo
from npo import pipeline
from npo import rewards
from npo import sampler
from npo import trainconfig
from npo import trainflags
from conftest import ROOT, diffusers_reference, make_rl_sdxl_dir, make_sdxl_dir, one_thread, random_lora_files

WEIGHTS = os.path.join(ROOT, "weights")
# tiny model: 16 px images are 8x8 latents; 4 sampling steps, the first plain, then 3 with 3 candidates each
FAST = ["--method", "spo", "--resolution", "16", "--sample-steps", "4", "--spo-plain-steps", "1", "--spo-candidates",
        "3", "--guidance", "3", "--log-every", "1", "--device", "cpu", "--batch-size", "2"]
PROMPTS = ["a red circle", "a blue square"]
SCALE = 1e4  # the tiny model's candidates differ in brightness by 3e-5 to 1e-3: ×1e4 keeps some pairs, not all


@pytest.fixture(scope="module")
def lora_files(tiny_model, tmp_path_factory):
    """Random η and δ LoRA files (attention layers) with small non-zero up weights: θ ≠ the reference, yet the
    step ratios stay inside SPO's clamp."""
    return small_lora_files(tiny_model[0], str(tmp_path_factory.mktemp("spo_loras")), [("eta", {}), ("delta", {})],
                            seed=40)


def small_lora_files(model, folder, roles, seed):
    """random_lora_files with their up weights × 0.1."""
    from safetensors.torch import save_file
    files = random_lora_files(model, folder, roles, seed=seed)
    for name, path in files.items():
        tensors = checkpoint.read_safetensors(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        save_file({k: v * 0.1 if k.endswith("lora_up.weight") else v for k, v in tensors.items()}, path, meta)
    return files


def run(model, prompts_file, out, *flags):
    return npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(out), *FAST, *flags])


def logged(out):
    return [line for line in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in line]


def read_lora(path):
    return checkpoint.read_safetensors(str(path))


# ----------------------------------------------------------------------------------------------------------
# The pieces by hand.

def spo_compare(scores, threshold):
    """SPO's preference_score_compare, written from its code: scores (k, B) sorted descending, the first and last
    rows softmaxed, kept where their difference exceeds the threshold."""
    s, i = torch.sort(scores, dim=0, descending=True)
    p = s[[0, -1]].softmax(dim=0)
    return i[0], i[-1], p[0] - p[1] > threshold


def test_pairs_are_spos_rule_and_the_threshold_is_an_atanh():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 4, generator=g, dtype=torch.float64)
    for scale, threshold in ((1.0, 0.3), (0.5, 0.4), (3.0, 0.9)):
        best, worst, kept = method_spo.pick_pairs(scores, scale, threshold)
        ref_best, ref_worst, ref_kept = spo_compare((scale * scores).T, threshold)
        assert torch.equal(best, ref_best) and torch.equal(worst, ref_worst) and torch.equal(kept, ref_kept)
        assert 0 < kept.sum() < 64
        # a softmax of two: p_best − p_worst = tanh(scale·Δ/2), so the rule is Δ > 2·atanh(threshold) / scale
        gap = scores.max(1).values - scores.min(1).values
        assert torch.equal(kept, gap > 2 * math.atanh(threshold) / scale)
    assert 2 * math.atanh(0.3) == pytest.approx(0.619, abs=1e-3)
    # a reward in [0, 1] at scale 1 keeps a pair only when the candidates' scores differ by more than 0.62
    assert not method_spo.pick_pairs(torch.tensor([[0.2, 0.8]]), 1.0, 0.3)[2].item()
    assert method_spo.pick_pairs(torch.tensor([[0.1, 0.8]]), 1.0, 0.3)[2].item()
    # all k equal: best and worst coincide and nothing is kept, whatever the scale
    assert not method_spo.pick_pairs(torch.full((1, 4), 0.5), 1e9, 0.0)[2].item()


def test_spo_loss_by_hand():
    # log p − log p_ref = log 1.05 (w), log 0.8 (l; clamped to 0.9): L = −log σ(10 (log 1.05 − log 0.9))
    lp_w = torch.tensor([math.log(1.05), 0.3], dtype=torch.float64, requires_grad=True)
    lp_l = torch.tensor([math.log(0.8), 0.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    loss, r_w, r_l = losses.spo_loss(lp_w, lp_l, zero, torch.tensor([0.0, 0.3], dtype=torch.float64), 10.0, 0.1)
    z = 10 * (math.log(1.05) - math.log(0.9))
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-12)
    assert r_w.tolist() == pytest.approx([1.05, 1.1]) and r_l.tolist() == pytest.approx([0.9, 0.9])
    loss.sum().backward()
    # the clamped ratios pass no gradient: the loser of pair 0 (0.8 < 0.9), both of pair 1 (1.35 > 1.1, 0.74 < 0.9)
    assert lp_l.grad[0] == 0 and lp_w.grad[1] == 0 and lp_l.grad[1] == 0
    assert lp_w.grad[0].item() == pytest.approx(-10 / (1 + math.exp(z)), abs=1e-12)


def test_a_swapped_pair_negates_the_gradient_exactly_where_theta_is_the_reference():
    """dL/dd for d = log r_w − log r_l is −β σ(−β d) and, swapped, β σ(β d): opposite at d = 0 (θ = the reference,
    as at a run's first step), not elsewhere."""
    for d, opposite in ((0.0, True), (0.02, False)):
        lp = torch.tensor([d, 0.0], requires_grad=True)
        zero = torch.zeros(())
        (g_plain,) = torch.autograd.grad(losses.spo_loss(lp[0], lp[1], zero, zero, 10.0, 0.1)[0], lp)
        (g_swap,) = torch.autograd.grad(losses.spo_loss(lp[1], lp[0], zero, zero, 10.0, 0.1)[0], lp)
        assert torch.equal(g_swap, -g_plain) == opposite, (d, g_plain, g_swap)


# ----------------------------------------------------------------------------------------------------------
# One SPO step against the same step from diffusers' UNet (peft adapters), DDIMScheduler and VAE.

def our_spo_step(model, trained, frozen, prompts_file, tmp_path, flags):
    """The rollout of examples 0, 1 and one micro-step of `npo.py train --method spo` on the given offsets:
    (rollout, {(role, layer, part): grad} of the trained offsets)."""
    config = trainflags.parse_args(["--model", model, "--out", str(tmp_path / "unused"), *FAST, "--reward",
                                     "rewards:brightness", "--prompts-file", prompts_file, "--spo-score-scale",
                                     str(SCALE), *flags])
    trainconfig.check(config)
    pipe = pipeline.load_pipeline(model)
    for role, path in {**frozen, **trained}.items():
        lora.load_lora(pipe.unet, path, role)
    run = machinery.Run(config, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files={role: "x" for role in trained})
    run.params = [p.requires_grad_(True) for role in trained for p in lora.parameters(pipe.unet, role)]
    schedule, steps = machinery.logprob_steps(pipe.ddim_config(), config.sample_steps)
    states, posterior = [], sampler.ddim_posterior

    def recording_posterior(x, *args):  # the rollout's x_t at each of its steps, for reference_spo_step's teacher
        states.append(x.clone())
        return posterior(x, *args)
    with mock.patch.object(sampler, "ddim_posterior", recording_posterior):
        rollout = method_spo.rollout(run, PROMPTS, method_spo.scorer(config, PROMPTS), steps, schedule, 0)
    method_spo.micro_step(run, PROMPTS)(0, 1.0)
    assert all(p.grad is None for role in frozen for p in lora.parameters(pipe.unet, role))
    grads = {(role, layer, part): getattr(o, f"lora_{part}").weight.grad
             for role in trained for layer, o in lora.offsets(pipe.unet, role).items() for part in ("down", "up")}
    return rollout, grads, states


def reference_spo_step(model, refs, files, trained, neg_weights, pos_weights, states, guidance=3.0, steps=4, plain=1,
                       k=3, npo=False, sdxl=False, inner=0, threshold=0.3, clamp=False, scale=SCALE):
    """SPO's multi_sample_pipeline and training step on diffusers parts: each example's prompt, x_T, plain-step noise,
    candidate noises (k, C, h, w) and continuing candidate drawn from its generator as training draws them; each
    candidate DDIMScheduler.step(…, variance_noise=z) from the shared x_t; its x̂_0 the scheduler's
    pred_original_sample at the next timestep (the last step's candidates themselves), decoded by the VAE and scored by
    brightness × `scale`; SPO's compare rule; then SPO's loss over every kept pair with ddpo-pytorch's log p, its mean
    backpropagated. `inner` > 0: multi_sample_pipeline_sdxl with num_inner_step = inner (reference_inner_rollout).
    `clamp`: the last step to ᾱ_0, as ddpo-pytorch's and SPO's ddim_step_with_logprob take it (they clamp the previous
    timestep at 0; on diffusers' scheduler that is final_alpha_cumprod = alphas_cumprod[0]). The reference is the
    adapters' weights with the trained ones at 0. `sdxl`: StableDiffusionXLPipeline's conditioning (both encoders,
    the pooled embedding, zeros for no negative prompt, the time ids of a 16 x 16 image) as the UNet's
    added_cond_kwargs. `states`: our rollout's x_t at each step, which the reference takes on from (see teacher).
    Returns (pairs as ranked, kept (B, blocks), the peft gradient of (role, layer, part))."""
    gens = [machinery.example_generator(0, j) for j in range(2)]
    ref = diffusers_reference(model, refs, files, PROMPTS, gens, steps,
                              lambda name: any(f".{role}." in name for role in trained) and "lora_" in name, sdxl=sdxl)
    pipe, x, scheduler, names = ref.pipe, ref.x, ref.scheduler, ref.names
    pos, neg = (ref.pos, ref.neg) if sdxl else ({"encoder_hidden_states": ref.pos}, {"encoder_hidden_states": ref.neg})
    if clamp:
        scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]

    def eps(x, t, weights=(neg_weights, pos_weights), rows=slice(None)):
        pipe.set_adapters(names, [weights[0][n] for n in names])
        e_neg = pipe.unet(x, t, **rows_of(neg, rows)).sample
        pipe.set_adapters(names, [weights[1][n] for n in names])
        return e_neg + guidance * (pipe.unet(x, t, **rows_of(pos, rows)).sample - e_neg)

    def score(latents):
        images = (refs["vae"].decode(latents / refs["vae"].config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return rewards.brightness(images, None) * scale

    with torch.no_grad():
        if inner:
            pairs, kept = reference_inner_rollout(scheduler, eps, score, gens, x, plain, k, inner, threshold,
                                                  teacher(states))
        else:
            pairs, kept = reference_rollout(scheduler, eps, score, gens, x, plain, k, threshold, teacher(states))
    off = ({**neg_weights, **{r: 0.0 for r in trained}}, {**pos_weights, **{r: 0.0 for r in trained}})
    for i, b, x_w, w, x_l, l in pairs:
        if npo:  # NPO: the worst candidate is preferred
            x_w, w, x_l, l = x_l, l, x_w, w
        loss = reference_loss(scheduler, eps, off, scheduler.timesteps[i], b, x_w[None], w[None], x_l[None], l[None])
        (loss / len(pairs)).backward()
    parts = {"down": "lora_A", "up": "lora_B"}
    grad = lambda role, layer, part: getattr(pipe.unet.get_submodule(layer), parts[part])[role].weight.grad  # noqa
    return pairs, kept, grad


def teacher(states):
    """Teacher forcing of the reference's rollout: at step i, check that its x_t (the shared x of the examples, or the
    candidates' chains (k, B, ...) at an inner step) is ours within 1e-5, then go on from ours. Every step is then
    compared one step deep: without it, fp32 rounding in two summation orders builds up over a few CFG'd DDIM steps
    (to 1.9e-5 in an element on an AMD EPYC), and the bound would measure the CPU, not the step."""
    def force(i, x):
        mine = states[i].squeeze(1) if x.dim() == 4 else states[i].transpose(0, 1)
        torch.testing.assert_close(x, mine, rtol=1e-5, atol=1e-5)
        return mine
    return force


def rows_of(kwargs, rows):
    """The UNet keyword arguments of some rows (SDXL's added_cond_kwargs is a dict of its own)."""
    return {k: rows_of(v, rows) if isinstance(v, dict) else v[rows] for k, v in kwargs.items()}


def draw(gens, k):
    """Each example's k candidate noises, one (k, C, h, w) draw from its generator: (k, B, C, h, w)."""
    return torch.stack([torch.randn((k, 4, 8, 8), generator=g) for g in gens], dim=1)


def plain_step(scheduler, eps, gens, x, t):
    z = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
    return scheduler.step(eps(x, t), t, x, eta=1.0, variance_noise=z).prev_sample


def reference_rollout(scheduler, eps, score, gens, x, plain, k, threshold, force):
    """SPO's sampling with candidates (multi_sample_pipeline) on the scheduler: the pairs (step, example, x_t of the
    winner, x_w, x_t of the loser, x_l) and which examples kept one at each candidate step. `force(i, x)`: the x_t
    step i goes on from (see teacher)."""
    pairs, kept, timesteps = [], [], scheduler.timesteps
    for i, t in enumerate(timesteps):
        x = force(i, x)
        if i < plain:
            x = plain_step(scheduler, eps, gens, x, t)
            continue
        e, z = eps(x, t), draw(gens, k)
        candidates = torch.stack([scheduler.step(e, t, x, eta=1.0, variance_noise=z[c]).prev_sample for c in range(k)])
        if i + 1 < len(timesteps):
            t_next = timesteps[i + 1]
            x0 = [scheduler.step(eps(c, t_next), t_next, c, eta=1.0,
                                 variance_noise=torch.zeros_like(c)).pred_original_sample for c in candidates]
        else:
            x0 = list(candidates)
        best, worst, keep = spo_compare(torch.stack([score(c) for c in x0]), threshold)
        pairs += [(i, b, x[b], candidates[best[b], b], x[b], candidates[worst[b], b])
                  for b in keep.nonzero().flatten().tolist()]
        kept.append(keep)
        pick = [int(torch.randint(k, (1,), generator=g)) for g in gens]
        x = torch.stack([candidates[c, b] for b, c in enumerate(pick)])
    return pairs, torch.stack(kept, dim=1)


def reference_inner_rollout(scheduler, eps, score, gens, x, plain, k, inner, threshold, force):
    """multi_sample_pipeline_sdxl with num_inner_step = inner, as its loop runs: at the divert step the k candidates
    leave the shared x_t, and each goes on along its own chain while inner steps are left; when none are, each
    chain's x̂_0 at the current timestep is scored, every cached step of the best and the worst chain of an example
    that kept a pair becomes a pair, and one random chain branches again; the last step takes every chain one step
    more and scores their x_0 at 0. Returns what reference_rollout does (kept: per block); `force` as there."""
    pairs, kept, timesteps, left, cache, chains = [], [], scheduler.timesteps, 0, [], None

    def collect(scores):
        best, worst, keep = spo_compare(scores, threshold)
        for b in keep.nonzero().flatten().tolist():
            pairs.extend((i, b, x_t[best[b], b], x_next[best[b], b], x_t[worst[b], b], x_next[worst[b], b])
                         for i, x_t, x_next in cache)
        kept.append(keep)

    def branch(x, t):  # k candidates from the shared x: the first step of a block
        e, z = eps(x, t), draw(gens, k)
        chains = torch.stack([scheduler.step(e, t, x, eta=1.0, variance_noise=z[c]).prev_sample for c in range(k)])
        return [(i, x.expand(k, *x.shape), chains)], chains

    def chain_step(chains, t):  # every chain one step with its own noise
        z = draw(gens, k)
        return torch.stack([scheduler.step(eps(c, t), t, c, eta=1.0, variance_noise=z[n]).prev_sample
                            for n, c in enumerate(chains)])

    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        if i < plain:
            x = plain_step(scheduler, eps, gens, force(i, x), t)
        elif (left == 0 and i > plain and not last) or i == plain:
            left = inner
            if i > plain:  # score the chains on x̂_0 at t, then branch from a random one
                zero = torch.zeros_like(chains[0])
                collect(torch.stack([score(scheduler.step(eps(c, t), t, c, eta=1.0, variance_noise=zero)
                                           .pred_original_sample) for c in chains]))
                pick = [int(torch.randint(k, (1,), generator=g)) for g in gens]
                x = torch.stack([chains[c, b] for b, c in enumerate(pick)])
            cache, chains = branch(force(i, x), t)
        else:
            chains = force(i, chains)
            after = chain_step(chains, t)
            cache.append((i, chains, after))
            chains, left = after, left - 1
            if last:
                collect(torch.stack([score(c) for c in chains]))
    return pairs, torch.stack(kept, dim=1)


def reference_loss(scheduler, eps, off, t, b, x_w, w, x_l, l):
    """SPO's loss of one pair (train_spo.py, train_spo_sdxl.py): ddpo-pytorch's log p of each candidate's step, from
    its own x_t, under θ and the reference."""
    def log_prob(e, x, x_prev):
        mean = scheduler.step(e, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        std = scheduler._get_variance(int(t), int(t) - 1000 // len(scheduler.timesteps)) ** 0.5
        return (-((x_prev - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))).mean()

    def ratio(x, x_prev):
        e = eps(x, t, rows=slice(b, b + 1))
        with torch.no_grad():
            e_ref = eps(x, t, off, rows=slice(b, b + 1))
        return torch.clamp(torch.exp(log_prob(e, x, x_prev) - log_prob(e_ref, x, x_prev)), 0.9, 1.1)
    return -torch.log(torch.sigmoid(10 * torch.log(ratio(x_w, w)) - 10 * torch.log(ratio(x_l, l))))


# log p carries 1/σ_t² (as DDPO's): fp32 rounding in another summation order differs by ~1e-4 of a layer's largest
# gradient; a wrong multiplier, branch, pair or sign differs by order 1
RTOL = 1e-3


def assert_same_step(ours, reference):
    (rollout, grads, _), (pairs, kept, ref_grad) = ours, reference
    assert torch.equal(rollout.kept, kept) and kept.any() and not kept.all(), kept
    mine = sorted([(j, b, x[0], w, x[-1], l) for j, rows, xs, ws, ls in rollout.pairs
                   for b, x, w, l in zip(rows.tolist(), xs, ws, ls)], key=lambda p: (p[0], p[1]))
    assert sorted((j, b) for j, b, *_ in mine) == sorted((i, b) for i, b, *_ in pairs)
    pairs = sorted(pairs, key=lambda p: (p[0], p[1]))  # the reference lists a block's pairs example by example
    for (_, _, *a), (_, _, *b) in zip(mine, pairs, strict=True):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert grads
    for (role, layer, part), g in grads.items():
        r = ref_grad(role, layer, part).view_as(g)
        assert r.abs().max() > 0, (role, layer, part)
        assert (g - r).abs().max() <= RTOL * r.abs().max() + 1e-12, (role, layer, part)


@pytest.mark.parametrize("npo_flag", [False, True])
def test_one_spo_step_equals_spos_on_diffusers(tiny_model, lora_files, prompts_file, tmp_path, npo_flag):
    model, refs = tiny_model
    files = {"eta": lora_files["eta"]}
    ours = our_spo_step(model, files, {}, prompts_file, tmp_path, ["--npo"] * npo_flag)
    assert_same_step(ours, reference_spo_step(model, refs, files, files, {"eta": 1.0}, {"eta": 1.0}, ours[2],
                                                npo=npo_flag))


def test_inner_steps_equal_spos_sdxl_pipeline(tiny_model, lora_files, prompts_file, tmp_path):
    """--spo-inner-steps 1 on 5 steps, the first plain: two blocks of a branch step and an inner step, on which each
    candidate goes on along its own chain; each kept pair trains on both steps, the inner one from the winner's and
    the loser's own x_t (SPO's num_inner_step, as multi_sample_pipeline_sdxl and train_spo_sdxl.py run it)."""
    model, refs = tiny_model
    files = {"eta": lora_files["eta"]}
    flags = ["--sample-steps", "5", "--spo-inner-steps", "1", "--spo-threshold", "0.45"]  # pairs kept: [[1, 1], [1, 0]]
    ours = our_spo_step(model, files, {}, prompts_file, tmp_path, flags)
    assert [j for j, *_ in ours[0].pairs] == sorted({j for j, *_ in ours[0].pairs})  # one entry per trained step
    assert {x.shape[1] for _, _, x, _, _ in ours[0].pairs} == {1, 2}  # pairs at branch and at inner steps
    assert_same_step(ours, reference_spo_step(model, refs, files, files, {"eta": 1.0}, {"eta": 1.0}, ours[2], steps=5,
                                                inner=1, threshold=0.45))


# the tiny SDXL's candidates differ in brightness by 6e-4 and 1.6e-3 (5e-3 and 6e-3 with the Euler config's
# clip_sample, DDIMScheduler's default): these scales keep one pair of the two
@pytest.mark.parametrize("scheduler, scale", [("sdxl_base", 800), ("euler_saved_by_diffusers", 150)])
def test_one_spo_step_on_sdxl_equals_spos_on_diffusers_sdxl_parts(tmp_path_factory, prompts_file, tmp_path, scheduler,
                                                                  scale):
    """The same step on a tiny SDXL, with SPO's SDXL defaults (threshold 0.4, 3 inner steps: one block of the 3
    candidate steps): both text encoders, the pooled embedding and the time ids condition each branch (the
    unconditional one zeros) in the rollout, the candidates' x̂_0 and the loss. The folder's scheduler config is SDXL
    base's own (Euler, set_alpha_to_one false), or an Euler config as diffusers saves it, without set_alpha_to_one:
    DDIMScheduler's default, true, would make the last step deterministic, and training takes it to ᾱ_0 as ddpo-pytorch
    and SPO do."""
    model, refs = make_rl_sdxl_dir(tmp_path_factory, "spo_sdxl", scheduler)
    files = small_lora_files(model, str(tmp_path_factory.mktemp("spo_sdxl_lora")), [("eta", {})], seed=41)
    # both sides on one thread, so that summation order is not what the tolerance on the pairs' latents measures
    # (after 4 DDIM steps, CI's two threads put one element near 0 1.1e-5 apart)
    with one_thread():
        ours = our_spo_step(model, files, {}, prompts_file, tmp_path, ["--spo-score-scale", str(scale)])
        reference = reference_spo_step(model, refs, files, files, {"eta": 1.0}, {"eta": 1.0}, ours[2], sdxl=True,
                                       inner=3, threshold=0.4, clamp=scheduler != "sdxl_base", scale=scale)
    assert_same_step(ours, reference)


def test_uncond_branch_step_equals_the_two_branch_computation(tiny_model, lora_files, prompts_file, tmp_path):
    """--train-branch uncond --lora ETA: η frozen at α on the unconditional rows and 1 on the conditional ones, δ at
    1 and 0, SPO's labels unchanged; the reference is that CFG with δ off. At guidance 1, δ gets no gradient."""
    model, refs = tiny_model
    flags = ["--train-branch", "uncond", "--lora", lora_files["eta"], "--alpha", "0.5"]
    trained, frozen = {"delta": lora_files["delta"]}, {"eta": lora_files["eta"]}
    ours = our_spo_step(model, trained, frozen, prompts_file, tmp_path, flags)
    reference = reference_spo_step(model, refs, lora_files, trained, {"eta": 0.5, "delta": 1.0}, {"eta": 1.0, "delta": 0.0},
                                   ours[2])
    assert_same_step(ours, reference)
    rollout, grads, _ = our_spo_step(model, trained, frozen, prompts_file, tmp_path, [*flags, "--guidance", "1"])
    assert rollout.kept.any() and all(g.abs().max() == 0 for g in grads.values())


# ----------------------------------------------------------------------------------------------------------
# Training.

def test_npo_first_update_is_exactly_the_opposite(tiny_model, prompts_file, tmp_path):
    """From the same zero-up LoRA (θ = the reference, every log r = 0) and the same random streams, the pairs are the
    same and --npo swaps them: the gradient is negated exactly, so Adam's first step moves lora_up by exactly the
    opposite, and lora_down (no gradient while lora_up = 0) only by the same weight decay."""
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--spo-score-scale", str(SCALE), "--steps", "1", "--lr", "1e-3"]
    assert run(model, prompts_file, tmp_path / "plain", *flags) == 0
    assert run(model, prompts_file, tmp_path / "npo", *flags, "--npo") == 0
    plain, swapped = read_lora(tmp_path / "plain" / "lora.safetensors"), read_lora(tmp_path / "npo" / "lora.safetensors")
    assert logged(tmp_path / "plain")[0]["pairs"] > 0
    assert logged(tmp_path / "plain")[0]["loss"] == logged(tmp_path / "npo")[0]["loss"] == pytest.approx(math.log(2))
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert ups and max(plain[k].abs().max() for k in ups) > 1e-4
    for k in plain:
        assert torch.equal(swapped[k], -plain[k] if k in ups else plain[k]), k
    with safe_open(str(tmp_path / "npo" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_method"] == "spo" and meta["npo_objective"] == "R, pairs swapped"
    assert meta["npo_spo_threshold"] == "0.3" and meta["npo_spo_candidates"] == "3"


def mean_brightness(path=None, role="eta", eta_path=None, guidance=5.0, steps=6, n=16):
    """Mean brightness of n fixed-seed samples of the embedded model, as SPO samples (DDIM η 1), 64 px."""
    pipe = pipeline.load_pipeline(WEIGHTS)
    if eta_path:
        lora.load_lora(pipe.unet, eta_path, "eta")
    if path:
        lora.load_lora(pipe.unet, path, role)
    images = guided.generate(pipe, ["a red circle", "a blue square"] * (n // 2), list(range(200, 200 + n)),
                               steps=steps, guidance=guidance, ddim_eta=1.0)
    return rewards.brightness((images / 2 + 0.5).clamp(0, 1), None).mean().item()


# pairs form at every candidate step at this scale (EXPERIMENT.md: base 0.804, SPO 0.820, SPO + --npo 0.787)
EMBEDDED = ["--method", "spo", "--sample-steps", "6", "--spo-plain-steps", "2", "--spo-candidates", "4",
            "--spo-score-scale", "1000", "--batch-size", "8", "--steps", "4", "--lr", "3e-3", "--log-every", "1",
            "--device", "cpu"]


def test_a_reward_without_gradient_rises_with_spo_and_falls_with_npo(prompts_file, tmp_path, monkeypatch):
    (tmp_path / "scores.py").write_text(
        "def brightness(images, prompts):\n"
        "    return images.mean(dim=(1, 2, 3)).detach()  # a score, no gradient\n")
    monkeypatch.chdir(tmp_path)
    assert not rewards.probe(rewards.load("scores:brightness"), PROMPTS)
    for name, extra in (("up", []), ("down", ["--npo"])):
        assert npo.main(["train", "--prompts-file", prompts_file, "--out", str(tmp_path / name), "--reward",
                         "scores:brightness", *EMBEDDED, *extra]) == 0
    base = mean_brightness()
    up = mean_brightness(tmp_path / "up" / "lora.safetensors")
    down = mean_brightness(tmp_path / "down" / "lora.safetensors")  # δ as a fine-tuned model runs it (role η)
    assert up > base + 0.005 and down < base - 0.005, (base, up, down)
    for name in ("up", "down"):  # every candidate step kept pairs (the last ones fewer: see EXPERIMENT.md)
        lines = logged(tmp_path / name)
        assert all(sum(line[f"kept_{j:02d}"] for line in lines) > 0 for j in range(2, 6)), lines


def test_uncond_branch_leaves_conditional_sampling_untouched(tiny_model, lora_files, prompts_file, tmp_path):
    model, _ = tiny_model
    eta = lora_files["eta"]
    before = read_lora(eta)
    assert run(model, prompts_file, tmp_path / "run", "--reward", "rewards:brightness", "--spo-score-scale", str(SCALE),
               "--steps", "2", "--train-branch", "uncond", "--lora", eta, "--alpha", "0.5", "--lr", "1e-2") == 0
    delta = str(tmp_path / "run" / "lora.safetensors")
    with safe_open(delta, "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_train_branch"] == "uncond" and meta["npo_objective"] == "R"
    assert all(torch.equal(v, before[k]) for k, v in read_lora(eta).items())  # η frozen
    assert max(v.abs().max() for k, v in read_lora(delta).items() if k.endswith("lora_up.weight")) > 0

    def sample(with_delta, guidance):
        pipe = pipeline.load_pipeline(model)
        lora.load_lora(pipe.unet, eta, "eta")
        if with_delta:
            lora.load_lora(pipe.unet, delta, "delta")
        return guided.generate(pipe, PROMPTS * 2, [1, 2, 3, 4], steps=4, guidance=guidance, height=16, width=16,
                                 ddim_eta=1.0)
    # conditional-only sampling (guidance 1: ε = ε_pos = ε(θ + η)) is the same image with or without δ; guided
    # sampling (where δ runs on the unconditional branch) is not
    assert torch.equal(sample(True, 1.0), sample(False, 1.0))
    assert not torch.equal(sample(True, 3.0), sample(False, 3.0))


# ----------------------------------------------------------------------------------------------------------
# Nothing is lost: resume; two ranks are one with the combined batch.

@pytest.mark.parametrize("inner", ["0", "1"])
def test_spo_run_resumes_bit_for_bit(tiny_model, prompts_file, tmp_path, inner):
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--spo-score-scale", str(SCALE), "--lr", "1e-2", "--checkpoint-every",
             "1", "--spo-inner-steps", inner]
    assert run(model, prompts_file, tmp_path / "whole", *flags, "--steps", "3") == 0
    assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", "2") == 0
    assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", "3", "--resume", "latest") == 0
    a, b = read_lora(tmp_path / "whole" / "lora.safetensors"), read_lora(tmp_path / "split" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = logged(tmp_path / "whole")
    assert [x["loss"] for x in logged(tmp_path / "split")] == [x["loss"] for x in whole]
    assert whole[-1]["loss"] != pytest.approx(math.log(2))  # the later steps trained on a moved θ


def test_two_gloo_processes_equal_one_with_the_combined_batch(tiny_model, prompts_file, tmp_path):
    """Each rank samples its own examples, whose pair counts differ; the loss is the mean over all ranks' pairs."""
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--spo-score-scale", str(SCALE), "--steps", "2", "--lr", "1e-3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "npo.py"), "train", "--model", model, "--prompts-file", prompts_file, "--out",
               str(tmp_path / "ddp"), *FAST, *flags, "--batch-size", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    with one_thread():
        assert run(model, prompts_file, tmp_path / "one", *flags) == 0
    for a, b in zip(logged(tmp_path / "ddp"), logged(tmp_path / "one"), strict=True):
        for key in ("loss", "pairs", "reward", "grad_norm", "kept_01", "kept_03"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    ddp, one = read_lora(tmp_path / "ddp" / "lora.safetensors"), read_lora(tmp_path / "one" / "lora.safetensors")
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=5e-5)  # 5% of one Adam step of lr 1e-3


# ----------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 2, nothing written; SPO's defaults.

@pytest.mark.parametrize("flags, words", [
    (["--spo-candidates", "1"], "--spo-candidates must be at least 2"),
    (["--spo-threshold", "1"], "--spo-threshold must lie in [0, 1)"),
    (["--spo-threshold=-0.1"], "--spo-threshold must lie in [0, 1)"),
    (["--spo-score-scale", "0"], "--spo-score-scale must be a positive"),
    (["--spo-beta", "0"], "--spo-beta must be a positive"),
    (["--spo-clip", "1"], "--spo-clip must lie in (0, 1)"),
    (["--spo-plain-steps", "4"], "--spo-plain-steps must lie in [0, --sample-steps)"),
    (["--spo-inner-steps=-1"], "--spo-inner-steps must not be negative"),
    (["--ddim-eta", "0"], "--ddim-eta must be a positive"),
    (["--data", "pairs.jsonl"], "--data does nothing with --method spo"),
    (["--joint"], "--joint does nothing with --method spo"),
    (["--clip-range", "0.2"], "--clip-range does nothing with --method spo"),
    (["--train-branch", "uncond", "--npo"], "drop --npo"),
])
def test_bad_spo_flags(tiny_model, prompts_file, tmp_path, capsys, flags, words):
    model, _ = tiny_model
    assert run(model, prompts_file, tmp_path / "o", "--reward", "rewards:brightness", *flags) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "o").exists()


def test_non_finite_spo_numbers_are_refused_by_the_parser(tiny_model, prompts_file, tmp_path, capsys):
    model, _ = tiny_model
    for flag in ("--spo-beta", "--spo-threshold", "--spo-score-scale", "--spo-clip"):
        with pytest.raises(SystemExit) as e:
            run(model, prompts_file, tmp_path / "o", "--reward", "rewards:brightness", flag, "nan")
        assert e.value.code == 2 and "not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["dpo", "ddpo"])
def test_spo_flags_are_refused_by_other_methods(tiny_model, prompts_file, tmp_path, capsys, method):
    model, _ = tiny_model
    needed = ["--data", "x.jsonl"] if method == "dpo" else ["--reward", "rewards:brightness", "--prompts-file",
                                                           prompts_file]
    assert npo.main(["train", "--model", model, "--method", method, "--out", str(tmp_path / "o"), *needed,
                     "--spo-threshold", "0.5"]) == 2
    assert f"--spo-threshold does nothing with --method {method}" in capsys.readouterr().err


def test_spo_defaults_are_spos_sd15_config():
    """RockeyCoss/SPO configs/basic_config.py + spo_sd-v1-5_…_num-sam-4: 20 steps, guidance 5, η 1, 4 candidates,
    threshold 0.3, divert_start_step 4, β 10, ε 0.1, LoRA rank 4, lr 6e-5 (AdamW weight decay 1e-4, clip 1)."""
    config = trainflags.parse_args(["--out", "x", "--method", "spo", "--reward", "rewards:brightness",
                                     "--prompts-file", "p"])
    trainconfig.check(config)
    assert (config.sample_steps, config.guidance, config.ddim_eta, config.spo_candidates, config.spo_threshold,
            config.spo_plain_steps, config.spo_beta, config.spo_clip, config.rank, config.lr, config.max_grad_norm,
            config.spo_score_scale) == (20, 5.0, 1.0, 4, 0.3, 4, 10.0, 0.1, 4, 6e-5, 1.0, 1.0)
    config = trainflags.parse_args(["--out", "x", "--data", "d.jsonl"])
    trainconfig.check(config)
    assert config.rank == 8  # the others keep theirs


SDXL = ("rank", "lr", "spo_inner_steps", "spo_threshold", "spo_candidates")


def test_spo_defaults_on_sdxl_are_spos_sdxl_config(tmp_path, capsys):
    """RockeyCoss/SPO configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py over basic_config.py: LoRA rank
    64, lr 1e-5, num_inner_step 3, threshold 0.4, and basic_config's 2 candidates, on an SDXL folder or single file;
    SD1.5's on the others; a flag given wins; the run says which it took."""
    import ldm

    def defaults(model, *flags):
        config = trainflags.parse_args(["--out", "x", "--method", "spo", "--reward", "rewards:brightness",
                                         "--prompts-file", "p", *(["--model", model] if model else []), *flags])
        taken = trainconfig.check(config)
        return tuple(getattr(config, name) for name in SDXL), taken

    folder = str(tmp_path / "sdxl")
    refs = make_sdxl_dir(folder)
    file = ldm.save_ldm(ldm.to_ldm(SimpleNamespace(**refs), "sdxl"), str(tmp_path / "sdxl.safetensors"))
    sd_file = ldm.save_ldm(ldm.to_ldm(ldm.make_family_dir(str(tmp_path / "sd1"), "sd1"), "sd1"),
                           str(tmp_path / "sd1.safetensors"))
    spo_sdxl = (64, 1e-5, 3, 0.4, 2)
    for model in (folder, file):
        assert defaults(model) == (spo_sdxl, dict(zip(SDXL, spo_sdxl))), model
    for model in (None, WEIGHTS, str(tmp_path / "sd1"), sd_file, str(tmp_path / "missing")):
        assert defaults(model) == ((4, 6e-5, 0, 0.3, 4), {}), model
    assert defaults(folder, "--rank", "8", "--spo-inner-steps", "0") == (
        (8, 1e-5, 0, 0.4, 2), {"lr": 1e-5, "spo_threshold": 0.4, "spo_candidates": 2})
    config = trainflags.parse_args(["--out", "x", "--data", "d.jsonl", "--model", folder])
    assert trainconfig.check(config) == {} and (config.rank, config.lr) == (8, 5e-6)  # DPO keeps its own
    assert trainflags.default_text("rank") == "8; --method spo: 4; --method spo on SDXL: 64"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert npo.main(["train", "--model", folder, "--prompts-file", str(prompts), "--out", str(tmp_path / "o"),
                     "--reward", "rewards:brightness", *FAST, "--steps", "1", "--spo-inner-steps", "1"]) == 0
    assert ("an SDXL model: --method spo's SDXL defaults for the flags not given: --rank 64, --lr 1e-05, "
            "--spo-threshold 0.4") in capsys.readouterr().out


def test_a_step_aware_reward_gets_each_candidates_timestep(tiny_model, prompts_file, tmp_path, monkeypatch):
    """A reward that states timestep_aware = True is called with timesteps= (one per image): the next DDIM timestep
    for a candidate's x̂_0, 0 for the finished samples; it keeps the flag through --reward-range."""
    model, _ = tiny_model
    (tmp_path / "aware.py").write_text(
        "seen = []\n"
        "def score(images, prompts, timesteps=None):\n"
        "    seen.append(None if timesteps is None else timesteps.tolist())\n"
        "    return images.mean(dim=(1, 2, 3))\n"
        "score.timestep_aware = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import aware
    assert run(model, prompts_file, tmp_path / "o", "--reward", "aware:score", "--reward-range", "0,1",
               "--steps", "1") == 0
    scheduler = pipeline.load_pipeline(model).ddim_config()
    ts = [int(t) for t, _, _ in sampler.ddim_steps(scheduler, 4)]
    calls = [c for c in aware.seen if c is not None]
    assert calls == [[t] * 6 for t in (ts[2], ts[3], 0)]  # 2 examples × 3 candidates at each candidate step
