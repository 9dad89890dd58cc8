"""The Stable Diffusion pipeline with NPO guidance: a model folder loaded into our modules, eq. 10 of the paper, and
`generate`. This is the one place eq. 10 lives; sampling, reward training and the experiment all call it.

    pipe = pipeline.load_pipeline("path/to/sd15")               # or pipeline.DEFAULT_MODEL, the embedded one
    lora.load_lora(pipe.unet, "dpo.safetensors", "eta")         # η, the preference offset
    lora.load_lora(pipe.unet, "npo.safetensors", "delta")       # δ, the NPO offset
    images = pipeline.generate(pipe, ["a red circle"], seeds=[0], alpha=1.0, beta=1.0)   # (B, 3, H, W) in [-1, 1]

NPO's guided prediction (sec. 3.2, eq. 10), with g the guidance scale in diffusers' convention:

    ε = ε_neg + g · (ε_pos − ε_neg),   ε_pos = ε(x_t, c; θ + η),   ε_neg = ε(x_t, c'; θ + α·η + β·δ)

computed with one copy of θ: η and δ stay unmerged LoRA offsets whose multipliers differ per batch row, and each
step is one forward of [x_t; x_t] (`npo_multipliers`, `guided_denoiser`). `merged_unets` builds the authors'
two weight sets instead, as a reference.

An SDXL folder loads into the same Pipeline (plus `text_encoder_2`, `tokenizer_2`). Its UNet takes more than the
text embeddings: a branch's conditioning is then a dict of the UNet's keyword arguments (`Pipeline.conditioning`:
context, pooled text embedding, size time ids), and eq. 10 runs unchanged on it.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

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
    # SDXL only: the second text encoder (OpenCLIP bigG with its projection), its tokenizer (pad token "!"), and
    # model_index.json's force_zeros_for_empty_prompt (the unconditional branch is zeros when no negative prompt is given)
    text_encoder_2: Optional[clip.CLIPTextModelWithProjection] = None
    tokenizer_2: Optional[clip.CLIPTokenizer] = None
    force_zeros_for_empty_prompt: bool = False

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Text -> the UNet's cross-attention context (B, 77, D): the text encoder's last hidden state (for SDXL the
        two encoders' penultimate ones, `encode_sdxl`)."""
        if self.is_sdxl:
            return self.encode_sdxl(prompts)[0]
        ids = self.tokenizer(prompts).to(self.text_encoder_device)
        return self.text_encoder(ids)

    @torch.no_grad()
    def conditioning(self, prompts, time_ids=None):
        """The UNet's conditioning of `prompts`, as the keyword arguments of its call, in the UNet's dtype:
        `encoder_hidden_states` (B, 77, D); for SDXL also `text_embeds` (B, 1280), the pooled embedding of encoder 2,
        and `time_ids` (B, 6), the size conditioning (`time_ids`: one row for every prompt, or one row each)."""
        dtype = next(self.unet.parameters()).dtype
        if not self.is_sdxl:
            return {"encoder_hidden_states": self.encode_prompts(prompts).to(dtype)}
        context, pooled = self.encode_sdxl(prompts)
        if time_ids is None:
            raise ValueError("SDXL's conditioning needs its time ids (Pipeline.time_ids)")
        ids = torch.as_tensor(time_ids, dtype=dtype, device=context.device).reshape(-1, 6).expand(len(context), 6)
        return {"encoder_hidden_states": context.to(dtype), "text_embeds": pooled.to(dtype), "time_ids": ids}

    def negative_conditioning(self, negative_prompt, positive):
        """The unconditional branch's conditioning beside `positive` (same rows and time ids), as diffusers' pipelines
        build it: `negative_prompt` encoded, "" when None; but zeros for SDXL when it is None and the model says
        force_zeros_for_empty_prompt (StableDiffusionXLPipeline with negative_prompt=None)."""
        if negative_prompt is None and self.is_sdxl and self.force_zeros_for_empty_prompt:
            return {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in positive.items()}
        return self.conditioning([negative_prompt or ""] * len(positive["encoder_hidden_states"]),
                                 positive.get("time_ids"))

    @property
    def is_sdxl(self):
        return self.text_encoder_2 is not None

    @property
    def default_guidance(self):
        """The CFG scale when none is given: 7.5, diffusers' SD default; 5 for SDXL, as the NPO authors' SDXL runs."""
        return 5.0 if self.is_sdxl else 7.5

    def ddim_config(self):
        """The DDIM config that diffusers' pipeline for this model runs with `DDIMScheduler.from_config` of the
        folder's scheduler config: StableDiffusionPipeline fixes old configs (sampler.pipeline_config);
        StableDiffusionXLPipeline takes the config as it is, DDIMScheduler's defaults filling the fields it lacks
        (an SDXL folder ships an EulerDiscreteScheduler config, with or without clip_sample, set_alpha_to_one)."""
        if self.is_sdxl:
            return sampler.DDIMConfig.from_dict({**DDIM_SCHEDULER_DEFAULTS, **self.scheduler_config})
        return sampler.pipeline_config(self.scheduler_config)

    @property
    def text_encoder_device(self):
        return next(self.text_encoder.parameters()).device

    @property
    def image_size(self):
        """The model's own image size in pixels (512 for SD1.5, 1024 for SDXL)."""
        return self.unet.config.sample_size * self.vae.downscale

    # SDXL's text and size conditioning, as StableDiffusionXLPipeline builds them.

    @torch.no_grad()
    def encode_sdxl(self, prompts):
        """(context (B, 77, 768 + 1280), pooled (B, 1280)): each encoder's penultimate hidden state, without the final
        layer norm, concatenated along the features; and encoder 2's projected EOS feature. Each encoder reads the
        prompt through its own tokenizer (the same BPE; tokenizer_2 pads with "!")."""
        device = self.text_encoder_device
        h1, _ = self.text_encoder.penultimate_and_pooled(self.tokenizer(prompts).to(device))
        h2, pooled = self.text_encoder_2.penultimate_and_pooled(self.tokenizer_2(prompts).to(device))
        return torch.cat([h1, h2], dim=-1), pooled

    def time_ids(self, height, width, original_size=None, crop_top_left=(0, 0), target_size=None):
        """SDXL's size conditioning (Podell et al. 2023, sec. 2.2): original (H, W) + crop (top, left) + target (H, W),
        by default the image's own size and no crop (diffusers' `_get_add_time_ids`); None for SD1/2."""
        if not self.is_sdxl:
            return None
        return [*(original_size or (height, width)), *crop_top_left, *(target_size or (height, width))]


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
    """Load a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; SDXL adds
    `text_encoder_2/` and `tokenizer_2/`).

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
    sdxl = is_sdxl_folder(path)
    for part in ("text_encoder_2", "tokenizer_2") if sdxl else ():
        if not os.path.isdir(os.path.join(path, part)):
            raise UserError(f"{path} is an SDXL folder (its UNet has addition_embed_type 'text_time') without a {part}/ "
                            "folder; pass --model a complete SDXL folder (with text_encoder_2/ and tokenizer_2/ too).")
    device = resolve_device(device)
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        pipe = Pipeline(
            unet=unet.load_unet(os.path.join(path, "unet"), dtype, device, variant),
            vae=unet.load_vae(os.path.join(path, "vae"), sdxl_vae_dtype(path, dtype) if sdxl else dtype, device, variant),
            text_encoder=clip.load_text_encoder(os.path.join(path, "text_encoder"), dtype, device, variant),
            tokenizer=clip.load_tokenizer(os.path.join(path, "tokenizer")),
            scheduler_config=checkpoint.read_json(scheduler_path) if os.path.exists(scheduler_path) else {},
            path=path,
            **(load_sdxl_parts(path, dtype, device, variant) if sdxl else {}),
        )
        return check_sdxl(pipe) if sdxl else pipe
    except (torch.OutOfMemoryError, MemoryError):
        raise UserError(f"ran out of {device.type.upper()} memory while loading {path} onto {device}; pass "
                        "--dtype bfloat16 (or float16 on CUDA), free memory, or use another --device.")


# ----------------------------------------------------------------------------------------------------------
# SDXL folders: text_encoder_2/ and tokenizer_2/ beside the SD parts, and a UNet with the "text_time" embedding.

# diffusers' DDIMScheduler defaults, where they differ from sampler.DDIMConfig's (which are SD's schedule)
DDIM_SCHEDULER_DEFAULTS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0,
                               set_alpha_to_one=True, clip_sample=True)


def is_sdxl_folder(path):
    """An SDXL folder has text_encoder_2/, or a UNet config with addition_embed_type "text_time"."""
    unet_config = os.path.join(path, "unet", "config.json")
    return os.path.isdir(os.path.join(path, "text_encoder_2")) or (
        os.path.isfile(unet_config) and checkpoint.read_json(unet_config).get("addition_embed_type") == "text_time")


def sdxl_vae_dtype(path, dtype):
    """float32 for a VAE whose config says force_upcast (SDXL's own, which overflows in fp16: diffusers' SDXL pipeline
    upcasts it to decode, and its DPO script encodes in float32); `dtype` for one that does not (the fp16-fix VAE)."""
    return torch.float32 if checkpoint.read_json(os.path.join(path, "vae", "config.json")).get("force_upcast", True) \
        else dtype


def load_sdxl_parts(path, dtype, device, variant):
    """The Pipeline fields only SDXL has: text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt. (A loader of
    other layouts, such as single-file checkpoints, fills the same fields and calls `check_sdxl`.)"""
    index_path = os.path.join(path, "model_index.json")
    index = checkpoint.read_json(index_path) if os.path.isfile(index_path) else {}
    return dict(
        text_encoder_2=clip.load_text_encoder(os.path.join(path, "text_encoder_2"), dtype, device, variant, projection=True),
        tokenizer_2=clip.load_tokenizer(os.path.join(path, "tokenizer_2")),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),  # the SDXL pipeline's default
    )


def check_sdxl(pipe):
    """The parts must fit together: the encoders' widths add up to the UNet's context, and the pooled embedding plus
    six time-id features to its added embedding (the SDXL refiner, with five ids, does not fit)."""
    cfg, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    context = te1.hidden_size + te2.hidden_size
    added = te2.projection_dim + 6 * (cfg.addition_time_embed_dim or 0)
    if set(cfg.per_block("cross_attention_dim")) != {context} or cfg.projection_class_embeddings_input_dim != added:
        raise UserError(f"{pipe.path}: the UNet expects a context of {cfg.cross_attention_dim} and an added embedding of "
                        f"{cfg.projection_class_embeddings_input_dim}, the text encoders give {context} and {added}; "
                        "npo samples SDXL base, whose parts come from one model.")
    return pipe


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


def as_kwargs(conditioning):
    """A branch's conditioning as the UNet's keyword arguments: text embeddings alone (SD1/2) are
    `encoder_hidden_states`; a dict (`Pipeline.conditioning`, SDXL's with its pooled text and time ids) is one."""
    return conditioning if isinstance(conditioning, dict) else {"encoder_hidden_states": conditioning}


def run_unet(unet, x, t, conditioning):
    """ε_θ(x_t, t, c) for one conditioning: `unet(x, t, context)` as for SD1/2, SDXL's pooled text and time ids
    added as keyword arguments."""
    c = as_kwargs(conditioning)
    return unet(x, t, c["encoder_hidden_states"], **{k: v for k, v in c.items() if k != "encoder_hidden_states"})


def cat_conditioning(*branches):
    """The conditionings of several branches stacked along the batch, for one forward over all their rows."""
    branches = [as_kwargs(b) for b in branches]
    return {k: torch.cat([b[k] for b in branches]) for k in branches[0]}


def guided_denoiser(unet, neg_embeds, pos_embeds, guidance, weights):
    """ε(x_t, t) of classifier-free guidance with one copy of θ: a batched forward of [x_t; x_t] whose LoRA offsets
    run at `weights` ({name: multiplier}, a float or one value per row of the doubled batch); offsets the UNet
    does not carry are skipped. The multipliers are set inside each call, so a checkpointed call recomputed in
    the backward pass (reward training) sees them too. Each branch's conditioning is its text embeddings, or for
    SDXL a `Pipeline.conditioning` dict that carries its own pooled embedding and time ids."""
    context = cat_conditioning(neg_embeds, pos_embeds)
    present = set(lora.offset_names(unet))
    weights = {k: v for k, v in weights.items() if k in present}

    def denoise(x, t):
        with lora.multipliers(unet, **weights):
            eps_neg, eps_pos = run_unet(unet, torch.cat([x, x]), t, context).chunk(2)
        return sampler.cfg_combine(eps_neg, eps_pos, guidance)
    return denoise


def npo_denoiser(unet, neg_embeds, pos_embeds, guidance, alpha=1.0, beta=1.0):
    """The guided ε of NPO (eq. 10): η at [α, 1] and δ at [β, 0] over the [negative; positive] rows."""
    context = as_kwargs(pos_embeds)["encoder_hidden_states"]
    weights = npo_multipliers(len(context), alpha, beta, context.device)
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
        return sampler.cfg_combine(run_unet(unet_neg, x, t, neg_embeds), run_unet(unet_pos, x, t, pos_embeds), guidance)
    return denoise


@torch.no_grad()
def generate(pipe, prompts, seeds, negative_prompt=None, steps=50, guidance=None, ddim_eta=0.0, alpha=1.0, beta=1.0,
             height=None, width=None, mode="batched", unets=None, callback=None,
             original_size=None, crop_top_left=(0, 0), target_size=None):
    """Prompts -> images (B, 3, H, W) in [-1, 1], with NPO guidance from the offsets named "eta" / "delta" on the UNet.

    Image i starts from `initial_latents(seeds[i])`, as diffusers' pipeline with a list of seeded CPU generators.
    mode "batched" (default): one forward of [x_t; x_t] per step with per-row LoRA multipliers (one copy of θ).
    mode "merged": the authors' two weight sets and two passes (pass `unets=merged_unets(...)` to reuse them).
    guidance <= 1 runs the positive branch alone (θ+η), as diffusers does; None is the model's default (7.5, SDXL 5).
    negative_prompt None is "", or zeros for SDXL (`Pipeline.negative_conditioning`). SDXL's size conditioning
    (`Pipeline.time_ids`) defaults to original = target = (height, width) and crop (0, 0)."""
    height, width = height or pipe.image_size, width or pipe.image_size
    guidance = pipe.default_guidance if guidance is None else guidance
    cfg = pipe.ddim_config()
    dtype, device = next(pipe.unet.parameters()).dtype, next(pipe.unet.parameters()).device
    pos = pipe.conditioning(list(prompts), pipe.time_ids(height, width, original_size, crop_top_left, target_size))
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = sampler.initial_latents(gens, height, width, pipe.unet.config.in_channels, device, dtype,
                                      pipe.vae.downscale)
    if guidance <= 1:
        with lora.multipliers(pipe.unet, **{k: 1.0 if k == "eta" else 0.0 for k in lora.offset_names(pipe.unet)}):
            denoise = lambda x, t: run_unet(pipe.unet, x, t, pos)  # noqa: E731
            latents = sampler.ddim_sample(denoise, latents, cfg, steps, ddim_eta, gens, callback)
    else:
        neg = pipe.negative_conditioning(negative_prompt, pos)
        if mode == "merged":
            unet_neg, unet_pos = unets or merged_unets(pipe.unet, alpha, beta)
            denoise = merged_denoiser(unet_neg, unet_pos, neg, pos, guidance)
        else:
            denoise = npo_denoiser(pipe.unet, neg, pos, guidance, alpha, beta)
        latents = sampler.ddim_sample(denoise, latents, cfg, steps, ddim_eta, gens, callback)
    return pipe.vae.decode(latents.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)
