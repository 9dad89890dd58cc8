"""DDIM (Song et al. 2021), DPM-Solver++ (2M) (Lu et al. 2022), with Karras sigmas or not, Euler and Euler ancestral
(Karras et al. 2022) sampling, classifier-free guidance with NPO's weights of its two branches (eq. 10 of the paper:
`cfg_combine`, `npo_weights`), and the forward-noising helpers of training, as plain functions over tensors.

Everything here reproduces diffusers' `DDIMScheduler`, `DPMSolverMultistepScheduler` (default configuration, or with
use_karras_sigmas), `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` step for step: the same float32
ᾱ_t and σ tables, the same timestep lists, the same arithmetic in the same order, and the noise z drawn as diffusers
draws it, so a seeded run gives the same latents. Notation: ᾱ_t = ∏_{s≤t}(1 − β_s), x̂_0 the predicted clean latent,
ε̂ the predicted noise, η the DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like), σ_t the noise added per
step (DDIM), or σ = √((1 − ᾱ_t)/ᾱ_t) the noise-to-signal ratio (DPM-Solver, Euler).

Two facts about diffusers' DDIM that this file keeps on purpose, because matching it is the point:
- the step from t goes to t − T // steps (T = num_train_timesteps), *not* to the next entry of the timestep
  list; with "linspace" / "trailing" spacing the two differ (7 steps: 999 → 857, while the model is next
  called at 832);
- the last step goes to ᾱ_prev = ᾱ_0 when `set_alpha_to_one` is False (SD), not to 1.
Where we differ on purpose: for 62 step counts (61, 103, ...) diffusers' "trailing" list gets a stray last step at
t = −1, which indexes ᾱ_{T−1} (pure noise); `timesteps` drops it (for every sampler). And where a Karras list starts
with a repeated timestep (cosine schedules, whose σ_max is huge), diffusers' scheduler starts at its second σ and
fails on its last step; we run the n steps.
"""
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint
from .checkpoint import UserError


# ----------------------------------------------------------------------------------------------------------
# Config: the field names of diffusers' scheduler/scheduler_config.json.

@dataclass
class DDIMConfig:
    # Defaults are Stable Diffusion 1.x/2.x's, not DDIMScheduler's (linear 1e-4..0.02, clip_sample=True,
    # set_alpha_to_one=True, steps_offset=0): an SD folder without a scheduler config means SD's schedule.
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear", "squaredcos_cap_v2"
    steps_offset: int = 1  # added to every "leading" timestep
    set_alpha_to_one: bool = False  # ᾱ_prev of the last step: 1 if True, else ᾱ_0
    prediction_type: str = "epsilon"  # what the UNet predicts: ε, v = √ᾱ ε − √(1−ᾱ) x_0 (SD2-768), or x_0 ("sample")
    timestep_spacing: str = "leading"  # or "trailing", "linspace" (table 2 of Lin et al. 2024)
    clip_sample: bool = False  # clamp x̂_0 to ±clip_sample_range (pixel-space models; never SD)
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False  # shift the schedule to ᾱ_{T−1} = 0 (Lin et al. 2024, algorithm 1)
    # VideoCrafter's signal scale (lvdm's LatentDiffusion `use_scale`, not a diffusers field): the model was trained on
    # x_t = √ᾱ_t s(t) x_0 + √(1−ᾱ_t) ε, s falling linearly from scale_a at t = 0 to scale_b at mid_step, then flat
    use_scale: bool = False
    scale_a: float = 1.0
    scale_b: float = 0.3
    mid_step: int = 400

    def __post_init__(self):
        for name, allowed in (("beta_schedule", ("scaled_linear", "linear", "squaredcos_cap_v2")),
                              ("prediction_type", ("epsilon", "v_prediction", "sample")),
                              ("timestep_spacing", ("leading", "trailing", "linspace"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"'{name}' = {getattr(self, name)!r} is not supported "
                                 f"(supported: {', '.join(map(repr, allowed))})")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"'num_train_timesteps' = {self.num_train_timesteps!r} must be a positive integer")

    @classmethod
    def from_dict(cls, d, where="scheduler/scheduler_config.json"):
        """The DDIM config of a scheduler_config.json dict, whichever diffusers scheduler wrote it."""
        d = {k: v for k, v in d.items() if k not in IGNORED_FIELDS}
        return checkpoint.config_from_dict(cls, d, where, NOOP_FIELDS)


# Fields DDIMScheduler reads but npo does not implement, with the values at which they change nothing.
NOOP_FIELDS = {"trained_betas": [None], "thresholding": [False]}

# Fields that DDIM never reads, whatever their value: the sampler settings of the other schedulers SD folders
# ship with (PNDM, DDPM, Euler, DPM-Solver, UniPC, DEIS, Heun, KDPM2, LMS), and DDIM's own thresholding knobs,
# which only act when `thresholding` is on. diffusers' DDIMScheduler.from_config drops them too.
IGNORED_FIELDS = {
    "skip_prk_steps", "variance_type", "interpolation_type", "timestep_type", "final_sigmas_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "sigma_min", "sigma_max", "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal",
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
    "predict_x0", "disable_corrector", "solver_p", "dynamic_thresholding_ratio", "sample_max_value",
}


# ----------------------------------------------------------------------------------------------------------
# The noise schedule ᾱ_t and the timesteps of an n-step run.

def cosine_betas(num_train_timesteps, max_beta=0.999):
    """β_t = min(1 − f(t+1)/f(t), 0.999), f(t) = cos²((t/T + s)/(1+s) · π/2), s = 0.008 (Nichol & Dhariwal, eq. 17)."""
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def rescale_zero_terminal_snr(betas):
    """Shift and scale √ᾱ_t so that ᾱ_{T−1} = 0 while ᾱ_0 is kept (Lin et al. 2024, algorithm 1)."""
    s = torch.cumprod(1.0 - betas, dim=0) ** 0.5
    s0, sT = s[0].clone(), s[-1].clone()
    abar = ((s - sT) * (s0 / (s0 - sT))) ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumulative product
    return 1 - alphas


def betas(cfg):
    """β_0 … β_{T−1} in float32, as diffusers builds them."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # linear in √β: latent diffusion's schedule
        b = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    else:
        b = cosine_betas(T)
    return rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def alphas_cumprod(cfg):
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0 … T−1: a float32 CPU tensor, bit-equal to diffusers' table."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def final_alpha_cumprod(cfg, ac):
    """ᾱ_prev of a step whose previous timestep is negative (the last step): 1, or ᾱ_0 for SD."""
    return torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]


def step_count(steps, T):
    """`steps` as an int, refused unless it is a whole number from 1 to T."""
    try:
        n = operator.index(steps)
    except TypeError:
        n = None
    if n is None or isinstance(steps, bool) or not 1 <= n <= T:
        raise UserError(f"steps = {steps!r} is not a whole number from 1 to {T} (the model's num_train_timesteps); "
                        "pick a step count in that range (SD usually uses 20 to 50).")
    return n


def timesteps(cfg, steps, dpm=False):
    """The n = `steps` timesteps of a run, descending (LongTensor), spaced as diffusers spaces them:

    leading:  t_i = i · (T // n) + steps_offset        (SD's; usually stops short of T − 1)
    trailing: t_i = round(T − i · T/n) − 1             (always starts at T − 1)
    linspace: t_i = round(i · (T − 1)/(n − 1))         (both ends; ignores steps_offset)

    `dpm=True` gives DPMSolverMultistepScheduler's list: for leading and linspace, the n + 1 timesteps above
    without the last (t = 0, or steps_offset), since DPM-Solver's last step goes on to σ = 0 instead of calling
    the model near t = 0; trailing is DDIM's. numpy computes them exactly as in diffusers, so the float rounding
    is the same."""
    T = cfg.num_train_timesteps
    n = step_count(steps, T)
    drop_last = dpm and cfg.timestep_spacing != "trailing"
    if drop_last and n == T:
        raise UserError(f"DPM-Solver with '{cfg.timestep_spacing}' spacing takes at most {T - 1} steps for this "
                        f"model (the n + 1 point grid must fit in its {T} timesteps); use fewer steps.")
    m = n + drop_last  # the number of grid points
    if cfg.timestep_spacing == "leading":
        t = (np.arange(0, m) * (T // m))[::-1].astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        # np.arange with the float step T/n yields n + 1 values for some n (61, 103, ...), the extra one
        # being t = −1, which diffusers runs as a last step at ᾱ[−1] = ᾱ_{T−1} (pure noise). We keep the n
        # intended timesteps and drop that stray step.
        t = (np.round(np.arange(T, 0, -T / m)).astype(np.int64) - 1)[:m]
    else:
        t = np.linspace(0, T - 1, m).round()[::-1].astype(np.int64)
    t = t[:n]
    if t.max() >= T or t.min() < 0:
        raise UserError(f"{n} '{cfg.timestep_spacing}' steps with steps_offset={cfg.steps_offset} give timesteps "
                        f"{t.max()} … {t.min()}, outside the model's 0 … {T - 1}; use fewer steps.")
    return torch.from_numpy(t.copy())


# diffusers' DDIMScheduler defaults, where they differ from DDIMConfig's (which are SD's schedule)
DDIM_SCHEDULER_DEFAULTS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0,
                               set_alpha_to_one=True, clip_sample=True)


def pipeline_config(scheduler_config, fix_old=True):
    """The DDIM config a diffusers pipeline runs with `DDIMScheduler.from_config(scheduler_config)`.

    StableDiffusionPipeline (`fix_old`) forces steps_offset=1 and clip_sample=False on old scheduler configs (with a
    deprecation warning), so we do too, to give the same images. StableDiffusionXLPipeline takes the config as it
    is, DDIMScheduler's defaults filling the fields it lacks (an SDXL folder ships an EulerDiscreteScheduler config)."""
    if not fix_old:
        return DDIMConfig.from_dict({**DDIM_SCHEDULER_DEFAULTS, **scheduler_config})
    cfg = DDIMConfig.from_dict(scheduler_config)
    cfg.steps_offset, cfg.clip_sample = 1, False
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Guidance: classifier-free guidance, and NPO's weights of its two branches (eq. 10 of the paper).

def cfg_combine(eps_neg, eps_pos, guidance):
    """Classifier-free guidance, diffusers' convention (g = ω + 1 in the paper's eq. 3): ε = ε_neg + g·(ε_pos − ε_neg).

    With NPO the two predictions come from different weights, θ + α·η + β·δ and θ + η: `npo_weights` (eq. 10)."""
    return eps_neg + guidance * (eps_pos - eps_neg)


def seg_combine(eps_neg, eps_pos, eps_seg, guidance, seg_scale):
    """Smoothed Energy Guidance beside CFG (Hong 2024; the authors' SDXL code, and diffusers' guider):

        ε = ε_neg + g·(ε_pos − ε_neg) + s·(ε_pos − ε_seg)

    ε_seg is the conditional prediction of the UNet with blurred self-attention queries (`guiders.smooth_query`).
    Without CFG (g ≤ 1) pass ε_neg = ε_pos: ε = ε_pos + s·(ε_pos − ε_seg), the authors' SEG alone."""
    return cfg_combine(eps_neg, eps_pos, guidance) + seg_scale * (eps_pos - eps_seg)


def npo_weights(alpha=1.0, beta=1.0):
    """NPO's guided prediction (Diffusion-NPO, sec. 3.2, eq. 10) as the multipliers of the offsets η and δ per branch:

        ε = ε_neg + g·(ε_pos − ε_neg),   ε_neg = ε(x_t, c'; θ + α·η + β·δ),   ε_pos = ε(x_t, c; θ + η)

    returns {"eta": (α, 1), "delta": (β, 0)}, each pair (unconditional, conditional), the order of diffusers' CFG
    batch [c'; c]. η is the preference offset, δ the NPO offset, trained with the preference reversed: δ runs only
    where CFG pushes away, on the unconditional branch. α = β = 1 is the authors' default; β = 0, α = γ is the
    weight-merge baseline θ + γ·η (eq. 4); δ absent (or β = 0) with α = 1 is plain CFG of the model θ + η.
    α and β may be one value per image (an α × β sweep in one batch). Every path of npo takes its weights from
    here: the batched LoRA rows (guided.npo_multipliers), the two merged weight sets (guided.merged_unets),
    a fully fine-tuned η (guided.dense_eta_denoiser), a whole NPO model as δ (guided.attach_npo_model), the text
    encoder's offsets, and guidance g ≤ 1, which runs the conditional branch alone."""
    return {"eta": (alpha, 1.0), "delta": (beta, 0.0)}


def npo_branch(weights, branch):
    """One branch's multipliers from `npo_weights`: branch 0 is the unconditional one (c'), 1 the conditional (c)."""
    return {name: pair[branch] for name, pair in weights.items()}


# ----------------------------------------------------------------------------------------------------------
# The DDIM update.

def predict_x0(x, model_output, a_t, prediction_type):
    """(x̂_0, ε̂) from the model output at x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDIM eq. 9; v of Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    elif prediction_type == "v_prediction":  # v = √ᾱ_t ε − √(1−ᾱ_t) x_0
        x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * model_output
        eps = a_t ** 0.5 * model_output + (1 - a_t) ** 0.5 * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
    else:
        raise UserError(f"prediction_type {prediction_type!r} is not supported; "
                        "use 'epsilon', 'v_prediction' or 'sample'.")
    return x0, eps


def ddim_posterior(x, model_output, a_t, a_prev, cfg, eta=0.0, x0_scale=1.0):
    """The DDIM step from x_t as a Gaussian N(μ, σ_t²) (DDIM eq. 12, σ_t of eq. 16): returns (μ, σ_t) with

        μ   = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂
        σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)          (η = 1: the DDPM posterior's standard deviation)

    `a_t`, `a_prev` are ᾱ_t and ᾱ_prev as 0-dim float32 tensors (entries of `alphas_cumprod`). DDPO scores the
    step taken by its log-density under this Gaussian (losses.step_log_prob). `x0_scale` multiplies x̂_0: s(t_prev)/s(t)
    for VideoCrafter's models (`x0_scales`), 1 for every other."""
    x0, eps = predict_x0(x, model_output, a_t, cfg.prediction_type)
    x0 = x0 * x0_scale if x0_scale != 1.0 else x0
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps, sigma


def ddim_step(x, model_output, a_t, a_prev, cfg, eta=0.0, z=None, x0_scale=1.0):
    """x_t → x_prev = μ + σ_t z = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z (DDIM eq. 12; `ddim_posterior`).

    `z` ~ N(0, I) is needed only when η > 0."""
    x_prev, sigma = ddim_posterior(x, model_output, a_t, a_prev, cfg, eta, x0_scale)
    if eta > 0:
        if z is None:
            raise ValueError("ddim_step with eta > 0 needs the noise z")
        x_prev = x_prev + sigma * z
    return x_prev


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """z ~ N(0, I) drawn as diffusers' `randn_tensor` draws it, so that seeded runs match diffusers.

    With one generator: one draw of `shape` on the generator's device, then moved to `device`. With a list of
    generators (one per image): a (1, ...) draw from each, concatenated."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        z = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator])
    else:
        on = generator.device if generator is not None else device
        z = torch.randn(shape, generator=generator, device=on, dtype=dtype)
    return z.to(device)


def initial_latents(seeds, height, width, channels=4, device="cpu", dtype=torch.float32, vae_scale=8, frames=None):
    """x_T ~ N(0, I), shape (len(seeds), C, H/s, W/s) with s the VAE's downscale (8 for SD); image i from `torch.Generator("cpu").manual_seed(seeds[i])`.

    This is what a diffusers pipeline draws given one seeded CPU generator (one image) or a list of them.
    A seed may also be a torch.Generator: it is advanced, and passing the same generators to `ddim_sample`
    continues the stream as diffusers' pipeline does when η > 0. DDIM's initial noise sigma is 1.
    With `frames` F, a video's: (len(seeds), C, F, H/s, W/s), video i one (1, C, F, H/s, W/s) draw from its
    generator, as diffusers' TextToVideoSDPipeline draws it."""
    if height % 8 or width % 8:
        raise UserError(f"image size {width}x{height} is not a multiple of 8; pick a width and height divisible by 8.")
    seeds = [seeds] if isinstance(seeds, (int, torch.Generator)) else list(seeds)
    gens = [s if isinstance(s, torch.Generator) else torch.Generator("cpu").manual_seed(s) for s in seeds]
    shape = (len(gens), channels) + ((frames,) if frames else ()) + (height // vae_scale, width // vae_scale)
    # drawn in float32 then cast: on CPU this equals diffusers' draw in the pipeline's dtype
    return randn(shape, gens).to(device, dtype)


def ddim_sample(denoise, latents, cfg, steps, eta=0.0, generator=None, callback=None):
    """Run DDIM from x_T = `latents` to x_0, calling `denoise(x_t, t)` (t a 0-dim LongTensor) once per step.

    `denoise` returns the model output the config's prediction_type names (ε or v), guidance already applied.
    `generator` (one, or one per image) feeds the noise z when η > 0. `callback(i, n, t)` after each step."""
    schedule = ddim_steps(cfg, steps)
    x = latents
    for i, ((t, a_t, a_prev), x0_scale) in enumerate(zip(schedule, x0_scales(cfg, steps))):
        out = denoise(x, t)
        z = randn(out.shape, generator, out.device, out.dtype) if eta > 0 else None
        x = ddim_step(x, out, a_t, a_prev, cfg, eta, z, x0_scale)
        if callback is not None:
            callback(i, len(schedule), t)
    return x


def ddim_steps(cfg, steps):
    """The `steps` DDIM steps as (t, ᾱ_t, ᾱ_prev), from the noisiest: what `ddim_sample` iterates over (and reward
    training, which needs to treat the last steps differently)."""
    ac = alphas_cumprod(cfg)
    a_final = final_alpha_cumprod(cfg, ac)
    result = []
    for t in timesteps(cfg, steps):
        t_prev = t - cfg.num_train_timesteps // steps  # diffusers' rule, not ts[i + 1] (see the module docstring)
        result.append((t, ac[t], ac[t_prev] if t_prev >= 0 else a_final))
    return result


def signal_scale(cfg, t):
    """VideoCrafter's s(t) (lvdm/models/ddpm3d.py:366-376): linspace(scale_a, scale_b, mid_step)[t] below mid_step,
    scale_b from there; 1 for a model without `use_scale`."""
    if not cfg.use_scale:
        return 1.0
    return float(np.linspace(cfg.scale_a, cfg.scale_b, cfg.mid_step)[t]) if t < cfg.mid_step else cfg.scale_b


def x0_scales(cfg, steps):
    """The x̂_0 factor of each DDIM step, s(t_prev) / s(t), with s(t_prev) = s(0) on the last step (VideoCrafter's
    DDIMSampler, lvdm/models/samplers/ddim.py:35-40, 286-287): its model sees the signal as s(t) x_0, so x̂_0 / s(t) is
    the clean latent, which the step puts back at the scale s(t_prev) of the timestep it goes to. All 1 without
    `use_scale`."""
    T = cfg.num_train_timesteps
    return [signal_scale(cfg, max(int(t) - T // steps, 0)) / signal_scale(cfg, int(t)) for t in timesteps(cfg, steps)]


# ----------------------------------------------------------------------------------------------------------
# DPM-Solver++ (2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2), as diffusers' DPMSolverMultistepScheduler runs it
# with its default configuration: data prediction x̂_0, second order with the midpoint rule, first order on the
# first step (no history yet) and on the last (it ends at σ = 0). In σ = √((1 − ᾱ_t)/ᾱ_t), the noise-to-signal
# ratio, x_t = α_t x_0 + σ_t ε with α_t = 1/√(σ² + 1), σ_t = σ α_t, and λ = log α_t − log σ_t (half the log-SNR).

# DPMSolverMultistepScheduler fields that would make it another solver, with the values at which it is DPM++ 2M
# (diffusers maps UniPC's solver_type names, which from_config carries over, onto the midpoint rule; a DEIS
# config's algorithm_type "deis" it refuses, and so do we). `lower_order_final` and
# `euler_at_final` change nothing here: the last step, to σ = 0, is always first order.
DPM_SOLVER_FIELDS = {
    "solver_order": [2], "algorithm_type": ["dpmsolver++"], "solver_type": ["midpoint", "logrho", "bh1", "bh2"],
    "final_sigmas_type": ["zero"], "use_karras_sigmas": [False], "use_exponential_sigmas": [False],
    "use_beta_sigmas": [False], "use_lu_lambdas": [False], "use_flow_sigmas": [False], "lambda_min_clipped": [-math.inf],
    "variance_type": [None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],  # not "learned*"
}


def refuse_variants(scheduler_config, fields, name, what):
    """A scheduler config asking for another variant of the sampler `name` than npo runs is refused, naming the field."""
    for key, allowed in fields.items():
        if key in scheduler_config and scheduler_config[key] not in allowed:
            raise UserError(f"the scheduler config sets '{key}' = {scheduler_config[key]!r}, another variant than npo's "
                            f"{name} ({what}); pass --scheduler-config a config without it, or use another --sampler.")


def dpm_config(scheduler_config, fix_old=True, karras=False):
    """The schedule DPMSolverMultistepScheduler.from_config(scheduler_config) runs in diffusers' pipeline: DDIM's
    fields (βs, T, prediction type, steps_offset forced to 1), with DPM-Solver's own default spacing, "linspace",
    when the config names none (SD1.5's file). A config asking for another DPM-Solver variant is refused; `karras`
    (dpmpp-2m-karras, use_karras_sigmas=True) takes the config's use_karras_sigmas, whatever it says, as on."""
    fields = {k: v for k, v in DPM_SOLVER_FIELDS.items() if not (karras and k == "use_karras_sigmas")}
    refuse_variants(scheduler_config, fields, "dpmpp-2m-karras" if karras else "dpmpp-2m",
                    "DPM++ 2M with diffusers' defaults" + (" and Karras sigmas" if karras else ""))
    cfg = pipeline_config(scheduler_config, fix_old)
    if "timestep_spacing" not in scheduler_config:
        cfg.timestep_spacing = "linspace"
    return cfg


def sigma_table(cfg):
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1 in float32, as diffusers' σ-based schedulers build it."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0 ** -24  # diffusers' stand-in for ᾱ_{T−1} = 0, so that σ_{T−1} is finite
    return ((1 - ac) / ac) ** 0.5


def dpm_sigmas(cfg, ts):
    """σ at each timestep of `ts`, then the final σ = 0: n + 1 float32 values, bit-equal to diffusers' `sigmas`."""
    return torch.cat([sigma_table(cfg)[ts], torch.zeros(1)])


def vp(sigma):
    """(α_t, σ_t) = (1/√(σ² + 1), σ/√(σ² + 1)): the signal and noise scales of x_t = α_t x_0 + σ_t ε."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpm_predict_x0(x, model_output, sigma, prediction_type):
    """x̂_0 from the model output at x_t = α_t x_0 + σ_t ε: (x_t − σ_t ε̂)/α_t, or α_t x_t − σ_t v̂ (predict_x0 in
    terms of σ, computed as diffusers computes it, in the model output's dtype)."""
    alpha, sigma_t = vp(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    raise UserError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'.")


def dpmpp_2m_step(x, x0, sigma, sigma_next, x0_prev=None, sigma_prev=None):
    """x at σ → x at σ_next by DPM-Solver++(2M), with h = λ_next − λ (Lu et al. 2022, eqs. 8 and 10):

        first order:   x_next = (σ_next/σ) x − α_next (e^{−h} − 1) x̂_0                       (DDIM in λ)
        second order:  x_next −= ½ α_next (e^{−h} − 1) D1,   D1 = (x̂_0 − x̂_0^prev) / r,  r = h_prev / h

    `x0_prev`, `sigma_prev` are the previous step's x̂_0 and σ (None on the first step: first order). The step to
    σ_next = 0 is first order too, and returns x̂_0 exactly (e^{−h} = 0). The update runs in float32."""
    alpha_t, sigma_t = vp(sigma_next)
    alpha_s, sigma_s = vp(sigma)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    h = torch.log(alpha_t) - torch.log(sigma_t) - lambda_s
    scale = alpha_t * (torch.exp(-h) - 1.0)
    x_next = (sigma_t / sigma_s) * x.float() - scale * x0
    if x0_prev is None or sigma_next == 0:
        return x_next
    alpha_p, sigma_p = vp(sigma_prev)
    r = (lambda_s - (torch.log(alpha_p) - torch.log(sigma_p))) / h
    return x_next - 0.5 * scale * ((1.0 / r) * (x0 - x0_prev))


def dpmpp_2m_sample(denoise, latents, cfg, steps, callback=None, schedule=None):
    """Run DPM-Solver++(2M) from x_T = `latents` (σ_max's latents are x_T itself: DPM's initial noise sigma is 1)
    to x_0, calling `denoise(x_t, t)` once per step, as `ddim_sample`; deterministic, no noise drawn. `schedule`:
    the (timesteps, σs) to run, by default the config's spacing (`karras_schedule` gives Karras et al.'s)."""
    if schedule is None:
        ts = timesteps(cfg, steps, dpm=True)
        schedule = ts, dpm_sigmas(cfg, ts)
    ts, sigmas = schedule
    x, x0_prev = latents, None
    for i, t in enumerate(ts):
        out = denoise(x, t)
        x0 = dpm_predict_x0(x, out, sigmas[i], cfg.prediction_type)
        x = dpmpp_2m_step(x, x0, sigmas[i], sigmas[i + 1], x0_prev, sigmas[i - 1] if i else None).to(out.dtype)
        x0_prev = x0
        if callback is not None:
            callback(i, len(ts), t)
    return x


# ----------------------------------------------------------------------------------------------------------
# Karras sigmas (Karras et al. 2022, "Elucidating the design space", eq. 5), for "DPM++ 2M Karras": the n noise
# levels are spaced evenly in σ^(1/ρ), which puts more steps at low noise than the timestep spacings do, and each is
# mapped back to the timestep of that σ (interpolated, then rounded) for the UNet. Computed in float64 numpy as
# diffusers does, so the float32 σs and the timesteps are bit-equal to its.

def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i = 0 … n−1 (eq. 5; ρ = 7 in the paper)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas, table):
    """The timestep of each σ: linear interpolation of t in log σ between the two table entries around it, clamped
    to 0 … T−1 (diffusers' `_sigma_to_t`). `table` is `sigma_table`, increasing in t."""
    log_table = np.log(table.numpy())  # float32, as diffusers keeps it
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # low: the last t with log σ_t ≤ log σ (the first when there is none), so that [low, low + 1] brackets σ
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_schedule(cfg, steps, sigma_min=None, sigma_max=None):
    """(timesteps, σs) of DPMSolverMultistepScheduler with use_karras_sigmas: n Karras σs from σ_max = σ_{T−1} down to
    σ_min = σ_0 (or the config's sigma_min / sigma_max), then σ = 0; the timesteps are `sigma_to_t` rounded to integers
    (truncated for the cosine schedule, a quirk of diffusers we keep). The timestep spacing plays no part."""
    n = step_count(steps, cfg.num_train_timesteps)
    table = sigma_table(cfg)
    sigmas = karras_sigmas(table[0].item() if sigma_min is None else sigma_min,
                           table[-1].item() if sigma_max is None else sigma_max, n)
    t = sigma_to_t(sigmas, table)
    t = t if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()
    return torch.from_numpy(t).to(torch.int64), torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Euler and Euler ancestral (Karras et al. 2022, algorithm 1 with no churn; k-diffusion's `sample_euler_ancestral`),
# as diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler run them. They work in the variance-
# exploding form x = x_0 + σ ε (x = x_t^VP · √(σ² + 1)): the sampler starts from x_T · init_noise_sigma, the UNet sees
# x / √(σ² + 1) (which is x_t^VP again) at the timestep of σ, and a step follows the ODE dx/dσ = (x − x̂_0)/σ.

# EulerDiscreteScheduler fields that would make it another sampler than plain Euler, with the values at which it is
# plain Euler. (EulerAncestralDiscreteScheduler has none of them: from_config drops them.)
EULER_FIELDS = {
    "interpolation_type": ["linear"], "use_karras_sigmas": [False], "use_exponential_sigmas": [False],
    "use_beta_sigmas": [False], "timestep_type": ["discrete"], "final_sigmas_type": ["zero"],
}


def euler_config(scheduler_config, fix_old=True, ancestral=False):
    """The schedule Euler(Ancestral)DiscreteScheduler.from_config(scheduler_config) runs in diffusers' pipeline: DDIM's
    fields, with Euler's default spacing, "linspace", when the config names none (SD1.5's file; SDXL's names
    "leading"). Plain Euler refuses a config asking for another Euler variant (Karras σs, log-linear σs, ...)."""
    if not ancestral:
        refuse_variants(scheduler_config, EULER_FIELDS, "euler", "EulerDiscreteScheduler's defaults")
    cfg = pipeline_config(scheduler_config, fix_old)
    if "timestep_spacing" not in scheduler_config:
        cfg.timestep_spacing = "linspace"
    return cfg


def euler_schedule(cfg, steps):
    """(timesteps, σs) of the Euler schedulers: the n timesteps of the config's spacing, float32 and, for "linspace",
    not rounded (t_i = i · (T − 1)/(n − 1)); σ at each by linear interpolation of the σ table in t, then σ = 0."""
    n = step_count(steps, cfg.num_train_timesteps)
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, cfg.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    else:
        t = timesteps(cfg, n).numpy().astype(np.float32)  # leading, trailing: DDIM's integers
    table = sigma_table(cfg).numpy()
    sigmas = np.interp(t, np.arange(len(table)), table)
    return torch.from_numpy(t), torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def init_noise_sigma(sigmas, spacing):
    """The scale of x_T: σ_max for "linspace" / "trailing" spacing, √(σ_max² + 1) for "leading" (diffusers' rule)."""
    return sigmas.max() if spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5


def euler_predict_x0(x, model_output, sigma, prediction_type):
    """x̂_0 at x = x_0 + σ ε (x in float32): x − σ ε̂; for v, x/(σ² + 1) − σ v̂/√(σ² + 1); or the output itself."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    if prediction_type == "sample":
        return model_output
    raise UserError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'.")


def euler_step(x, x0, sigma, sigma_next):
    """x at σ → x at σ_next by one Euler step of dx/dσ = d = (x − x̂_0)/σ:  x_next = x + d · (σ_next − σ)."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


def euler_ancestral_step(x, x0, sigma, sigma_next, z):
    """x at σ → x at σ_next by Euler ancestral: an Euler step down to σ_down, then fresh noise σ_up · z, with
    σ_up = √(σ_next² (σ² − σ_next²)/σ²) and σ_down = √(σ_next² − σ_up²), so that the variance at σ_next is right
    (σ_down² + σ_up² = σ_next²). `z` ~ N(0, I)."""
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return x + (x - x0) / sigma * (sigma_down - sigma) + z * sigma_up


def euler_sample(denoise, latents, cfg, steps, ancestral=False, generator=None, callback=None):
    """Run Euler (or Euler ancestral) from x_T = `latents` (N(0, I), scaled here by `init_noise_sigma`) to x_0,
    calling `denoise(x / √(σ² + 1), t)` once per step, t a 0-dim float32 timestep. `generator` (one, or one per
    image) feeds the ancestral noise, drawn every step as diffusers draws it (also on the last, where σ_up = 0)."""
    ts, sigmas = euler_schedule(cfg, steps)
    x = latents * init_noise_sigma(sigmas, cfg.timestep_spacing)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = denoise(x / ((sigma ** 2 + 1) ** 0.5), t)
        x32 = x.float()  # the update runs in float32, as diffusers upcasts it
        x0 = euler_predict_x0(x32, out, sigma, cfg.prediction_type)
        if ancestral:
            z = randn(out.shape, generator, out.device, out.dtype)
            x = euler_ancestral_step(x32, x0, sigma, sigma_next, z).to(out.dtype)
        else:
            x = euler_step(x32, x0, sigma, sigma_next).to(out.dtype)
        if callback is not None:
            callback(i, len(ts), t)
    return x


# ----------------------------------------------------------------------------------------------------------
# The samplers by name (npo.py sample --sampler), each run as diffusers' StableDiffusionPipeline runs that scheduler
# built from the model's scheduler config.

# our name: A1111's name (the PNG's `Sampler:`) and the diffusers scheduler it matches
SAMPLERS = {"ddim": "DDIM", "dpmpp-2m": "DPM++ 2M", "dpmpp-2m-karras": "DPM++ 2M Karras", "euler": "Euler",
            "euler-a": "Euler a"}
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
              "dpmpp-2m-karras": "DPMSolverMultistepScheduler(use_karras_sigmas=True)",
              "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}


def sampler_config(name, scheduler_config, fix_old=True):
    """The config the sampler `name` runs on, from a scheduler_config.json dict (`fix_old`: see `pipeline_config`)."""
    if name == "ddim":
        return pipeline_config(scheduler_config, fix_old)
    if scheduler_config.get("use_scale"):
        raise UserError(f"this model rescales x̂_0 at each step (VideoCrafter's use_scale), which npo does only in "
                        f"DDIM, the authors' sampler; pass --sampler ddim instead of {name}.")
    if name in ("dpmpp-2m", "dpmpp-2m-karras"):
        return dpm_config(scheduler_config, fix_old, karras=name == "dpmpp-2m-karras")
    if name in ("euler", "euler-a"):
        return euler_config(scheduler_config, fix_old, ancestral=name == "euler-a")
    raise UserError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}; pick one of those.")


def sigma_range(scheduler_config):
    """The config's sigma_min and sigma_max (None: the model's own σ_0 and σ_{T−1}), which Karras σs honour."""
    return scheduler_config.get("sigma_min"), scheduler_config.get("sigma_max")


def check_steps(name, scheduler_config, steps, fix_old=True):
    """Refuse, before any compute, a step count or config that the sampler `name` cannot run."""
    cfg = sampler_config(name, scheduler_config, fix_old)
    if name == "dpmpp-2m-karras":
        karras_schedule(cfg, steps, *sigma_range(scheduler_config))
    elif name in ("euler", "euler-a"):
        euler_schedule(cfg, steps)
    else:
        timesteps(cfg, steps, dpm=name == "dpmpp-2m")


def sample(name, denoise, latents, scheduler_config, steps, ddim_eta=0.0, generator=None, callback=None,
           fix_old=True):
    """x_T → x_0 with the sampler `name` (one of SAMPLERS, each as its diffusers scheduler in SCHEDULERS with the
    defaults), on the schedule of a scheduler_config.json dict (`fix_old`: see `pipeline_config`). `latents` is
    N(0, I); a sampler that starts at another scale (Euler's) scales it. `ddim_eta` is DDIM's noise, `generator`
    feeds DDIM's (η > 0) and Euler ancestral's."""
    cfg = sampler_config(name, scheduler_config, fix_old)
    if ddim_eta and name != "ddim":
        raise UserError(f"DDIM's eta ({ddim_eta}) does nothing with the {name} sampler; drop --ddim-eta or use "
                        "--sampler ddim.")
    if name == "ddim":
        return ddim_sample(denoise, latents, cfg, steps, ddim_eta, generator, callback)
    if name == "dpmpp-2m":
        return dpmpp_2m_sample(denoise, latents, cfg, steps, callback)
    if name == "dpmpp-2m-karras":
        schedule = karras_schedule(cfg, steps, *sigma_range(scheduler_config))
        return dpmpp_2m_sample(denoise, latents, cfg, steps, callback, schedule)
    return euler_sample(denoise, latents, cfg, steps, name == "euler-a", generator, callback)


# ----------------------------------------------------------------------------------------------------------
# Training: the forward process q(x_t | x_0) and the regression target of the UNet.

def _per_sample(ac, t, like):
    """ᾱ_t for each sample, in `like`'s dtype and device, shaped (B, 1, 1, 1) to broadcast over C, H, W."""
    a = ac.to(device=like.device, dtype=like.dtype)[torch.as_tensor(t, device=like.device)]
    return a.flatten().reshape(-1, *[1] * (like.ndim - 1))


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM eq. 4), per-sample t; as diffusers' `add_noise`."""
    a = _per_sample(alphas_cumprod, t, x0)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def target(x0, noise, t, alphas_cumprod, prediction_type):
    """What the UNet should output at x_t: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (diffusers' `get_velocity`), or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0
    if prediction_type == "sample":
        return x0
    raise UserError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'.")
