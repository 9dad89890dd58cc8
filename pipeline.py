"""The Stable Diffusion pipeline: a model folder or single-file checkpoint loaded strictly into our modules (UNet,
VAE, CLIP text encoders, tokenizers, scheduler config), with the encoding of prompts into each branch's
conditioning. NPO guidance (eq. 10) on a loaded pipeline, and `generate`, are guided.py.

    pipe = pipeline.load_pipeline("path/to/sd15")               # or pipeline.DEFAULT_MODEL, the embedded one

A model is a diffusers folder or a single-file checkpoint (singlefile.py unpacks it into the same configs and
state dicts); `load_unet` reads the UNet alone of either, for --eta-model and extract-lora. An SDXL folder or file loads
into the same Pipeline (plus `text_encoder_2`, `tokenizer_2`). Its UNet takes more than the text embeddings: a
branch's conditioning is then a dict of the UNet's keyword arguments (`Pipeline.conditioning`: context, pooled text
embedding, size time ids), and eq. 10 runs unchanged on it.
A ModelScope text-to-video folder (its unet/config.json names UNet3DConditionModel) loads into the same Pipeline with
video.py's UNet (`Pipeline.is_video`): latents (B, C, F, h, w), the same conditioning, eq. 10 unchanged.

Prompts are read as diffusers reads them, or with `pipe.prompt_syntax = "a1111"` as A1111 does (emphasis, prompts of
any length in 77-token chunks: prompt_syntax.py); only the encoding functions differ.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import checkpoint
from . import clip
from . import lora
from . import prompt_syntax
from . import sampler
from . import singlefile
from . import unet
from . import video
from . import videocrafter
from .checkpoint import UserError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # the embedded shapes model
DEFAULT_VIDEO_MODEL = os.path.join(DEFAULT_MODEL, "video")  # the embedded video model (moving shapes), --video
TOKENIZER = os.path.join(DEFAULT_MODEL, "tokenizer")  # CLIP's BPE vocabulary, for single files (they have none)


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion model, as plain modules."""
    unet: unet.UNet2DCondition
    vae: unet.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: clip.CLIPTokenizer
    scheduler_config: dict = field(default_factory=dict)
    path: str = ""
    origin: str = ""  # what was read: a folder, or a single file with its family and prediction type (and why)
    eta_unet: Optional[unet.UNet2DCondition] = None  # θ_ft of a dense η (attach_eta_model); then unet holds θ + α·η
    eta_alpha: Optional[float] = None
    # a dense δ (attach_npo_model): β is in the weights; with θ on the positive branch, npo_unet holds θ + β·δ
    npo_unet: Optional[unet.UNet2DCondition] = None
    npo_beta: Optional[float] = None
    # SDXL only: the second text encoder (OpenCLIP bigG with its projection), its tokenizer (pad token "!"), and
    # model_index.json's force_zeros_for_empty_prompt (the unconditional branch is zeros when no negative prompt is given)
    text_encoder_2: Optional[clip.CLIPTextModelWithProjection] = None
    tokenizer_2: Optional[clip.CLIPTokenizer] = None
    force_zeros_for_empty_prompt: bool = False
    # how prompts are read: "plain" (diffusers': one 77-token chunk, brackets are text) or "a1111" (A1111's
    # emphasis and chunks of 75 tokens, prompt_syntax.py); a sampling option, training reads prompts plainly
    prompt_syntax: str = "plain"
    # the model's own sampling settings where its authors' differ from diffusers' (VideoCrafter2: guidance, fps,
    # frames, height, width, steps, ddim_eta of their script; videocrafter.DEFAULTS)
    defaults: dict = field(default_factory=dict)

    @torch.no_grad()
    def encode_prompts(self, prompts, weights=None, clip_skip=0):
        """Text -> the UNet's cross-attention context (B, 77, D): the text encoder's last hidden state (for SDXL the
        two encoders' penultimate ones, `encode_sdxl`).

        `weights` ({name: multiplier}, a float or one value per prompt) set the text encoder's LoRA offsets, those
        it carries; `clip_skip` = k stops k layers early (diffusers' clip_skip; A1111's "Clip skip k + 1").
        With `prompt_syntax` "a1111" each 77-token chunk is encoded on its own, weighted (A1111's emphasis) and the
        chunks concatenated: (B, 77·n, D), every row padded to the longest prompt's n chunks."""
        if self.is_sdxl:
            return self.encode_sdxl(prompts)[0]
        device, present = self.text_encoder_device, set(lora.offset_names(self.text_encoder))
        with lora.multipliers(self.text_encoder, **{k: v for k, v in (weights or {}).items() if k in present}):
            if self.prompt_syntax == "plain":
                return self.text_encoder(self.tokenizer(prompts).to(device), clip_skip)
            ids, emphasis = prompt_syntax.tokenize(self.tokenizer, prompts)
            return torch.cat([prompt_syntax.emphasize(self.text_encoder(ids[:, i].to(device), clip_skip), emphasis[:, i])
                              for i in range(ids.shape[1])], dim=1)

    @torch.no_grad()
    def conditioning(self, prompts, time_ids=None, weights=None, clip_skip=0):
        """The UNet's conditioning of `prompts`, as the keyword arguments of its call, in the UNet's dtype:
        `encoder_hidden_states` (B, 77, D); for SDXL also `text_embeds` (B, 1280), the pooled embedding of encoder 2,
        and `time_ids` (B, 6), the size conditioning (`time_ids`: one row for every prompt, or one row each).
        `weights` and `clip_skip` as in `encode_prompts` (SD1/2 only)."""
        dtype = next(self.unet.parameters()).dtype
        if not self.is_sdxl:
            return {"encoder_hidden_states": self.encode_prompts(prompts, weights, clip_skip).to(dtype)}
        if clip_skip:
            raise UserError("--clip-skip is for SD1.x/2.x text encoders; SDXL already reads the penultimate layer, "
                            "so drop it.")
        context, pooled = self.encode_sdxl(prompts)
        if time_ids is None:
            raise ValueError("SDXL's conditioning needs its time ids (Pipeline.time_ids)")
        ids = torch.as_tensor(time_ids, dtype=dtype, device=context.device).reshape(-1, 6).expand(len(context), 6)
        return {"encoder_hidden_states": context.to(dtype), "text_embeds": pooled.to(dtype), "time_ids": ids}

    def negative_conditioning(self, negative_prompt, positive):
        """The unconditional branch's conditioning beside `positive` (same rows and time ids), as diffusers' pipelines
        build it: `negative_prompt` (one text, or one per row) encoded, "" when None; but zeros for SDXL when it is
        None and the model says force_zeros_for_empty_prompt (StableDiffusionXLPipeline with negative_prompt=None)."""
        if negative_prompt is None and self.is_sdxl and self.force_zeros_for_empty_prompt:
            return {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in positive.items()}
        negatives = negative_rows(negative_prompt, len(positive["encoder_hidden_states"]))
        return self.conditioning(negatives, positive.get("time_ids"))

    @property
    def is_sdxl(self):
        return self.text_encoder_2 is not None

    @property
    def is_video(self):
        """A video model (ModelScope's UNet3DConditionModel): latents and outputs are (B, C, F, h, w)."""
        return video.is_video(self.unet)

    @property
    def default_guidance(self):
        """The CFG scale when none is given: 7.5, diffusers' SD default; 5 for SDXL, as the NPO authors' SDXL runs;
        9 for a video model, diffusers' TextToVideoSDPipeline default; the model's `defaults` first (VideoCrafter2: 12)."""
        return self.defaults.get("guidance", 5.0 if self.is_sdxl else 9.0 if self.is_video else 7.5)

    @property
    def default_frames(self):
        """A video model's own frame count when none is given (VideoCrafter2: 16), else None."""
        return self.defaults.get("frames")

    @property
    def default_fps(self):
        """A video model's own frame rate when none is given (VideoCrafter2: 28, its conditioning's), else None."""
        return self.defaults.get("fps")

    def ddim_config(self):
        """The DDIM config that diffusers' pipeline for this model runs with `DDIMScheduler.from_config` of the
        folder's scheduler config: StableDiffusionPipeline fixes old configs (sampler.pipeline_config);
        StableDiffusionXLPipeline takes the config as it is, DDIMScheduler's defaults filling the fields it lacks
        (an SDXL folder ships an EulerDiscreteScheduler config, with or without clip_sample, set_alpha_to_one)."""
        return sampler.pipeline_config(self.scheduler_config, fix_old=not self.is_sdxl)

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
        prompt through its own tokenizer (the same BPE; tokenizer_2 pads with "!").

        With `prompt_syntax` "a1111": (B, 77·n, 2048) of n chunks, each encoder's features weighted and its mean
        restored on its own (A1111 wraps each encoder alike), and the pooled embedding of the first chunk (A1111's)."""
        device = self.text_encoder_device
        if self.prompt_syntax == "plain":
            h1, _ = self.text_encoder.penultimate_and_pooled(self.tokenizer(prompts).to(device))
            h2, pooled = self.text_encoder_2.penultimate_and_pooled(self.tokenizer_2(prompts).to(device))
            return torch.cat([h1, h2], dim=-1), pooled
        tokenizers, encoders = (self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2)
        n = max(prompt_syntax.tokenize(t, prompts)[0].shape[1] for t in tokenizers)  # the same BPE: the same n
        read = [prompt_syntax.tokenize(t, prompts, min_chunks=n) for t in tokenizers]
        chunks = []
        for i in range(n):
            features = []
            for encoder, (ids, emphasis) in zip(encoders, read):
                h, last_pooled = encoder.penultimate_and_pooled(ids[:, i].to(device))
                features.append(prompt_syntax.emphasize(h, emphasis[:, i]))
            chunks.append(torch.cat(features, dim=-1))
            if i == 0:
                pooled = last_pooled  # encoder 2's, of the first chunk
        return torch.cat(chunks, dim=1), pooled

    def time_ids(self, height, width, original_size=None, crop_top_left=(0, 0), target_size=None):
        """SDXL's size conditioning (Podell et al. 2023, sec. 2.2): original (H, W) + crop (top, left) + target (H, W),
        by default the image's own size and no crop (diffusers' `_get_add_time_ids`); None for SD1/2."""
        if not self.is_sdxl:
            return None
        return [*(original_size or (height, width)), *crop_top_left, *(target_size or (height, width))]


def negative_rows(negative_prompt, rows):
    """One negative prompt per row: None is "", a text is repeated, a list must have one per row."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt or ""] * rows
    if len(negative_prompt) != rows:
        raise ValueError(f"{len(negative_prompt)} negative prompts for {rows} prompts")
    return list(negative_prompt)


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


PREDICTION_TYPES = ("epsilon", "v_prediction")


def load_pipeline(path, dtype=torch.float32, device="cpu", variant=None, vae=None, text_encoder=None,
                  prediction_type=None, ema=False):
    """Load a model: a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; SDXL adds
    `text_encoder_2/` and `tokenizer_2/`) or a single-file checkpoint of SD1.x / SD2.x / SDXL base (.safetensors, or a
    .ckpt read with torch.load(weights_only=True)).

    Every part loads strictly into our modules; `variant="fp16"` reads a folder's `*.fp16.safetensors`. `vae` and
    `text_encoder` are folders that replace those parts (or supply them to a UNet-only file); `prediction_type`
    ("epsilon" or "v_prediction") overrides the model's; `ema` takes a single file's EMA copy of the UNet."""
    if not os.path.exists(path):
        raise UserError(f"model path {path} does not exist; pass --model a diffusers model folder or a "
                        ".safetensors / .ckpt checkpoint.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; "
                        "pass epsilon (SD1.x, SD2.x-base) or v_prediction (SD2.x 768-px models).")
    device = resolve_device(device)
    try:
        load = load_single_file if os.path.isfile(path) else load_folder
        pipe = load(path, dtype, device, variant, vae, text_encoder, ema, prediction_type)
    except (torch.OutOfMemoryError, MemoryError):
        raise UserError(f"ran out of {device.type.upper()} memory while loading {path} onto {device}; pass "
                        "--dtype bfloat16 (or float16 on CUDA), free memory, or use another --device.")
    check_latent_channels(pipe)
    if pipe.is_sdxl:
        return check_sdxl(pipe)
    width, context = pipe.text_encoder.config.hidden_size, pipe.unet.config.per_block("cross_attention_dim")[0]
    if width != context:
        raise UserError(f"the text encoder is {width} wide but the UNet attends to {context}-wide text; pass a "
                        "--text-encoder of the same model family (768: SD1.x, 1024: SD2.x).")
    return pipe


def check_latent_channels(pipe):
    """The UNet must denoise the VAE's latents alone: in and out channels = latent_channels (4). An inpainting UNet
    also takes the masked image's latents and the mask (9 channels), an instruct-pix2pix one the image's (8)."""
    cfg, latent = pipe.unet.config, pipe.vae.config.latent_channels
    if cfg.in_channels != latent or cfg.out_channels != latent:
        raise UserError(f"{pipe.path} has a UNet of {cfg.in_channels} input channels for {latent}-channel latents, an "
                        "inpainting or image-conditioned model, which npo does not sample; pass a text-to-image model "
                        "(e.g. SD1.5 itself, not sd-v1-5-inpainting).")


def add_source_arguments(g):
    """The flags that say how to read --model (npo.py sample, train, info); `source_options` passes them on."""
    g.add_argument("--vae", help="a vae/ folder (or a model folder with one) replacing the model's VAE, or supplying "
                                 "it to a single file without one")
    g.add_argument("--text-encoder", help="a text_encoder/ folder (or a model folder with one) replacing the model's, "
                                          "or supplying it to a single file without one")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="what the UNet predicts, overriding the model's (a single file: its v_pred key, else "
                        "A1111's probe for SD2, else epsilon)")
    g.add_argument("--ema", action="store_true", help="use the EMA copy of the UNet in a single-file checkpoint")


def source_options(args):
    return dict(vae=args.vae, text_encoder=args.text_encoder, prediction_type=args.prediction_type, ema=args.ema)


def part_folder(path, part, flag):
    """A part's folder: `path` itself (config.json inside) or `path/<part>` (a model folder)."""
    for folder in (path, os.path.join(path, part)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise UserError(f"{flag} {path} is neither a {part}/ folder (with config.json) nor a model folder holding one; "
                    f"pass the {part}/ folder of a diffusers model.")


def folder_notes(path):
    """What a model folder's `npo_model.json` says that diffusers' files do not ({} without one): `shared_parts`, the
    parts it borrows from another folder, relative to it (the embedded video model, weights/video/, takes weights/'s
    VAE, text encoder and tokenizer as they are, {"vae": "../vae", ...}, instead of shipping copies), and `defaults`,
    its own sampling settings (`Pipeline.defaults`: the embedded video model's 8 frames)."""
    notes = os.path.join(path, "npo_model.json")
    return checkpoint.read_json(notes) if os.path.isfile(notes) else {}


def shared_part(path, part):
    """`path/part`, or the folder `npo_model.json` names for it when `path` has none."""
    if os.path.isdir(os.path.join(path, part)):
        return os.path.join(path, part)
    return os.path.normpath(os.path.join(path, folder_notes(path).get("shared_parts", {}).get(part, part)))


def load_folder(path, dtype, device, variant, vae, text_encoder, ema, prediction_type):
    if ema:
        raise UserError(f"--ema takes the EMA weights of a single-file checkpoint, and {path} is a diffusers folder "
                        "(one set of weights); drop --ema.")
    needed = ["unet", "tokenizer"] + [p for p, o in (("vae", vae), ("text_encoder", text_encoder)) if o is None]
    for part in needed:
        if not os.path.isdir(shared_part(path, part)):
            lent = folder_notes(path).get("shared_parts", {}).get(part)
            raise UserError(f"{path} has no {part}/ folder" + (f" (its npo_model.json lends it from {lent}, which is "
                            "not there)" if lent else "") + "; pass --model a diffusers model folder "
                            "(with unet/, vae/, text_encoder/, tokenizer/) or a single-file checkpoint.")
    for part in ("text_encoder_2", "tokenizer_2") if is_sdxl_folder(path) else ():
        if not os.path.isdir(os.path.join(path, part)):
            raise UserError(f"{path} is an SDXL folder (its UNet has addition_embed_type 'text_time') without a {part}/ "
                            "folder; pass --model a complete SDXL folder (with text_encoder_2/ and tokenizer_2/ too).")
    vae = part_folder(vae, "vae", "--vae") if vae else shared_part(path, "vae")
    text_encoder = part_folder(text_encoder, "text_encoder", "--text-encoder") if text_encoder else \
        shared_part(path, "text_encoder")
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler = checkpoint.read_json(scheduler_path) if os.path.exists(scheduler_path) else {}
    if prediction_type:
        scheduler["prediction_type"] = prediction_type
    sdxl = is_sdxl_folder(path)
    return Pipeline(
        unet=load_unet_folder(os.path.join(path, "unet"), dtype, device, variant),
        vae=load_vae_for(vae, dtype, device, variant, sdxl),
        text_encoder=clip.load_text_encoder(text_encoder, dtype, device, variant),
        tokenizer=clip.load_tokenizer(shared_part(path, "tokenizer")),
        scheduler_config=scheduler, path=path, defaults=folder_notes(path).get("defaults", {}),
        origin=f"diffusers {'SDXL ' if sdxl else ''}folder {path}" +
               (f", {prediction_type} (--prediction-type)" if prediction_type else ""),
        **(load_sdxl_parts(path, dtype, device, variant) if sdxl else {}),
    )


def load_single_file(path, dtype, device, variant, vae, text_encoder, ema, prediction_type):
    """A single-file checkpoint (singlefile.py), with the parts it lacks taken from the `vae` / `text_encoder` folders.

    It carries no tokenizer or scheduler: the shipped CLIP vocabulary (weights/tokenizer) with the family's padding
    token, and the family's schedule with the prediction type decided by `prediction_type_of`."""
    name = os.path.basename(path)
    if variant:
        raise UserError(f"--variant picks the files of a diffusers folder, and {name} is a single file; drop it.")
    if videocrafter.is_videocrafter(videocrafter.file_keys(path)):
        return load_videocrafter(path, dtype, device, vae, text_encoder, ema, prediction_type)
    needed = ["unet"] + [p for p, o in (("vae", vae), ("text_encoder", text_encoder)) if o is None]
    sf = singlefile.read(path, device, ema, needed + ["text_encoder_2"])
    missing = [p for p in needed if p not in sf.parts]
    if missing:
        names = {"vae": "VAE (first_stage_model.*)", "text_encoder": "text encoder (cond_stage_model.* or "
                 "conditioner.embedders.0.*)"}
        flags = {"vae": "--vae FOLDER", "text_encoder": "--text-encoder FOLDER"}
        raise UserError(f"{name} holds no {' and no '.join(names[p] for p in missing)}; pass "
                        f"{' and '.join(flags[p] for p in missing)} (the vae/ or text_encoder/ folder of its base model).")
    if sf.family == singlefile.SDXL and "text_encoder_2" not in sf.parts:
        raise UserError(f"{name} holds an SDXL UNet without SDXL base's second text encoder (conditioner.embedders.1."
                        "model.*, OpenCLIP bigG); npo loads SDXL base files with both encoders (not the refiner).")
    sdxl = sf.family == singlefile.SDXL
    config, state = sf.parts["unet"]
    model = unet.build_unet(unet.unet_config(config, path), state, path, dtype)
    if "vae" in sf.parts:
        vae_cfg = unet.vae_config(sf.parts["vae"][0], path)
        vae_model = unet.build_vae(vae_cfg, sf.parts["vae"][1], path, vae_dtype(vae_cfg, dtype, sdxl))
    else:
        vae_model = load_vae_for(part_folder(vae, "vae", "--vae"), dtype, device, None, sdxl)
    if "text_encoder" in sf.parts:
        config, state = sf.parts["text_encoder"]
        text = clip.build_text_encoder(clip.text_config(config, path), state, path, dtype)
    else:
        text = clip.load_text_encoder(part_folder(text_encoder, "text_encoder", "--text-encoder"), dtype, device)
    prediction, why = prediction_type_of(model, sf, prediction_type)
    if sf.family == singlefile.SD2 and prediction == "v_prediction":
        model.config.sample_size = 96  # SD2.x v-models are 768-px models (SD2.1's config); the ε base is 512 px
    scheduler = singlefile.SDXL_SCHEDULER if sdxl else singlefile.SCHEDULER
    pipe = Pipeline(unet=model, vae=vae_model, text_encoder=text,
                    tokenizer=clip.load_tokenizer(TOKENIZER, singlefile.PAD_TOKEN[sf.family]),
                    scheduler_config={**scheduler, "prediction_type": prediction}, path=path,
                    origin=f"single file {name}: {sf.family}{', EMA UNet' if ema else ''}, {prediction} ({why})")
    return add_sdxl_parts(pipe, sf, dtype) if sdxl else pipe


def load_videocrafter(path, dtype, device, vae, text_encoder, ema, prediction_type):
    """VideoCrafter2's model.ckpt (videocrafter.py): its UNet with the fps embedding, SD's VAE, OpenCLIP ViT-H's text
    tower read at the penultimate layer as SD2's (pad token "!"), its authors' DDIM with the x̂0 rescale, and their
    script's sampling defaults."""
    name = os.path.basename(path)
    flags = [f for f, given in (("--vae", vae), ("--text-encoder", text_encoder), ("--ema", ema),
                                ("--prediction-type", prediction_type)) if given]
    if flags:
        raise UserError(f"{name} is a VideoCrafter2 checkpoint, whole and ε-predicting without EMA copy, which npo loads "
                        f"as it is; drop {', '.join(flags)}.")
    model, vae_model, text = videocrafter.load_parts(path, dtype, device)
    return Pipeline(unet=model, vae=vae_model, text_encoder=text,
                    tokenizer=clip.load_tokenizer(TOKENIZER, singlefile.PAD_TOKEN[singlefile.SD2]),
                    scheduler_config=dict(videocrafter.SCHEDULER), path=path, defaults=dict(videocrafter.DEFAULTS),
                    origin=f"single file {name}: VideoCrafter2, epsilon, DDIM with its x̂0 rescale")


def add_sdxl_parts(pipe, sf, dtype):
    """The Pipeline fields only SDXL has, from a single file (load_sdxl_parts reads them from a folder): bigG with its
    projection, a tokenizer padding with "!", and SDXL base's force_zeros_for_empty_prompt."""
    config, state = sf.parts["text_encoder_2"]
    pipe.text_encoder_2 = clip.build_text_encoder(clip.text_config(config, sf.path), state, sf.path, dtype,
                                                  projection=True)
    pipe.tokenizer_2 = clip.load_tokenizer(TOKENIZER, singlefile.PAD_TOKEN_2)
    pipe.force_zeros_for_empty_prompt = True
    return pipe


def prediction_type_of(model, sf, override=None):
    """ε or v for a single file, which does not say in its weights, and how it was decided: --prediction-type, else a
    `v_pred` marker key (ComfyUI's convention), else A1111's probe for SD2 (`probe_v_prediction`), else ε (SD1, SDXL
    base)."""
    if override:
        return override, "--prediction-type"
    if sf.v_pred_marker:
        return "v_prediction", "the file's v_pred key"
    if sf.family in (singlefile.SD1, singlefile.SDXL):
        return "epsilon", f"{sf.family} family"
    is_v, value = probe_v_prediction(model)
    why = f"A1111's probe: mean(ε(x=0.5, t=999) − x) = {value:.2f}, v below −1"
    return ("v_prediction" if is_v else "epsilon"), why


@torch.no_grad()
def probe_v_prediction(model):
    """A1111's test of an SD2 UNet (modules/sd_models_config.py): x = 0.5 everywhere (1, 4, 8, 8), a context of two
    tokens at 0.5, t = 999; the model predicts v when mean(output − x) < −1. At t = 999 the input is nearly pure
    noise, so an ε-model returns about x itself, while v = √ᾱ ε − √(1−ᾱ) x_0 ≈ −x̂_0 lies far from it.
    Returns (is_v, the mean)."""
    p = next(model.parameters())
    x = torch.full((1, model.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, model.config.per_block("cross_attention_dim")[0]), 0.5, dtype=p.dtype, device=p.device)
    value = (model(x, 999, context) - x).float().mean().item()
    return value < -1, value


def load_unet(path, dtype=torch.float32, device="cpu", ema=False):
    """The UNet alone of a diffusers model folder, a `unet/` folder, or a single-file checkpoint (--eta-model,
    extract-lora); of a single file only the UNet's tensors are read."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass a diffusers model folder, a unet/ folder or a single-file "
                        "checkpoint.")
    if os.path.isfile(path) and videocrafter.is_videocrafter(videocrafter.file_keys(path)):
        if ema:
            raise UserError(f"{os.path.basename(path)} is a VideoCrafter2 checkpoint, which keeps no EMA copy; drop --ema.")
        return videocrafter.load_unet(path, dtype, device)
    if os.path.isfile(path):
        config, state = singlefile.read(path, device, ema, ("unet",)).parts["unet"]
        return unet.build_unet(unet.unet_config(config, path), state, path, dtype)
    return load_unet_folder(part_folder(path, "unet", "the model"), dtype, device)


def load_unet_folder(folder, dtype=torch.float32, device="cpu", variant=None):
    """A diffusers unet/ folder: the video UNet when its config.json names UNet3DConditionModel (ModelScope's
    text-to-video-ms), else SD's image UNet; both load strictly."""
    config = checkpoint.read_json(os.path.join(folder, "config.json"))
    load = video.load_unet3d if config.get("_class_name") == "UNet3DConditionModel" else unet.load_unet
    return load(folder, dtype, device, variant)


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


# ----------------------------------------------------------------------------------------------------------
# SDXL folders: text_encoder_2/ and tokenizer_2/ beside the SD parts, and a UNet with the "text_time" embedding.

def is_sdxl_folder(path):
    """An SDXL folder has text_encoder_2/, or a UNet config with addition_embed_type "text_time"."""
    unet_config = os.path.join(path, "unet", "config.json")
    return os.path.isdir(os.path.join(path, "text_encoder_2")) or (
        os.path.isfile(unet_config) and checkpoint.read_json(unet_config).get("addition_embed_type") == "text_time")


def vae_dtype(vae_config, dtype, sdxl):
    """The VAE's dtype: float32 for an SDXL VAE whose config says force_upcast (SDXL's own, which overflows in fp16:
    diffusers' SDXL pipeline upcasts it to decode, and its DPO script encodes in float32); else `dtype` (the
    fp16-fix VAE, and SD1/2's, which diffusers' SD pipeline runs in the pipeline's dtype)."""
    return torch.float32 if sdxl and vae_config.force_upcast else dtype


def load_vae_for(folder, dtype, device, variant, sdxl):
    """The VAE of a vae/ folder, in `vae_dtype`."""
    cfg = unet.vae_config(checkpoint.read_json(os.path.join(folder, "config.json")), folder)
    return unet.load_vae(folder, vae_dtype(cfg, dtype, sdxl), device, variant)


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
