"""DDIM (Song et al. 2021) and DPM-Solver++ (2M) (Lu et al. 2022) sampling, and the forward-noising helpers of
training, as plain functions over tensors.

Everything here reproduces diffusers' `DDIMScheduler` and `DPMSolverMultistepScheduler` (default configuration) step
for step: the same float32 ᾱ_t table, the same timestep lists, the same arithmetic in the same order, and the noise
z drawn as diffusers draws it, so a seeded run gives the same latents. Notation: ᾱ_t = ∏_{s≤t}(1 − β_s), x̂_0 the predicted clean latent, ε̂ the
predicted noise, η the DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like), σ_t the noise added per step.

Two facts about diffusers' DDIM that this file keeps on purpose, because matching it is the point:
- the step from t goes to t − T // steps (T = num_train_timesteps), *not* to the next entry of the timestep
  list; with "linspace" / "trailing" spacing the two differ (7 steps: 999 → 857, while the model is next
  called at 832);
- the last step goes to ᾱ_prev = ᾱ_0 when `set_alpha_to_one` is False (SD), not to 1.
The one place we differ on purpose: for 62 step counts (61, 103, ...) diffusers' "trailing" list gets a stray
last step at t = −1, which indexes ᾱ_{T−1} (pure noise); `timesteps` drops it.
"""
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
from checkpoint import UserError


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
    try:
        n = operator.index(steps)
    except TypeError:
        n = None
    if n is None or isinstance(steps, bool) or not 1 <= n <= T:
        raise UserError(f"steps = {steps!r} is not a whole number from 1 to {T} (the model's num_train_timesteps); "
                        "pick a step count in that range (SD usually uses 20 to 50).")
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


def cfg_combine(eps_neg, eps_pos, guidance):
    """Classifier-free guidance, diffusers' convention (g = ω + 1 in the paper's eq. 3): ε = ε_neg + g·(ε_pos − ε_neg)."""
    return eps_neg + guidance * (eps_pos - eps_neg)


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


def ddim_posterior(x, model_output, a_t, a_prev, cfg, eta=0.0):
    """The DDIM step from x_t as a Gaussian N(μ, σ_t²) (DDIM eq. 12, σ_t of eq. 16): returns (μ, σ_t) with

        μ   = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂
        σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)          (η = 1: the DDPM posterior's standard deviation)

    `a_t`, `a_prev` are ᾱ_t and ᾱ_prev as 0-dim float32 tensors (entries of `alphas_cumprod`). DDPO scores the
    step taken by its log-density under this Gaussian (losses.step_log_prob)."""
    x0, eps = predict_x0(x, model_output, a_t, cfg.prediction_type)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps, sigma


def ddim_step(x, model_output, a_t, a_prev, cfg, eta=0.0, z=None):
    """x_t → x_prev = μ + σ_t z = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z (DDIM eq. 12; `ddim_posterior`).

    `z` ~ N(0, I) is needed only when η > 0."""
    x_prev, sigma = ddim_posterior(x, model_output, a_t, a_prev, cfg, eta)
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


def initial_latents(seeds, height, width, channels=4, device="cpu", dtype=torch.float32, vae_scale=8):
    """x_T ~ N(0, I), shape (len(seeds), C, H/s, W/s) with s the VAE's downscale (8 for SD); image i from `torch.Generator("cpu").manual_seed(seeds[i])`.

    This is what a diffusers pipeline draws given one seeded CPU generator (one image) or a list of them.
    A seed may also be a torch.Generator: it is advanced, and passing the same generators to `ddim_sample`
    continues the stream as diffusers' pipeline does when η > 0. DDIM's initial noise sigma is 1."""
    if height % 8 or width % 8:
        raise UserError(f"image size {width}x{height} is not a multiple of 8; pick a width and height divisible by 8.")
    seeds = [seeds] if isinstance(seeds, (int, torch.Generator)) else list(seeds)
    gens = [s if isinstance(s, torch.Generator) else torch.Generator("cpu").manual_seed(s) for s in seeds]
    # drawn in float32 then cast: on CPU this equals diffusers' draw in the pipeline's dtype
    return randn((len(gens), channels, height // vae_scale, width // vae_scale), gens).to(device, dtype)


def ddim_sample(denoise, latents, cfg, steps, eta=0.0, generator=None, callback=None):
    """Run DDIM from x_T = `latents` to x_0, calling `denoise(x_t, t)` (t a 0-dim LongTensor) once per step.

    `denoise` returns the model output the config's prediction_type names (ε or v), guidance already applied.
    `generator` (one, or one per image) feeds the noise z when η > 0. `callback(i, n, t)` after each step."""
    schedule = ddim_steps(cfg, steps)
    x = latents
    for i, (t, a_t, a_prev) in enumerate(schedule):
        out = denoise(x, t)
        z = randn(out.shape, generator, out.device, out.dtype) if eta > 0 else None
        x = ddim_step(x, out, a_t, a_prev, cfg, eta, z)
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


def dpm_config(scheduler_config, fix_old=True):
    """The schedule DPMSolverMultistepScheduler.from_config(scheduler_config) runs in diffusers' pipeline: DDIM's
    fields (βs, T, prediction type, steps_offset forced to 1), with DPM-Solver's own default spacing, "linspace",
    when the config names none (SD1.5's file). A config asking for another DPM-Solver variant is refused."""
    for key, allowed in DPM_SOLVER_FIELDS.items():
        if key in scheduler_config and scheduler_config[key] not in allowed:
            raise UserError(f"the scheduler config sets '{key}' = {scheduler_config[key]!r}, another DPM-Solver variant "
                            "than npo's dpmpp-2m (DPM++ 2M with diffusers' defaults); pass --scheduler-config a "
                            "config without it, or use --sampler ddim.")
    cfg = pipeline_config(scheduler_config, fix_old)
    if "timestep_spacing" not in scheduler_config:
        cfg.timestep_spacing = "linspace"
    return cfg


def dpm_sigmas(cfg, ts):
    """σ at each timestep of `ts`, then the final σ = 0: n + 1 float32 values, bit-equal to diffusers' `sigmas`."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0 ** -24  # diffusers' stand-in for ᾱ_{T−1} = 0, so that σ_{T−1} is finite
    return torch.cat([(((1 - ac) / ac) ** 0.5)[ts], torch.zeros(1)])


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


def dpmpp_2m_sample(denoise, latents, cfg, steps, callback=None):
    """Run DPM-Solver++(2M) from x_T = `latents` (σ_max's latents are x_T itself: DPM's initial noise sigma is 1)
    to x_0, calling `denoise(x_t, t)` once per step, as `ddim_sample`; deterministic, no noise drawn."""
    ts = timesteps(cfg, steps, dpm=True)
    sigmas = dpm_sigmas(cfg, ts)
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
# The samplers by name (npo.py sample --sampler), each run as diffusers' StableDiffusionPipeline runs that scheduler
# built from the model's scheduler config.

SAMPLERS = {"ddim": "DDIM", "dpmpp-2m": "DPM++ 2M"}  # our name: A1111's name (the PNG's `Sampler:`)


def sample(name, denoise, latents, scheduler_config, steps, ddim_eta=0.0, generator=None, callback=None,
           fix_old=True):
    """x_T → x_0 with the sampler `name`: "ddim" (DDIMScheduler) or "dpmpp-2m" (DPMSolverMultistepScheduler's
    defaults), on the schedule of a scheduler_config.json dict (`fix_old`: see `pipeline_config`). `ddim_eta` and
    `generator` are DDIM's noise."""
    if name == "ddim":
        return ddim_sample(denoise, latents, pipeline_config(scheduler_config, fix_old), steps, ddim_eta, generator,
                           callback)
    if name == "dpmpp-2m":
        if ddim_eta:
            raise UserError(f"DDIM's eta ({ddim_eta}) does nothing with the dpmpp-2m sampler, which draws no noise; "
                            "drop --ddim-eta or use --sampler ddim.")
        return dpmpp_2m_sample(denoise, latents, dpm_config(scheduler_config, fix_old), steps, callback)
    raise UserError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}; pick one of those.")


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
