"""The Stable Diffusion pipeline with NPO guidance: a model folder loaded into our modules, eq. 10 of the paper, and
`generate`. This is the one place eq. 10 lives; sampling, reward training and the experiment all call it.

    pipe = pipeline.load_pipeline("path/to/sd15")               # or pipeline.DEFAULT_MODEL, the embedded one
    pipeline.load_offset(pipe, [("dpo.safetensors", 1.0)], "eta")   # η, the preference offset (UNet + text encoder)
    pipeline.load_offset(pipe, [("npo.safetensors", 1.0)], "delta") # δ, the NPO offset
    images = pipeline.generate(pipe, ["a red circle"], seeds=[0], alpha=1.0, beta=1.0)   # (B, 3, H, W) in [-1, 1]

NPO's guided prediction (sec. 3.2, eq. 10), with g the guidance scale in diffusers' convention:

    ε = ε_neg + g · (ε_pos − ε_neg),   ε_pos = ε(x_t, c; θ + η),   ε_neg = ε(x_t, c'; θ + α·η + β·δ)

computed with one copy of θ: η and δ stay unmerged LoRA offsets whose multipliers differ per batch row, and each
step is one forward of [x_t; x_t] (`npo_multipliers`, `guided_denoiser`). `merged_unets` builds the authors'
two weight sets instead, as a reference. A LoRA with text-encoder keys makes η (or δ) a pair of offsets, on the
UNet and on the text encoder; the same multipliers apply to both, so c' is encoded by θ_te + α·η_te + β·δ_te and
c by θ_te + η_te (eq. 10 read for the whole model). The sampler (DDIM or DPM-Solver++ 2M) only sees the denoiser.
"""
import os
from dataclasses import dataclass, field

import torch

import checkpoint
import clip
import lora
import sampler
import unet
from checkpoint import UserError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # the embedded shapes model


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion model, as plain modules."""
    unet: unet.UNet2DCondition
    vae: unet.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: clip.CLIPTokenizer
    scheduler_config: dict = field(default_factory=dict)
    path: str = ""

    @torch.no_grad()
    def encode_prompts(self, prompts, weights=None, clip_skip=0):
        """Text -> the text encoder's last hidden state (B, 77, D), the UNet's cross-attention context.

        `weights` ({name: multiplier}, a float or one value per prompt) set the text encoder's LoRA offsets, those
        it carries; `clip_skip` = k stops k layers early (diffusers' clip_skip; A1111's "Clip skip k + 1")."""
        ids = self.tokenizer(prompts).to(self.text_encoder_device)
        present = set(lora.offset_names(self.text_encoder))
        with lora.multipliers(self.text_encoder, **{k: v for k, v in (weights or {}).items() if k in present}):
            return self.text_encoder(ids, clip_skip)

    @property
    def text_encoder_device(self):
        return next(self.text_encoder.parameters()).device

    @property
    def image_size(self):
        """The model's own image size in pixels (512 for SD1.5)."""
        return self.unet.config.sample_size * self.vae.downscale


def resolve_device(spec):
    """The torch.device that `spec` names, refused in one sentence when this machine cannot use it (checked before
    loading, so a missing GPU is not reported as a damaged file)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {spec!r} is not a device; pass cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"--device {spec} needs CUDA, and this machine has none ({build}); pass --device cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {spec} does not exist: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}; pass one of those.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {spec} needs Apple's MPS, which this machine lacks; pass --device cpu.")
    elif device.type != "cpu":
        raise UserError(f"--device {spec}: npo runs on cpu, cuda and mps devices; pass one of those.")
    return device


def load_pipeline(path, dtype=torch.float32, device="cpu", variant=None):
    """Load a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

    Every part loads strictly into our modules; `variant="fp16"` reads `*.fp16.safetensors`."""
    if not os.path.exists(path):
        raise UserError(f"model path {path} does not exist; pass --model a diffusers model folder.")
    if not os.path.isdir(path):
        raise UserError(f"model path {path} is a file; pass --model a diffusers model folder "
                        "(with unet/, vae/, text_encoder/, tokenizer/).")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, part)):
            raise UserError(f"{path} has no {part}/ folder; pass --model a diffusers model folder "
                            "(with unet/, vae/, text_encoder/, tokenizer/).")
    device = resolve_device(device)
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        return Pipeline(
            unet=unet.load_unet(os.path.join(path, "unet"), dtype, device, variant),
            vae=unet.load_vae(os.path.join(path, "vae"), dtype, device, variant),
            text_encoder=clip.load_text_encoder(os.path.join(path, "text_encoder"), dtype, device, variant),
            tokenizer=clip.load_tokenizer(os.path.join(path, "tokenizer")),
            scheduler_config=checkpoint.read_json(scheduler_path) if os.path.exists(scheduler_path) else {},
            path=path,
        )
    except (torch.OutOfMemoryError, MemoryError):
        raise UserError(f"ran out of {device.type.upper()} memory while loading {path} onto {device}; pass "
                        "--dtype bfloat16 (or float16 on CUDA), free memory, or use another --device.")


def read_scheduler_config(path):
    """A scheduler config to sample with instead of the model folder's: a scheduler_config.json file, or a folder
    (such as another model's scheduler/) holding one. Its values are checked where a sampler reads them."""
    file = os.path.join(path, "scheduler_config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"--scheduler-config {path} is not a file or a folder with scheduler_config.json; pass one.")
    config = checkpoint.read_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a JSON object of scheduler fields; pass a diffusers scheduler_config.json.")
    return config


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# NPO guidance (sec. 3.2 of the paper): one small function per idea.

def npo_multipliers(batch, alpha, beta, device="cpu"):
    """Eq. 10 as LoRA multipliers for one batched forward of [x_t (negative rows); x_t (positive rows)].

    The negative / unconditional rows run θ + α·η + β·δ, the positive rows θ + η:
        η: [α]*B + [1]*B,   δ: [β]*B + [0]*B.
    α = β = 1 is the authors' default; β = 0 is the weight-merge baseline (eq. 4); α = 1, δ absent is plain CFG.
    α and β may also hold one value per image (a sweep over α × β in one batch)."""
    ones = torch.ones(batch, device=device)
    alpha, beta = (torch.as_tensor(v, dtype=torch.float32, device=device).expand(batch) for v in (alpha, beta))
    return {"eta": torch.cat([alpha, ones]), "delta": torch.cat([beta, 0 * ones])}


def guided_denoiser(unet, neg_embeds, pos_embeds, guidance, weights):
    """ε(x_t, t) of classifier-free guidance with one copy of θ: a batched forward of [x_t; x_t] whose LoRA offsets
    run at `weights` ({name: multiplier}, a float or one value per row of the doubled batch); offsets the UNet
    does not carry are skipped. The multipliers are set inside each call, so a checkpointed call recomputed in
    the backward pass (reward training) sees them too."""
    context = torch.cat([neg_embeds, pos_embeds])
    present = set(lora.offset_names(unet))
    weights = {k: v for k, v in weights.items() if k in present}

    def denoise(x, t):
        with lora.multipliers(unet, **weights):
            eps_neg, eps_pos = unet(torch.cat([x, x]), t, context).chunk(2)
        return sampler.cfg_combine(eps_neg, eps_pos, guidance)
    return denoise


def npo_denoiser(unet, neg_embeds, pos_embeds, guidance, alpha=1.0, beta=1.0):
    """The guided ε of NPO (eq. 10): η at [α, 1] and δ at [β, 0] over the [negative; positive] rows."""
    weights = npo_multipliers(len(pos_embeds), alpha, beta, pos_embeds.device)
    return guided_denoiser(unet, neg_embeds, pos_embeds, guidance, weights)


def merged_unets(unet, alpha=1.0, beta=1.0):
    """The authors' way, kept as a reference: two full weight sets, θ+α·η+β·δ for ε_neg and θ+η for ε_pos.

    A `torch.compile`d UNet is merged from the module inside it, and the two weight sets are compiled too."""
    base = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper keeps the module as _orig_mod
    present = set(lora.offset_names(base))

    def build(weights):
        state = lora.merged_state_dict(base, {k: v for k, v in weights.items() if k in present})
        model = checkpoint.build_on_meta(lambda: type(base)(base.config))
        model.load_state_dict(state, strict=True, assign=True)
        model = model.eval().requires_grad_(False)
        return torch.compile(model) if base is not unet else model
    return build({"eta": alpha, "delta": beta}), build({"eta": 1.0})


def merged_denoiser(unet_neg, unet_pos, neg_embeds, pos_embeds, guidance):
    """Two passes per step, one per weight set (what the authors' code runs)."""
    def denoise(x, t):
        return sampler.cfg_combine(unet_neg(x, t, neg_embeds), unet_pos(x, t, pos_embeds), guidance)
    return denoise


def load_offset(pipe, files, name):
    """η or δ from LoRA files, `files` = [(path, weight), ...]: their weighted sum as the offset `name`, on the UNet
    and, for files with text-encoder keys, on the text encoder (eq. 10 then weighs both parts alike)."""
    return lora.load_loras({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, files, name)


def latents_and_sampler(pipe, seeds, height, width, sampler_name, steps, ddim_eta, callback):
    """x_T for each seed (diffusers' draw from a seeded CPU generator per image), and `run(denoise)` -> x_0 with the
    sampler `sampler_name` on the model's scheduler config (the generators go on feeding DDIM's noise when η > 0)."""
    dtype, device = next(pipe.unet.parameters()).dtype, next(pipe.unet.parameters()).device
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = sampler.initial_latents(gens, height, width, pipe.unet.config.in_channels, device, dtype,
                                      pipe.vae.downscale)

    def run(denoise):
        return sampler.sample(sampler_name, denoise, latents, pipe.scheduler_config, steps, ddim_eta, gens, callback)
    return run


@torch.no_grad()
def generate(pipe, prompts, seeds, negative_prompt="", steps=50, guidance=7.5, ddim_eta=0.0, alpha=1.0, beta=1.0,
             height=None, width=None, mode="batched", unets=None, callback=None, sampler="ddim", clip_skip=0):
    """Prompts -> images (B, 3, H, W) in [-1, 1], with NPO guidance from the offsets named "eta" / "delta" on the UNet
    (and on the text encoder, for LoRAs with text-encoder keys).

    Image i starts from `initial_latents(seeds[i])`, as diffusers' pipeline with a list of seeded CPU generators.
    `negative_prompt`: one for all images or one per image. `sampler`: "ddim" or "dpmpp-2m" (sampler.SAMPLERS).
    mode "batched" (default): one forward of [x_t; x_t] per step with per-row LoRA multipliers (one copy of θ).
    mode "merged": the authors' two weight sets and two passes (pass `unets=merged_unets(...)` to reuse them).
    The text encoder's offsets follow eq. 10 in both: c' is encoded with α·η + β·δ, c with η.
    guidance <= 1 runs the positive branch alone (θ+η), as diffusers does."""
    height, width = height or pipe.image_size, width or pipe.image_size
    dtype = next(pipe.unet.parameters()).dtype
    prompts = list(prompts)
    run = latents_and_sampler(pipe, seeds, height, width, sampler, steps, ddim_eta, callback)
    if guidance <= 1:
        positive = {"eta": 1.0, "delta": 0.0}  # θ + η, on the text encoder and the UNet (other UNet offsets off)
        pos = pipe.encode_prompts(prompts, positive, clip_skip).to(dtype)
        with lora.multipliers(pipe.unet, **{k: positive.get(k, 0.0) for k in lora.offset_names(pipe.unet)}):
            latents = run(lambda x, t: pipe.unet(x, t, pos))
    else:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        weights = npo_multipliers(len(prompts), alpha, beta, pipe.text_encoder_device)
        neg, pos = pipe.encode_prompts(negatives + prompts, weights, clip_skip).to(dtype).chunk(2)
        if mode == "merged":
            unet_neg, unet_pos = unets or merged_unets(pipe.unet, alpha, beta)
            denoise = merged_denoiser(unet_neg, unet_pos, neg, pos, guidance)
        else:
            denoise = npo_denoiser(pipe.unet, neg, pos, guidance, alpha, beta)
        latents = run(denoise)
    return pipe.vae.decode(latents.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)
