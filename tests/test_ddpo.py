"""`npo.py train --method ddpo`: the per-step log-probability against ddpo-pytorch's formula on diffusers'
DDIMScheduler, PPO's clipped loss and DDPO's stat tracker by hand, one whole DDPO update against the same update
built from diffusers parts, rewards without a gradient trained up and (NPO) down, δ on the unconditional branch,
resume, two ranks against one, and the bad-input contract."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from npo import checkpoint
from npo import guided
from npo import logplot
from npo import lora
from npo import losses
from npo import machinery
from npo import method_ddpo
import npo
from npo import pipeline
from npo import rewards
from npo import runs
from npo import sampler
from npo import trainconfig
from npo import trainflags
from conftest import ROOT, diffusers_reference, make_rl_sdxl_dir, one_thread, random_lora_files

# tiny model: 16 px images are 8x8 latents; 2 sampling steps keep a DDPO epoch to a few UNet calls
FAST = ["--method", "ddpo", "--resolution", "16", "--sample-steps", "2", "--guidance", "3", "--log-every", "1",
        "--device", "cpu", "--batch-size", "2"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def lora_files(tiny_model, tmp_path_factory):
    """Random η and δ LoRA files (attention layers) with non-zero up weights."""
    return random_lora_files(tiny_model[0], str(tmp_path_factory.mktemp("ddpo_loras")), [("eta", {}), ("delta", {})],
                             seed=30)


def run(model, prompts_file, out, *flags):
    return npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(out), *FAST, *flags])


def logged(out):
    return [line for line in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in line]


def read_lora(path):
    return checkpoint.read_safetensors(str(path))


# ----------------------------------------------------------------------------------------------------------
# The pieces, against diffusers' scheduler and by hand.

@pytest.mark.parametrize("prediction_type, eta", [("epsilon", 1.0), ("v_prediction", 0.5)])
def test_step_log_prob_is_ddpo_pytorchs_on_diffusers_quantities(prediction_type, eta):
    """ddpo-pytorch's ddim_step_with_logprob, written out here from DDIMScheduler's own pieces: σ_t = η·√variance
    (`_get_variance`), μ = the step's prev_sample with zero noise, log p the Gaussian averaged over C, H, W."""
    from diffusers import DDIMScheduler
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    ours = sampler.DDIMConfig(**config)
    g = torch.Generator().manual_seed(0)
    for (t, a_t, a_prev), t_ref in zip(sampler.ddim_steps(ours, 10), scheduler.timesteps, strict=True):
        x, out, z = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        prev_t = int(t_ref) - 1000 // 10
        std = eta * scheduler._get_variance(int(t_ref), prev_t) ** 0.5
        mean = scheduler.step(out, t_ref, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        x_prev = scheduler.step(out, t_ref, x, eta=eta, variance_noise=z).prev_sample  # the step taken
        reference = (-((x_prev - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                     - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))).mean(dim=(1, 2, 3))

        our_mean, sigma = sampler.ddim_posterior(x, out, a_t, a_prev, ours, eta)
        assert torch.equal(our_mean, mean) and torch.equal(sigma, std)
        torch.testing.assert_close(losses.step_log_prob(x_prev, our_mean, sigma), reference, rtol=1e-6, atol=1e-6)
        # and the invariant under it: the step taken is μ + σ z, so log p is the standard normal's of z
        torch.testing.assert_close(losses.step_log_prob(our_mean + sigma * z, our_mean, sigma),
                                   (-z ** 2 / 2 - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3)) - torch.log(std),
                                   rtol=1e-5, atol=1e-5)


def test_ppo_clipped_loss_by_hand():
    # ratios 1, 1.5, 0.5, 0.5, 1.00005 with ε = 0.2: the max of −A·r and −A·clip(r) picks, per sample,
    #   A=1, r=1:        −1      (both equal)            gradient −A·r
    #   A=1, r=1.5:      −1.2    (clipped: r rose past 1 + ε where A > 0 rewards it)   gradient 0
    #   A=−1, r=0.5:     0.8     (clipped: r fell past 1 − ε where A < 0 rewards it)   gradient 0
    #   A=1, r=0.5:      −0.5    (unclipped: r fell where A > 0, the pessimistic side)   gradient −A·r
    #   A=2, r=1.00005:  −2.0001 (inside the range)       gradient −A·r
    ratio = torch.tensor([1.0, 1.5, 0.5, 0.5, 1.00005], dtype=torch.float64)
    log_prob = ratio.log().requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    loss, metrics = losses.ppo_loss(log_prob, torch.zeros(5, dtype=torch.float64), advantages, 0.2)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0.8 - 0.5 - 2.0001) / 5, abs=1e-12)
    assert metrics["clipfrac"].item() == pytest.approx(3 / 5)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2
                                                              + math.log(1.00005) ** 2) / 5)
    loss.backward()  # ∂/∂log p of −A·r is −A·r
    expected = torch.tensor([-1.0, 0.0, 0.0, -0.5, -2 * 1.00005], dtype=torch.float64) / 5
    torch.testing.assert_close(log_prob.grad, expected)


def test_stat_tracker_by_hand():
    assert (method_ddpo.BUFFER_SIZE, method_ddpo.MIN_COUNT) == (16, 16)  # ddpo-pytorch's defaults
    tracker = method_ddpo.PerPromptStatTracker(buffer_size=3, min_count=2)
    # "a" has 2 rewards (≥ min count): its own mean 2 and std 1; "b" has 1: the whole batch's mean and std
    a = tracker.update(["a", "b", "a"], [1.0, 10.0, 3.0])
    batch_mean, batch_std = 14 / 3, math.sqrt(((1 - 14 / 3) ** 2 + (10 - 14 / 3) ** 2 + (3 - 14 / 3) ** 2) / 3)
    np.testing.assert_allclose(a, [-1 / (1 + 1e-6), (10 - batch_mean) / (batch_std + 1e-6), 1 / (1 + 1e-6)], rtol=1e-12)
    # the buffer keeps the last 3 of "a": [3, 5, 7], mean 5, std √(8/3); "b" now has 2 across epochs, [10, 0]:
    # mean 5, std 5, its own statistics
    saved = tracker.state()
    b = tracker.update(["a", "a", "b"], [5.0, 7.0, 0.0])
    np.testing.assert_allclose(b, [0.0, 2 / (math.sqrt(8 / 3) + 1e-6), -5 / (5 + 1e-6)], rtol=1e-12, atol=1e-12)
    assert tracker.state() == {"a": [3.0, 5.0, 7.0], "b": [10.0, 0.0]}
    # a tracker rebuilt from its saved state continues exactly (what a checkpoint keeps)
    again = method_ddpo.PerPromptStatTracker(buffer_size=3, min_count=2, state=saved)
    np.testing.assert_array_equal(again.update(["a", "a", "b"], [5.0, 7.0, 0.0]), b)


def test_npo_of_compressibility_is_incompressibility():
    """1 − R after standardisation is −A: JPEG compressibility mapped to [0, 1] and reversed for NPO gives the
    incompressibility advantages (to the std's +1e-6, which the affine map rescales)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 16, 16, generator=g) * torch.rand(8, 1, 1, 1, generator=g)  # sizes that differ
    npo_scores = rewards.negate(rewards.affine(rewards.jpeg_compressibility, -5, 0))(images, None)
    incompressible = rewards.jpeg_incompressibility(images, None)
    prompts = ["a", "b"] * 4
    a_npo = method_ddpo.PerPromptStatTracker().update(prompts, npo_scores.double().numpy())
    a_inc = method_ddpo.PerPromptStatTracker().update(prompts, incompressible.double().numpy())
    a_com = method_ddpo.PerPromptStatTracker().update(prompts, rewards.jpeg_compressibility(images, None).double().numpy())
    assert np.abs(a_inc).max() > 0.5
    np.testing.assert_allclose(a_npo, a_inc, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(a_com, -a_inc, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# One DDPO update against the same update from diffusers' UNet (peft adapters), DDIMScheduler and VAE.

def our_ddpo_gradients(model, trained, frozen, prompts_file, tmp_path, flags):
    """One micro-step of `npo.py train --method ddpo` (sampling its epoch, then the PPO loss over every step) on
    the given offsets: {(role, layer, part): grad} of the trained ones."""
    args = trainflags.parse_args(["--model", model, "--out", str(tmp_path / "unused"), *FAST, "--reward",
                             "rewards:brightness", "--prompts-file", prompts_file, "--sample-batches", "1", *flags])
    trainconfig.check(args)
    pipe = pipeline.load_pipeline(model)
    for role, path in {**frozen, **trained}.items():
        lora.load_lora(pipe.unet, path, role)
    for role in trained:
        for p in lora.parameters(pipe.unet, role):
            p.requires_grad_(True)
    run = machinery.Run(args, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files={role: "x" for role in trained})
    method_ddpo.micro_step(run, PROMPTS)(0, 1.0)
    assert all(p.grad is None for role in frozen for p in lora.parameters(pipe.unet, role))
    return {(role, layer, part): getattr(o, f"lora_{part}").weight.grad
            for role in trained for layer, o in lora.offsets(pipe.unet, role).items() for part in ("down", "up")}


def reference_ddpo_gradients(model, refs, files, trained, steps, guidance, neg_weights, pos_weights, sdxl=False,
                             clamp=False):
    """ddpo-pytorch's epoch on diffusers parts: each example's prompt, x_T and step noises drawn from its generator
    as training draws them; DDIMScheduler.step at η = 1 with that noise; log p by ddpo-pytorch's formula; rewards
    standardised with the batch's mean and std (fewer than 16 per prompt); then PPO's loss at every step, its
    mean over the steps backpropagated. ε_neg and ε_pos are two forwards with the adapters at the given weights.
    `sdxl`: StableDiffusionXLPipeline's encode_prompt (no negative prompt: zeros, force_zeros_for_empty_prompt) and
    _get_add_time_ids for a 16 x 16 image, passed to the UNet as added_cond_kwargs. `clamp`: ddpo-pytorch's clamp of
    the previous timestep at 0, which takes the last step to ᾱ_0 (on diffusers' scheduler, final_alpha_cumprod =
    alphas_cumprod[0])."""
    gens = [machinery.example_generator(0, j) for j in range(2)]
    ref = diffusers_reference(model, refs, files, PROMPTS, gens, steps,
                              lambda name: any(f".{role}." in name for role in trained) and "lora_" in name, sdxl=sdxl)
    pipe, chosen, x, pos, neg, scheduler, names = (ref.pipe, ref.chosen, ref.x, ref.pos, ref.neg, ref.scheduler,
                                                   ref.names)
    if not sdxl:
        pos, neg = dict(encoder_hidden_states=pos), dict(encoder_hidden_states=neg)
    if clamp:
        scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]

    def log_prob(eps_neg, eps_pos, t, x, x_prev):
        eps = eps_neg + guidance * (eps_pos - eps_neg)
        mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        std = scheduler._get_variance(int(t), int(t) - 1000 // steps) ** 0.5
        return (-((x_prev - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))

    def branches(x, t):
        pipe.set_adapters(names, [neg_weights[n] for n in names])
        eps_neg = pipe.unet(x, t, **neg).sample
        pipe.set_adapters(names, [pos_weights[n] for n in names])
        return eps_neg, pipe.unet(x, t, **pos).sample

    trajectory, old = [x], []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_neg, eps_pos = branches(x, t)
            z = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
            x = scheduler.step(eps_neg + guidance * (eps_pos - eps_neg), t, x, eta=1.0, variance_noise=z).prev_sample
            old.append(log_prob(eps_neg, eps_pos, t, trajectory[-1], x))
            trajectory.append(x)
        images = (refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        r = rewards.brightness(images, chosen).double().numpy()
    advantages = torch.as_tensor(np.clip((r - r.mean()) / (r.std() + 1e-6), -5, 5), dtype=torch.float32)
    for j, t in enumerate(scheduler.timesteps):
        ratio = torch.exp(log_prob(*branches(trajectory[j], t), t, trajectory[j], trajectory[j + 1]) - old[j])
        loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
        (loss / steps).backward()
    parts = {"down": "lora_A", "up": "lora_B"}
    return lambda role, layer, part: getattr(pipe.unet.get_submodule(layer), parts[part])[role].weight.grad


# DDPO's log-probability is −‖x_prev − μ_θ‖² / 2σ_t² averaged: its gradient carries 1/σ_t², which magnifies fp32
# rounding. The same computation in another summation order (1 vs 2 torch threads) differs by up to 1.1e-4 of a
# layer's largest gradient; a wrong multiplier, branch or sign differs by order 1.
RTOL = 1e-3


def assert_gradients_equal(ours, ref):
    assert ours
    for (role, layer, part), g in ours.items():
        r = ref(role, layer, part).view_as(g)
        assert r.abs().max() > 0, (role, layer, part)
        assert (g - r).abs().max() <= RTOL * r.abs().max() + 1e-12, (role, layer, part)


def test_one_ddpo_update_equals_ddpo_pytorchs_on_diffusers(tiny_model, lora_files, prompts_file, tmp_path):
    model, refs = tiny_model
    files = {"eta": lora_files["eta"]}
    ours = our_ddpo_gradients(model, files, {}, prompts_file, tmp_path, ["--sample-steps", "3"])
    assert_gradients_equal(ours, reference_ddpo_gradients(model, refs, files, files, 3, 3.0, {"eta": 1.0}, {"eta": 1.0}))


@pytest.mark.parametrize("scheduler", ["sdxl_base", "euler_saved_by_diffusers"])
def test_one_ddpo_update_on_sdxl_equals_ddpo_pytorchs_on_diffusers_sdxl_parts(tmp_path_factory, prompts_file,
                                                                               tmp_path, scheduler):
    """The same update on a tiny SDXL: both text encoders, the pooled embedding and the time ids condition each
    branch, the unconditional one zeros. The folder's scheduler config is SDXL base's own (Euler, set_alpha_to_one
    false), or an Euler config as diffusers saves it, without set_alpha_to_one: DDIMScheduler's default, true, would
    make the last step deterministic, and training takes it to ᾱ_0 as ddpo-pytorch does."""
    model, refs = make_rl_sdxl_dir(tmp_path_factory, "ddpo_sdxl", scheduler)
    files = random_lora_files(model, str(tmp_path_factory.mktemp("ddpo_sdxl_lora")), [("eta", {})], seed=31)
    ours = our_ddpo_gradients(model, files, {}, prompts_file, tmp_path, ["--sample-steps", "3"])
    assert_gradients_equal(ours, reference_ddpo_gradients(model, refs, files, files, 3, 3.0, {"eta": 1.0},
                                                          {"eta": 1.0}, sdxl=True, clamp=scheduler != "sdxl_base"))


def test_uncond_branch_update_equals_the_two_branch_computation(tiny_model, lora_files, prompts_file, tmp_path):
    """--train-branch uncond --lora ETA: η frozen at α on the unconditional rows and 1 on the conditional ones, δ at
    1 and 0. At guidance 1 (ε = ε_pos) δ gets no gradient at all: it learns only through (1 − g)."""
    model, refs = tiny_model
    flags = ["--sample-steps", "3", "--train-branch", "uncond", "--lora", lora_files["eta"], "--alpha", "0.5"]
    trained, frozen = {"delta": lora_files["delta"]}, {"eta": lora_files["eta"]}
    ours = our_ddpo_gradients(model, trained, frozen, prompts_file, tmp_path, flags)
    ref = reference_ddpo_gradients(model, refs, lora_files, trained, 3, 3.0, {"eta": 0.5, "delta": 1.0},
                                   {"eta": 1.0, "delta": 0.0})
    assert_gradients_equal(ours, ref)
    ours = our_ddpo_gradients(model, trained, frozen, prompts_file, tmp_path, [*flags, "--guidance", "1"])
    assert all(g.abs().max() == 0 for g in ours.values())


def test_ratio_is_one_on_the_first_inner_epoch(tiny_model, lora_files, prompts_file, tmp_path, monkeypatch):
    """The first pass over an epoch's samples recomputes the log-probabilities of the policy that sampled them; the
    second pass, one update later, does not. (A random non-zero LoRA, so the offset is not trivially off.)"""
    model, _ = tiny_model
    diffs, ppo_loss = [], losses.ppo_loss

    def recording(log_prob, old_log_prob, *args):
        diffs.append((log_prob - old_log_prob).detach().abs().max().item())
        return ppo_loss(log_prob, old_log_prob, *args)
    monkeypatch.setattr(losses, "ppo_loss", recording)
    assert run(model, prompts_file, tmp_path / "run", "--reward", "rewards:brightness", "--init-lora", lora_files["eta"],
               "--sample-batches", "1", "--inner-epochs", "2", "--steps", "2", "--lr", "1e-3") == 0
    assert len(diffs) == 4  # 2 optimizer steps (the two passes of one epoch) of 2 sampling steps each
    assert max(diffs[:2]) < 1e-6 and min(diffs[2:]) > 1e-4, diffs
    first, second = logged(tmp_path / "run")
    assert first["clipfrac"] == 0 and first["approx_kl"] < 1e-12 and second["clipfrac"] > 0
    with Image.open(tmp_path / "run" / "log.png") as picture:  # loss, reward, its std, KL, clip fraction
        assert picture.size == (logplot.WIDTH, 5 * logplot.PANEL_HEIGHT)


# ----------------------------------------------------------------------------------------------------------
# Training: a reward with no gradient up, and with --npo down; δ on the unconditional branch.

def mean_score(model, path=None, role="eta", eta_path=None, guidance=3.0):
    """Mean brightness of 8 fixed-seed samples as training samples them (DDIM η 1, 2 steps, 16 px)."""
    pipe = pipeline.load_pipeline(model)
    if eta_path:
        lora.load_lora(pipe.unet, eta_path, "eta")
    if path:
        lora.load_lora(pipe.unet, path, role)
    images = guided.generate(pipe, PROMPTS * 4, list(range(100, 108)), steps=2, guidance=guidance, height=16,
                               width=16, ddim_eta=1.0)
    return rewards.brightness((images / 2 + 0.5).clamp(0, 1), None).mean().item()


def test_a_reward_without_gradient_rises_with_ddpo_and_falls_with_npo(tiny_model, prompts_file, tmp_path, monkeypatch):
    model, _ = tiny_model
    (tmp_path / "scores.py").write_text(
        "def brightness(images, prompts):\n"
        "    return images.mean(dim=(1, 2, 3)).detach()  # a score, no gradient\n")
    monkeypatch.chdir(tmp_path)
    assert not rewards.probe(rewards.load("scores:brightness"), PROMPTS)
    flags = ["--reward", "scores:brightness", "--batch-size", "32", "--sample-batches", "1", "--steps", "3",
             "--lr", "5e-3"]
    assert run(model, prompts_file, tmp_path / "up", *flags) == 0
    assert run(model, prompts_file, tmp_path / "down", *flags, "--npo") == 0
    base = mean_score(model)
    up = mean_score(model, tmp_path / "up" / "lora.safetensors")
    down = mean_score(model, tmp_path / "down" / "lora.safetensors")  # δ as a fine-tuned model would run it
    assert up > base + 0.003 and down < base - 0.003, (base, up, down)
    with safe_open(str(tmp_path / "down" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_method"] == "ddpo" and meta["npo_objective"] == "1 - R"
    assert meta["npo_clip_range"] == "0.0001" and meta["npo_sample_steps"] == "2"
    for line in logged(tmp_path / "down"):  # R itself is logged, also when 1 − R is trained
        assert {"reward", "reward_std", "approx_kl", "clipfrac"} <= line.keys() and 0.3 < line["reward"] < 0.7


def test_compressibility_with_npo_trains_what_incompressibility_trains(tiny_model, prompts_file, tmp_path):
    """DDPO's JPEG pair: δ trained on 1 − compressibility (mapped to [0, 1]) is the η of incompressibility, to the
    +1e-6 in the std that the affine map rescales (a relative 1e-3 of the advantages)."""
    model, _ = tiny_model
    flags = ["--batch-size", "4", "--sample-batches", "1", "--steps", "2", "--lr", "1e-3"]
    assert run(model, prompts_file, tmp_path / "inc", "--reward", "rewards:jpeg_incompressibility", *flags) == 0
    assert run(model, prompts_file, tmp_path / "com", "--reward", "rewards:jpeg_compressibility",
               "--reward-range=-5,0", "--npo", *flags) == 0
    inc, com = read_lora(tmp_path / "inc" / "lora.safetensors"), read_lora(tmp_path / "com" / "lora.safetensors")
    moved = max(inc[k].abs().max() for k in inc if k.endswith("lora_up.weight"))
    assert moved > 1e-3  # two Adam steps of lr 1e-3 from lora_up = 0
    assert all((inc[k] - com[k]).abs().max() < 0.05 * moved for k in inc)
    for path, role in ((tmp_path / "inc", "eta"), (tmp_path / "com", "delta")):
        with safe_open(str(path / "lora.safetensors"), "pt") as f:
            assert f.metadata()["npo_role"] == role


def test_uncond_branch_leaves_conditional_sampling_untouched(tiny_model, lora_files, prompts_file, tmp_path):
    model, _ = tiny_model
    eta = lora_files["eta"]
    before = read_lora(eta)
    assert run(model, prompts_file, tmp_path / "run", "--reward", "rewards:jpeg_incompressibility", "--steps", "2",
               "--train-branch", "uncond", "--lora", eta, "--alpha", "0.5", "--lr", "1e-2") == 0
    delta = str(tmp_path / "run" / "lora.safetensors")
    with safe_open(delta, "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_train_branch"] == "uncond" and meta["npo_objective"] == "R"
    assert meta["npo_eta"] == "eta.safetensors" and meta["npo_alpha"] == "0.5"
    assert all(torch.equal(v, before[k]) for k, v in read_lora(eta).items())  # η frozen
    assert not os.path.exists(tmp_path / "run" / "eta.safetensors")
    # conditional-only sampling (guidance 1: ε = ε_pos = ε(θ + η)) is the same image with or without δ; guided
    # sampling (where δ runs on the unconditional branch) is not
    assert mean_score(model, delta, "delta", eta, guidance=1.0) == mean_score(model, None, eta_path=eta, guidance=1.0)
    assert mean_score(model, delta, "delta", eta) != mean_score(model, None, eta_path=eta)


def test_reward_method_trains_delta_on_the_unconditional_branch(tiny_model, lora_files, prompts_file, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "reward"
    assert npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(out), "--method", "reward",
                     "--reward", "rewards:brightness", "--resolution", "16", "--sample-steps", "2", "--steps", "1",
                     "--device", "cpu", "--train-branch", "uncond", "--lora", lora_files["eta"]]) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["npo_role"] == "delta" and f.metadata()["npo_train_branch"] == "uncond"


# ----------------------------------------------------------------------------------------------------------
# Nothing is lost: resume inside an epoch and at its end; two ranks are one with the combined batch.

def test_ddpo_run_resumes_bit_for_bit(tiny_model, prompts_file, tmp_path):
    """4 optimizer steps per epoch (2 sampled batches, 2 passes); stopping after step 3 (inside epoch 0) and 4 (its
    end) and resuming gives the LoRA and the log of the uninterrupted run, bit for bit."""
    model, _ = tiny_model
    flags = ["--reward", "rewards:jpeg_compressibility", "--sample-batches", "2", "--inner-epochs", "2", "--lr",
             "1e-2", "--timestep-fraction", "0.5", "--checkpoint-every", "1"]
    assert run(model, prompts_file, tmp_path / "whole", *flags, "--steps", "5") == 0
    assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", "3") == 0
    for steps in ("4", "5"):
        assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", steps, "--resume", "latest") == 0
    a, b = read_lora(tmp_path / "whole" / "lora.safetensors"), read_lora(tmp_path / "split" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in logged(tmp_path / "split")] == [x["loss"] for x in logged(tmp_path / "whole")]
    assert [x["reward"] for x in logged(tmp_path / "split")] == [x["reward"] for x in logged(tmp_path / "whole")]


def test_two_gloo_processes_equal_one_with_the_combined_batch(tiny_model, prompts_file, tmp_path):
    """Prompts are sharded over the ranks and the rewards gathered for the advantages: 2 ranks with batch 1 sample,
    standardise and train exactly what 1 rank with batch 2 does."""
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--steps", "4", "--lr", "1e-3", "--sample-batches", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "npo.py"), "train", "--model", model, "--prompts-file", prompts_file, "--out",
               str(tmp_path / "ddp"), *FAST, *flags, "--batch-size", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    with one_thread():
        assert run(model, prompts_file, tmp_path / "one", *flags) == 0
    for a, b in zip(logged(tmp_path / "ddp"), logged(tmp_path / "one"), strict=True):
        for key in ("reward", "reward_std", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    ddp, one = read_lora(tmp_path / "ddp" / "lora.safetensors"), read_lora(tmp_path / "one" / "lora.safetensors")
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=5e-5)  # 5% of one Adam step of lr 1e-3


# ----------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 2, nothing written.

@pytest.mark.parametrize("flags, words", [
    (["--clip-range", "0"], "--clip-range must be a positive"),
    (["--timestep-fraction", "0"], "--timestep-fraction must lie in (0, 1]"),
    (["--timestep-fraction", "1.5"], "--timestep-fraction must lie in (0, 1]"),
    (["--timestep-fraction", "0.1"], "trains on no step"),
    (["--adv-clip", "-1"], "--adv-clip must be a positive"),
    (["--ddim-eta", "0"], "--ddim-eta must be a positive"),
    (["--sample-batches", "3", "--grad-accum", "2"], "not a multiple of --grad-accum"),
    (["--inner-epochs", "0"], "--inner-epochs must be at least 1"),
    (["--grad-steps", "2"], "--grad-steps does nothing with --method ddpo"),
    (["--beta-dpo", "5"], "--beta-dpo does nothing with --method ddpo"),
    (["--train-branch", "uncond", "--npo"], "drop --npo"),
    (["--lora", "eta.safetensors"], "add --train-branch uncond"),
    (["--train-branch", "uncond", "--lora", "missing.safetensors"], "does not exist"),
    (["--train-branch", "uncond", "--alpha", "0.5"], "this run has no η there"),
])
def test_bad_ddpo_flags(tiny_model, prompts_file, tmp_path, capsys, flags, words):
    model, _ = tiny_model
    assert run(model, prompts_file, tmp_path / "o", "--reward", "rewards:brightness", *flags) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, flags", [("reward", ["--clip-range", "0.2"]), ("reward", ["--inner-epochs", "2"]),
                                           ("dpo", ["--timestep-fraction", "0.5"]), ("sft", ["--train-branch", "uncond"])])
def test_ddpo_flags_are_refused_by_other_methods(tiny_model, prompts_file, tmp_path, capsys, method, flags):
    model, _ = tiny_model
    needed = ["--data", "x.jsonl"] if method in ("dpo", "sft") else ["--reward", "rewards:brightness", "--prompts-file",
                                                                     prompts_file]
    assert npo.main(["train", "--model", model, "--method", method, "--out", str(tmp_path / "o"), *needed, *flags]) == 2
    assert f"does nothing with --method {method}" in capsys.readouterr().err


def test_empty_prompts_file_and_defaults(tiny_model, prompts_file, tmp_path, capsys):
    model, _ = tiny_model
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert run(model, str(empty), tmp_path / "o", "--reward", "rewards:brightness") == 2
    assert "holds no prompts" in capsys.readouterr().err and not (tmp_path / "o").exists()
    args = trainflags.parse_args(["--out", "x", "--method", "ddpo", "--reward", "rewards:brightness", "--prompts-file", "p"])
    trainconfig.check(args)  # ddpo-pytorch's config/base.py
    assert (args.sample_steps, args.guidance, args.lr, args.ddim_eta, args.clip_range, args.adv_clip,
            args.timestep_fraction, args.inner_epochs) == (50, 5.0, 3e-4, 1.0, 1e-4, 5.0, 1.0, 1)
    args = trainflags.parse_args(["--out", "x", "--method", "reward", "--reward", "rewards:brightness", "--prompts-file", "p"])
    trainconfig.check(args)  # the other methods keep theirs
    assert (args.sample_steps, args.guidance, args.lr) == (20, 7.5, 5e-6)


def test_resume_refuses_another_method_or_branch(tiny_model, lora_files, prompts_file, tmp_path, capsys):
    model, _ = tiny_model
    out = tmp_path / "run"
    assert run(model, prompts_file, out, "--reward", "rewards:brightness", "--steps", "1", "--sample-batches", "1") == 0
    capsys.readouterr()
    for flags, words in ((["--train-branch", "uncond"], "not --method ddpo --train-branch uncond"),
                         (["--npo"], "not --method ddpo --npo"), (["--method", "reward"], "not --method reward")):
        assert run(model, prompts_file, out, "--reward", "rewards:brightness", "--steps", "2", "--resume", "latest",
                   *flags) == 2
        assert f"was trained with --method ddpo, {words}" in capsys.readouterr().err
    assert runs.list_checkpoints(str(out / "checkpoints")) == [str(out / "checkpoints" / "step-000001")]


@pytest.mark.parametrize("config", [
    dict(set_alpha_to_one=False, steps_offset=1),  # SD's
    dict(set_alpha_to_one=True, steps_offset=1),
    dict(set_alpha_to_one=True, timestep_spacing="trailing"),
    dict(steps_offset=1, timestep_spacing="leading"),  # an Euler config as diffusers saves one: no set_alpha_to_one
])
def test_rl_steps_take_the_last_step_to_alpha_0_as_ddpo_pytorch(config):
    """ddpo-pytorch's ddim_step_with_logprob (and SPO's copy) clamps the previous timestep t − T/n at 0 and reads
    ᾱ_prev = alphas_cumprod[that]: the last step goes to ᾱ_0 whatever set_alpha_to_one says, so it keeps a density.
    Every other step is DDIMScheduler's."""
    from diffusers import DDIMScheduler
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config)
    scheduler = DDIMScheduler.from_config(schedule)
    scheduler.set_timesteps(10)
    ours, steps = machinery.logprob_steps(sampler.pipeline_config(schedule, fix_old=False), 10)
    for (t, a_t, a_prev), t_ref in zip(steps, scheduler.timesteps, strict=True):
        prev = max(int(t_ref) - 1000 // 10, 0)  # torch.clamp(prev_timestep, 0, T − 1)
        assert t == int(t_ref) and a_t == scheduler.alphas_cumprod[t_ref] and a_prev == scheduler.alphas_cumprod[prev]
        x, out = torch.randn(2, 1, 4, 8, 8)
        mean, sigma = sampler.ddim_posterior(x, out, a_t, a_prev, ours, 1.0)
        assert sigma > 0
        if prev > 0:  # as DDIMScheduler steps, but for the last step where set_alpha_to_one says 1
            ref = scheduler.step(out, t_ref, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-6)
