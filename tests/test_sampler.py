"""Our DDIM against diffusers' DDIMScheduler built from the same scheduler_config.json dict.

Tolerance: none. sampler.py does the same float32 operations as diffusers in the same order (ᾱ_t table,
√ of 0-dim ᾱ tensors, x̂_0, σ_t, x_prev), so the results are bit-identical and we compare with torch.equal.
A difference of even one ulp means the arithmetic diverged from diffusers' and should be looked at, not
absorbed by a tolerance.
"""
import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import schedulers as diffusers_schedulers
from diffusers.utils.torch_utils import randn_tensor

from npo import sampler
from npo.checkpoint import UserError

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
          timestep_spacing="leading")
SD_BETAS = {k: SD[k] for k in ("beta_start", "beta_end", "beta_schedule")}
# diffusers' own DDIM defaults, which differ from SD's in almost every field
DDIM_DEFAULTS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", set_alpha_to_one=True, steps_offset=0,
                     clip_sample=True)

# stable-diffusion-v1-5's scheduler/scheduler_config.json, and stable-diffusion-2-1's (768, v-prediction)
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
SD21_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
          "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}


def configs(**changes):
    d = {**SD, **changes}
    return sampler.DDIMConfig.from_dict(d), DDIMScheduler.from_config(d)


def fake_model(x, t):
    """A deterministic stand-in for the UNet: a smooth function of x_t and t, large enough to exercise clipping."""
    return torch.sin(1.7 * x + t.item() / 97.0) + 0.3 * x.roll(1, dims=-1)


def run_ours(cfg, x, steps, eta, generator):
    seen = []

    def denoise(x_t, t):
        seen.append((int(t), x_t))
        return fake_model(x_t, t)
    out = sampler.ddim_sample(denoise, x, cfg, steps, eta=eta, generator=generator)
    return seen, out


def run_diffusers(sched, x, steps, eta, generator):
    """The denoising loop of diffusers' StableDiffusionPipeline, with the fake model in place of UNet + CFG."""
    sched.set_timesteps(steps)
    seen = []
    for t in sched.timesteps:
        seen.append((int(t), x))
        x = sched.step(fake_model(x, t), t, x, eta=eta, generator=generator).prev_sample
    return seen, x


# ----------------------------------------------------------------------------------------------------------
# The schedule

@pytest.mark.parametrize("changes", [
    {}, dict(beta_schedule="linear"), DDIM_DEFAULTS, dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True), dict(num_train_timesteps=500, beta_schedule="linear"),
], ids=["scaled_linear", "linear", "ddim_defaults", "cosine", "zero_snr", "T500"])
def test_alphas_cumprod_equal(changes):
    cfg, ref = configs(**changes)
    ac = sampler.alphas_cumprod(cfg)
    assert ac.dtype == torch.float32 and torch.equal(ac, ref.alphas_cumprod)
    assert torch.equal(sampler.final_alpha_cumprod(cfg, ac), ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_for_every_step_count(spacing, offset):
    cfg, ref = configs(timestep_spacing=spacing, steps_offset=offset)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        if spacing == "leading" and offset == 1 and n == 1000:
            continue  # 1000..1: t = 1000 is past the table; see test_timesteps_out_of_range
        ours = sampler.timesteps(cfg, n)
        assert ours.dtype == torch.int64 and len(ours) == n
        assert torch.equal(ours, ref.timesteps[:n]), n
        # diffusers' trailing list has a stray t = -1 for some n (np.arange with a float step): we drop it
        assert ref.timesteps[n:].tolist() in ([], [-1]), n


def test_trailing_stray_step_dropped():
    cfg, ref = configs(timestep_spacing="trailing")
    ref.set_timesteps(61)
    ours = sampler.timesteps(cfg, 61)
    assert len(ours) == 61 and ours[-1] == 15 and torch.equal(ours, ref.timesteps[:61])
    assert ref.timesteps[-1] == -1  # the diffusers bug we drop; only this line fails once diffusers fixes it


def test_timesteps_out_of_range():
    cfg, ref = configs()  # leading, steps_offset 1
    ref.set_timesteps(1000)
    assert ref.timesteps[0] == 1000  # diffusers would index ᾱ_1000 and fail at its first step
    with pytest.raises(IndexError):
        ref.step(torch.zeros(1, 4, 2, 2), ref.timesteps[0], torch.zeros(1, 4, 2, 2))
    with pytest.raises(UserError, match="outside the model's 0 … 999"):
        sampler.timesteps(cfg, 1000)
    assert sampler.timesteps(cfg, 999)[0] == 999


# ----------------------------------------------------------------------------------------------------------
# The whole loop, step for step

LOOPS = {
    "sd_eps_50": dict(steps=50),
    "eps_eta1_7": dict(steps=7, eta=1.0),
    "eps_eta1_alpha1_linear": dict(steps=10, eta=1.0, set_alpha_to_one=True, beta_schedule="linear"),
    "v_trailing_10": dict(steps=10, prediction_type="v_prediction", timestep_spacing="trailing"),
    "v_eta1_linspace_alpha1": dict(steps=10, eta=1.0, prediction_type="v_prediction", timestep_spacing="linspace",
                                   set_alpha_to_one=True),
    "v_eta_half_offset0": dict(steps=25, eta=0.5, prediction_type="v_prediction", steps_offset=0),
    "eps_clip": dict(steps=10, clip_sample=True, beta_schedule="linear"),
    "sample_clip2_eta1": dict(steps=10, eta=1.0, prediction_type="sample", clip_sample=True, clip_sample_range=2.0),
    "ddim_defaults_eta1": dict(steps=20, eta=1.0, **DDIM_DEFAULTS),
    "v_zero_snr_cosine": dict(steps=12, prediction_type="v_prediction", timestep_spacing="trailing",
                              rescale_betas_zero_snr=True, beta_schedule="squaredcos_cap_v2"),
    "one_step": dict(steps=1),
    "fp16_eta1": dict(steps=10, eta=1.0, dtype=torch.float16),
    "eps_eta1_1000": dict(steps=1000, eta=1.0, steps_offset=0),
}


@pytest.mark.parametrize("name", LOOPS)
def test_loop_matches_diffusers_step_for_step(name):
    changes = dict(LOOPS[name])
    steps, eta, dtype = changes.pop("steps"), changes.pop("eta", 0.0), changes.pop("dtype", torch.float32)
    cfg, ref = configs(**changes)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    gen_ours = torch.Generator().manual_seed(1234) if eta else None
    gen_ref = torch.Generator().manual_seed(1234) if eta else None
    seen_ours, out_ours = run_ours(cfg, x, steps, eta, gen_ours)
    seen_ref, out_ref = run_diffusers(ref, x, steps, eta, gen_ref)
    assert len(seen_ours) == len(seen_ref) == steps
    for (t, a), (t_ref, b) in zip(seen_ours, seen_ref):
        assert t == t_ref and torch.equal(a, b), f"x_t differs at t = {t}"
    assert out_ours.dtype == dtype and torch.isfinite(out_ours).all() and torch.equal(out_ours, out_ref)


def test_loop_with_generator_list_continues_initial_draw():
    """As diffusers' pipeline with `generator=[g0, g1]` and η > 0: x_T and every z come from the same generators."""
    cfg, ref = configs()
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    x_ours = sampler.initial_latents(gens, 64, 64)
    _, out_ours = run_ours(cfg, x_ours, 10, 1.0, gens)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    x_ref = randn_tensor((2, 4, 8, 8), generator=gens, device=torch.device("cpu"), dtype=torch.float32)
    _, out_ref = run_diffusers(ref, x_ref, 10, 1.0, gens)
    assert torch.equal(x_ours, x_ref) and torch.equal(out_ours, out_ref)


def test_callback_and_gradients():
    cfg, _ = configs()
    calls = []
    w = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sampler.ddim_sample(lambda x_t, t: w * x_t, x, cfg, 5, callback=lambda i, n, t: calls.append((i, n, int(t))))
    assert calls == [(i, 5, t) for i, t in enumerate([801, 601, 401, 201, 1])]
    out.sum().backward()  # no no_grad inside: reward training backpropagates through the last steps
    assert w.grad is not None and torch.isfinite(w.grad)


# ----------------------------------------------------------------------------------------------------------
# Initial noise and training helpers

def test_initial_latents_one_seed():
    ours = sampler.initial_latents(42, 64, 48)
    ref = randn_tensor((1, 4, 8, 6), generator=torch.Generator("cpu").manual_seed(42), device=torch.device("cpu"),
                       dtype=torch.float32)
    assert ours.shape == (1, 4, 8, 6) and torch.equal(ours, ref)
    assert torch.equal(sampler.initial_latents([42], 64, 48), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_initial_latents_list_equals_pipeline_prepare_latents(dtype):
    seeds = [3, 1, 4]
    ours = sampler.initial_latents(seeds, 64, 80, dtype=dtype)
    fake_pipe = SimpleNamespace(vae_scale_factor=8, scheduler=DDIMScheduler())
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    ref = StableDiffusionPipeline.prepare_latents(fake_pipe, 3, 4, 64, 80, dtype, torch.device("cpu"), gens)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    # image i does not depend on the other seeds
    assert torch.equal(ours[1:2], sampler.initial_latents(1, 64, 80, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_and_target_match_diffusers(dtype, prediction_type):
    cfg, ref = configs(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 999, 500])
    ac = sampler.alphas_cumprod(cfg)
    x_t = sampler.add_noise(x0, noise, t, ac)
    assert x_t.dtype == dtype and torch.equal(x_t, ref.add_noise(x0, noise, t))
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    assert torch.equal(sampler.target(x0, noise, t, ac, prediction_type), expected)


def test_add_noise_then_predict_x0_inverts():
    """x̂_0 from the true ε (or true v) at x_t recovers x_0: the forward and reverse formulas agree."""
    cfg = sampler.DDIMConfig()
    ac = sampler.alphas_cumprod(cfg).double()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        t = torch.tensor([37])
        x_t = sampler.add_noise(x0, noise, t, ac)
        out = sampler.target(x0, noise, t, ac, prediction_type)  # a perfect model
        x0_hat, eps_hat = sampler.predict_x0(x_t, out, ac[37], prediction_type)
        assert torch.allclose(x0_hat, x0, atol=1e-10) and torch.allclose(eps_hat, noise, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Configs of real model folders, and bad input

def test_empty_config_is_sd():
    assert sampler.DDIMConfig.from_dict({}) == sampler.DDIMConfig()
    assert sampler.DDIMConfig.from_dict(SD15_PNDM) == sampler.DDIMConfig()


@pytest.mark.parametrize("d", [SD15_PNDM, SD21_V], ids=["sd15_pndm", "sd21_v"])
def test_real_scheduler_configs(d):
    cfg = sampler.DDIMConfig.from_dict(d)
    assert cfg.prediction_type == d.get("prediction_type", "epsilon")
    ref = DDIMScheduler.from_config(d)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_ours(cfg, x, 20, 0.0, None)[1], run_diffusers(ref, x, 20, 0.0, None)[1])


# the schedulers SD folders ship with; their configs carry fields DDIM never reads (skip_prk_steps, solver_order...)
OTHER_SCHEDULERS = ["PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                    "DEISMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler"]  # (LMS: same fields as KDPM2, but it needs scipy)


@pytest.mark.parametrize("name", OTHER_SCHEDULERS)
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # numpy 2 notices inside diffusers' sigma setup
def test_other_schedulers_configs_accepted(name):
    """A scheduler_config.json written by another scheduler is read as DDIMScheduler.from_config reads it."""
    sched = getattr(diffusers_schedulers, name)(**SD_BETAS)
    d = json.loads(sched.to_json_string())  # what save_pretrained writes to scheduler_config.json
    cfg = sampler.DDIMConfig.from_dict(d)
    ref = DDIMScheduler.from_config({**SD, **d})  # a field the file leaves out means SD's value to us
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen_ours, out_ours = run_ours(cfg, x, 10, 0.0, None)
    seen_ref, out_ref = run_diffusers(ref, x, 10, 0.0, None)
    assert [t for t, _ in seen_ours] == [t for t, _ in seen_ref] and torch.equal(out_ours, out_ref)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "20", True])
def test_bad_steps(steps):
    cfg = sampler.DDIMConfig()
    with pytest.raises(UserError, match="steps"):
        sampler.timesteps(cfg, steps)
    with pytest.raises(UserError, match="steps"):
        sampler.ddim_sample(lambda x, t: x, torch.zeros(1, 4, 2, 2), cfg, steps)


@pytest.mark.parametrize("field, value", [
    ("thresholding", True), ("trained_betas", [0.1] * 1000), ("prediction_type", "flow"),
    ("beta_schedule", "exp"), ("timestep_spacing", "karras"), ("frobnicate", 1), ("num_train_timesteps", 0),
])
def test_unsupported_config_values_name_the_field(field, value):
    with pytest.raises(UserError, match=f"'{field}'"):
        sampler.DDIMConfig.from_dict({**SD15_PNDM, field: value})


def test_bad_image_size():
    with pytest.raises(UserError, match="multiple of 8"):
        sampler.initial_latents(0, 64, 60)


# ----------------------------------------------------------------------------------------------------------
# DPM-Solver++ (2M) against DPMSolverMultistepScheduler.from_config(the same dict), with no tolerance either

def dpm_configs(**changes):
    d = {**SD, **changes}
    return sampler.dpm_config(d), diffusers_schedulers.DPMSolverMultistepScheduler.from_config(d)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_dpm_timesteps_and_sigmas_equal(spacing):
    cfg, ref = dpm_configs(timestep_spacing=spacing)
    for n in [*range(1, 80), 103, 250, 500, 998, 999]:
        if spacing == "leading" and n == 999:  # 999 · (1000 // 1000) + steps_offset = 1000: past the last timestep
            with pytest.raises(UserError, match="outside the model's 0 … 999"):
                sampler.timesteps(cfg, n, dpm=True)
            continue
        ref.set_timesteps(n)
        ts = sampler.timesteps(cfg, n, dpm=True)
        # diffusers' "trailing" has a stray extra step for some n (see the module docstring); we keep n
        assert torch.equal(ts, ref.timesteps[:n]), n
        assert torch.equal(sampler.dpm_sigmas(cfg, ts), torch.cat([ref.sigmas[:n], ref.sigmas[-1:]])), n
    if spacing != "trailing":
        with pytest.raises(UserError, match="at most 999 steps"):
            sampler.timesteps(cfg, 1000, dpm=True)


def run_dpm_ours(cfg, x, steps):
    seen = []

    def denoise(x_t, t):
        seen.append((int(t), x_t))
        return fake_model(x_t, t)
    return seen, sampler.dpmpp_2m_sample(denoise, x, cfg, steps)


def run_dpm_diffusers(sched, x, steps):
    sched.set_timesteps(steps)
    seen = []
    for t in sched.timesteps[:steps]:
        seen.append((int(t), x))
        x = sched.step(fake_model(x, t), t, x).prev_sample
    return seen, x


DPM_LOOPS = {
    "eps_linspace_25": dict(steps=25, timestep_spacing="linspace"),  # the paper's evaluation setting
    "eps_leading_7": dict(steps=7),
    "eps_linspace_14": dict(steps=14, timestep_spacing="linspace"),  # lower_order_final's last count (< 15)
    "eps_linspace_15": dict(steps=15, timestep_spacing="linspace"),
    "eps_leading_16": dict(steps=16),
    "v_linspace_9": dict(steps=9, prediction_type="v_prediction", timestep_spacing="linspace"),
    "v_leading_20": dict(steps=20, prediction_type="v_prediction"),
    "v_trailing_zero_snr_cosine": dict(steps=12, prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, beta_schedule="squaredcos_cap_v2"),
    "sample_linear": dict(steps=10, prediction_type="sample", beta_schedule="linear"),
    "one_step": dict(steps=1),
    "two_steps": dict(steps=2, timestep_spacing="linspace"),
    "bf16": dict(steps=11, dtype=torch.bfloat16),
    "fp16_v": dict(steps=6, dtype=torch.float16, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", DPM_LOOPS)
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_dpm_loop_matches_diffusers_step_for_step(name):
    changes = dict(DPM_LOOPS[name])
    steps, dtype = changes.pop("steps"), changes.pop("dtype", torch.float32)
    cfg, ref = dpm_configs(**changes)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    seen_ours, out_ours = run_dpm_ours(cfg, x, steps)
    seen_ref, out_ref = run_dpm_diffusers(ref, x, steps)
    assert len(seen_ours) == len(seen_ref) == steps
    for (t, a), (t_ref, b) in zip(seen_ours, seen_ref):
        assert t == t_ref and torch.equal(a, b), f"x_t differs at t = {t}"
    assert out_ours.dtype == dtype and torch.isfinite(out_ours).all() and torch.equal(out_ours, out_ref)


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_dpm_step_against_scheduler_step():
    """One call of our step against one `scheduler.step`, at the first (first-order), a middle (second-order) and
    the last step (to σ = 0, where the result is x̂_0 itself)."""
    cfg, ref = dpm_configs(timestep_spacing="linspace")
    steps = 6
    ref.set_timesteps(steps)
    ts = sampler.timesteps(cfg, steps, dpm=True)
    sigmas = sampler.dpm_sigmas(cfg, ts)
    g = torch.Generator().manual_seed(3)
    x, x0_prev = torch.randn(1, 4, 8, 8, generator=g), None
    for i, t in enumerate(ts):
        out = torch.randn(1, 4, 8, 8, generator=g)
        x0 = sampler.dpm_predict_x0(x, out, sigmas[i], "epsilon")
        ours = sampler.dpmpp_2m_step(x, x0, sigmas[i], sigmas[i + 1], x0_prev, sigmas[i - 1] if i else None)
        expected = ref.step(out, t, x).prev_sample
        assert torch.equal(ours, expected), i
        if i == steps - 1:
            assert torch.equal(ours, x0)
        x, x0_prev = expected, x0
    # and the second-order term matters: a first-order middle step is another point
    x0 = sampler.dpm_predict_x0(x, out, sigmas[2], "epsilon")
    assert not torch.allclose(sampler.dpmpp_2m_step(x, x0, sigmas[2], sigmas[3]),
                              sampler.dpmpp_2m_step(x, x0, sigmas[2], sigmas[3], x0 * 0.5, sigmas[1]))


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler",
                                  "DPMSolverMultistepScheduler", "DDPMScheduler"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_dpm_from_other_scheduler_configs(name):
    """SD folders ship these; DPMSolverMultistepScheduler.from_config(theirs) is what our dpm_config reads. A field
    the file leaves out means SD's value to us and to the pipeline (which forces steps_offset 1)."""
    d = json.loads(getattr(diffusers_schedulers, name)(**SD_BETAS).to_json_string())
    d["steps_offset"] = 1
    cfg = sampler.dpm_config(d)
    ref = diffusers_schedulers.DPMSolverMultistepScheduler.from_config(d)
    assert cfg.timestep_spacing == ref.config.timestep_spacing
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_dpm_ours(cfg, x, 8)[1], run_dpm_diffusers(ref, x, 8)[1])


def test_dpm_spacing_default_is_linspace_when_unnamed():
    assert sampler.dpm_config(SD15_PNDM).timestep_spacing == "linspace"  # SD1.5's file names none
    assert sampler.dpm_config({**SD15_PNDM, "timestep_spacing": "leading"}).timestep_spacing == "leading"
    assert sampler.pipeline_config(SD15_PNDM).timestep_spacing == "leading"  # DDIM's own default


@pytest.mark.parametrize("field, value", [("use_karras_sigmas", True), ("solver_order", 3),
                                          ("algorithm_type", "sde-dpmsolver++"), ("algorithm_type", "deis"),
                                          ("final_sigmas_type", "sigma_min"),
                                          ("variance_type", "learned_range")])
def test_dpm_variants_refused(field, value):
    with pytest.raises(UserError, match=f"'{field}'"):
        sampler.dpm_config({**SD15_PNDM, field: value})


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_sample_dispatch():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = diffusers_schedulers.DPMSolverMultistepScheduler.from_config(SD15_PNDM)
    assert torch.equal(sampler.sample("dpmpp-2m", fake_model, x, SD15_PNDM, 5), run_dpm_diffusers(ref, x, 5)[1])
    assert torch.equal(sampler.sample("ddim", fake_model, x, SD15_PNDM, 5),
                       run_diffusers(DDIMScheduler.from_config(SD15_PNDM), x, 5, 0.0, None)[1])
    with pytest.raises(UserError, match="eta"):
        sampler.sample("dpmpp-2m", fake_model, x, SD15_PNDM, 5, ddim_eta=1.0)
    with pytest.raises(UserError, match="not one of ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a"):
        sampler.sample("heun", fake_model, x, SD15_PNDM, 5)


# ----------------------------------------------------------------------------------------------------------
# DPM++ 2M Karras, Euler and Euler ancestral against DPMSolverMultistepScheduler(use_karras_sigmas=True),
# EulerDiscreteScheduler and EulerAncestralDiscreteScheduler built with from_config, with no tolerance either

SCHEDULES = {"karras": dict(steps=[1, 2, 3, 7, 25, 100, 500, 999, 1000]),
             "karras_cosine": dict(steps=[2, 25, 200], beta_schedule="squaredcos_cap_v2"),
             "karras_zero_snr": dict(steps=[3, 30], rescale_betas_zero_snr=True),
             "karras_config_range": dict(steps=[4, 20], sigma_min=0.1, sigma_max=10.0),
             "karras_linear_T500": dict(steps=[10, 499], beta_schedule="linear", num_train_timesteps=500)}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_karras_schedule_equal(name):
    """Timesteps and σs of DPMSolverMultistepScheduler(use_karras_sigmas=True): Karras et al.'s eq. 5 with ρ = 7
    between the model's σ_0 and σ_{T−1} (or the config's sigma_min / sigma_max), timesteps by log-σ interpolation."""
    changes = dict(SCHEDULES[name])
    d = {**SD, **{k: v for k, v in changes.items() if k != "steps"}}
    ref = diffusers_schedulers.DPMSolverMultistepScheduler.from_config(d, use_karras_sigmas=True)
    cfg = sampler.dpm_config(d, karras=True)
    for n in changes["steps"]:
        ref.set_timesteps(n)
        ts, sigmas = sampler.karras_schedule(cfg, n, *sampler.sigma_range(d))
        assert ts.dtype == torch.int64 and torch.equal(ts, ref.timesteps), n
        assert torch.equal(sigmas, ref.sigmas), n


def test_karras_sigmas_are_eq_5():
    """The σs against eq. 5 written out: σ_i^(1/7) evenly spaced from σ_max^(1/7) to σ_min^(1/7)."""
    s = sampler.karras_sigmas(0.03, 14.6, 6)
    inv = [14.6 ** (1 / 7) + i / 5 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) for i in range(6)]
    assert np.allclose(s, [v ** 7 for v in inv], rtol=1e-12, atol=0) and s[0] == pytest.approx(14.6)
    table = sampler.sigma_table(sampler.DDIMConfig())
    t = sampler.sigma_to_t(table[[0, 17, 999]].double().numpy(), table)
    assert np.allclose(t, [0, 17, 999])  # a σ of the table maps back to its own timestep
    mid = float(np.exp((np.log(table[17].item()) + np.log(table[18].item())) / 2))
    assert sampler.sigma_to_t(np.array([mid]), table)[0] == pytest.approx(17.5)  # linear in log σ


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("ancestral", [False, True], ids=["euler", "euler_a"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_euler_schedule_equal(spacing, ancestral):
    cls = diffusers_schedulers.EulerAncestralDiscreteScheduler if ancestral else diffusers_schedulers.EulerDiscreteScheduler
    for changes in ({}, dict(rescale_betas_zero_snr=True)):
        d = {**SD, "timestep_spacing": spacing, **changes}
        ref = cls.from_config(d)
        cfg = sampler.euler_config(d, ancestral=ancestral)
        for n in [1, 2, 7, 25, 50, 61, 999]:
            ref.set_timesteps(n)
            ts, sigmas = sampler.euler_schedule(cfg, n)
            # diffusers' "trailing" has a stray extra step for some n (see the module docstring); we keep n
            assert torch.equal(ts, ref.timesteps[:n]) and torch.equal(sigmas[:n], ref.sigmas[:n]), n
            assert sigmas[n] == 0 and ref.sigmas[-1] == 0
            assert torch.equal(sampler.init_noise_sigma(sigmas, spacing), torch.as_tensor(ref.init_noise_sigma)), n


def run_k_ours(name, d, x, steps, generator=None):
    seen = []

    def denoise(x_in, t):
        seen.append((float(t), x_in))
        return fake_model(x_in, t)
    return seen, sampler.sample(name, denoise, x, d, steps, generator=generator)


def run_k_diffusers(sched, x, steps, generator=None):
    """StableDiffusionPipeline's loop: x_T · init_noise_sigma, the model on scale_model_input, step with the
    pipeline's generator (which only Euler ancestral uses)."""
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    seen = []
    for t in sched.timesteps[:steps]:
        x_in = sched.scale_model_input(x, t)
        seen.append((float(t), x_in))
        kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(fake_model(x_in, t), t, x, **kw).prev_sample
    return seen, x


def k_scheduler(name, d):
    if name == "dpmpp-2m-karras":
        return diffusers_schedulers.DPMSolverMultistepScheduler.from_config(d, use_karras_sigmas=True)
    cls = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}[name]
    return getattr(diffusers_schedulers, cls).from_config(d)


K_LOOPS = {
    "karras_eps_25": dict(steps=25),
    "karras_eps_7": dict(steps=7, timestep_spacing="linspace"),
    "karras_v_12": dict(steps=12, prediction_type="v_prediction"),
    "karras_v_zero_snr": dict(steps=9, prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "karras_one_step": dict(steps=1),
    "karras_bf16": dict(steps=8, dtype=torch.bfloat16),
    "euler_eps_linspace_20": dict(steps=20, timestep_spacing="linspace"),
    "euler_eps_leading_9": dict(steps=9, timestep_spacing="leading"),
    "euler_v_trailing_10": dict(steps=10, prediction_type="v_prediction", timestep_spacing="trailing"),
    "euler_sample_linear": dict(steps=6, prediction_type="sample", beta_schedule="linear"),
    "euler_zero_snr_v": dict(steps=8, prediction_type="v_prediction", timestep_spacing="trailing",
                             rescale_betas_zero_snr=True),
    "euler_fp16": dict(steps=5, dtype=torch.float16),
    "euler_a_eps_linspace_20": dict(steps=20, timestep_spacing="linspace"),
    "euler_a_eps_leading_9": dict(steps=9, timestep_spacing="leading"),
    "euler_a_v_trailing_10": dict(steps=10, prediction_type="v_prediction", timestep_spacing="trailing"),
    "euler_a_one_step": dict(steps=1),
    "euler_a_fp16": dict(steps=6, dtype=torch.float16, timestep_spacing="leading"),
}


@pytest.mark.parametrize("name", K_LOOPS)
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_k_loop_matches_diffusers_step_for_step(name):
    """Every model input (scaled by 1/√(σ² + 1) for Euler) and timestep, and the result, bit for bit; Euler
    ancestral's noise from the same seeded generators (one per image, as the pipeline's list)."""
    sampler_name = "dpmpp-2m-karras" if name.startswith("karras") else "euler-a" if name.startswith("euler_a") else "euler"
    changes = dict(K_LOOPS[name])
    steps, dtype = changes.pop("steps"), changes.pop("dtype", torch.float32)
    d = {**SD, **changes}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    seen_ours, out_ours = run_k_ours(sampler_name, d, x, steps, gens())
    seen_ref, out_ref = run_k_diffusers(k_scheduler(sampler_name, d), x, steps, gens())
    assert len(seen_ours) == len(seen_ref) == steps
    for (t, a), (t_ref, b) in zip(seen_ours, seen_ref):
        assert t == t_ref and a.dtype == b.dtype and torch.equal(a, b), f"model input differs at t = {t}"
    assert out_ours.dtype == dtype and torch.isfinite(out_ours).all() and torch.equal(out_ours, out_ref)
    if sampler_name == "euler-a" and steps > 1:  # the noise matters (σ_up > 0 but on the last step)
        _, other = run_k_ours(sampler_name, d, x, steps, [torch.Generator().manual_seed(s) for s in (1, 2)])
        assert not torch.allclose(other, out_ours)


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_euler_steps_against_scheduler_step():
    """One call of each step function against one `scheduler.step`, at the first, a middle and the last step."""
    d = {**SD, "timestep_spacing": "linspace"}
    cfg = sampler.euler_config(d)
    ts, sigmas = sampler.euler_schedule(cfg, 5)
    for ancestral in (False, True):
        ref = k_scheduler("euler-a" if ancestral else "euler", d)
        ref.set_timesteps(5)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, 8, 8, generator=g) * sigmas[0]
        for i, t in enumerate(ts):
            out = torch.randn(1, 4, 8, 8, generator=g)
            x0 = sampler.euler_predict_x0(x, out, sigmas[i], "epsilon")
            if ancestral:
                z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
                ours = sampler.euler_ancestral_step(x, x0, sigmas[i], sigmas[i + 1], z)
                expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            else:
                ours = sampler.euler_step(x, x0, sigmas[i], sigmas[i + 1])
                expected = ref.step(out, t, x).prev_sample
            assert torch.equal(ours, expected), (ancestral, i)
            x = expected
        assert torch.allclose(x, x0, atol=1e-5)  # the last step, to σ = 0, lands on x̂_0 (both samplers)


@pytest.mark.parametrize("name, field, value", [
    ("euler", "use_karras_sigmas", True), ("euler", "interpolation_type", "log_linear"),
    ("euler", "timestep_type", "continuous"), ("euler", "final_sigmas_type", "sigma_min"),
    ("dpmpp-2m-karras", "solver_order", 3), ("dpmpp-2m-karras", "algorithm_type", "sde-dpmsolver++"),
    ("dpmpp-2m-karras", "use_exponential_sigmas", True),
])
def test_k_variants_refused(name, field, value):
    with pytest.raises(UserError, match=f"'{field}'.*{name}"):
        sampler.check_steps(name, {**SD15_PNDM, field: value}, 10)


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_k_samplers_accept_what_their_scheduler_ignores():
    """Euler ancestral takes an Euler-Karras config as EulerAncestralDiscreteScheduler.from_config does (it has no
    Karras σs); DPM++ 2M Karras takes use_karras_sigmas either way (it sets it)."""
    d = {**SD15_PNDM, "use_karras_sigmas": True, "interpolation_type": "log_linear"}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ref = diffusers_schedulers.EulerAncestralDiscreteScheduler.from_config(d)
    assert torch.equal(run_k_ours("euler-a", d, x, 6, gen())[1], run_k_diffusers(ref, x, 6, gen())[1])
    for karras in (True, False):
        d = {**SD15_PNDM, "use_karras_sigmas": karras}
        ref = diffusers_schedulers.DPMSolverMultistepScheduler.from_config(d, use_karras_sigmas=True)
        assert torch.equal(run_k_ours("dpmpp-2m-karras", d, x, 6)[1], run_k_diffusers(ref, x, 6)[1])


@pytest.mark.parametrize("name", ["dpmpp-2m-karras", "euler", "euler-a"])
def test_k_bad_steps_and_eta(name):
    for steps in (0, 1001, 2.5):
        with pytest.raises(UserError, match="steps"):
            sampler.check_steps(name, SD15_PNDM, steps)
    with pytest.raises(UserError, match="eta"):
        sampler.sample(name, fake_model, torch.zeros(1, 4, 2, 2), SD15_PNDM, 5, ddim_eta=0.5)
