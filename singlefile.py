"""Single-file checkpoints as civitai / A1111 users hold them: the original LDM (CompVis) layout of SD1.x and SD2.x,
and Stability's (sgm) layout of SDXL base, unpacked into what a diffusers folder holds, each part's `config.json`
fields and its state dict in diffusers' names, so that the part loads exactly as from a folder
(pipeline.load_pipeline dispatches here for a file).

    model.diffusion_model.   the UNet: input_blocks / middle_block / output_blocks (SDXL: plus label_emb, the
                             "text_time" embedding of the pooled text and the size ids)
    first_stage_model.       the VAE: encoder.down.i / decoder.up.i (levels reversed) / mid.attn_1 (1x1 convs)
    cond_stage_model.        the text encoder: SD1 `transformer.` (transformers' CLIP names),
                             SD2 `model.` (OpenCLIP: resblocks, q/k/v fused in in_proj, ln_final)
    conditioner.embedders.   SDXL's two text encoders: `0.transformer.` CLIP ViT-L (transformers' names, as SD1)
                             and `1.model.` OpenCLIP ViT-bigG (as SD2, with its text projection)

The rest of a file is not a weight of the pipeline and is never read: the DDPM schedule buffers (betas,
alphas_cumprod, ...), the EMA copy of the UNet (`model_ema.`, chosen instead with `ema=True`), OpenCLIP's
logit scale and SD2's text projection, and SD2's last text layer: SD2 conditions on the penultimate layer of
OpenCLIP (then ln_final), so, as in diffusers' SD2 text_encoder/ folders, that layer is dropped and not built.
SDXL keeps every layer of both encoders (its context is their penultimate layers; its pooled embedding is bigG's
last layer, ln_final and text projection).

The family is read from shapes (no hub config, no network): the cross-attention context width, 768 for SD1 (CLIP
ViT-L), 1024 for SD2 (OpenCLIP ViT-H) and 2048 for SDXL (768 + 1280, both encoders); an SDXL UNet also has a
label_emb; at other widths (the tests' tiny models) from the projections around the transformers, 1x1 convs in
SD1 and Linear layers in SD2. The configs are each family's published values (SD1.5's, SD2.1's and SDXL base's
config.json files) except where shapes say otherwise: channels, resnets per level, which levels attend, the
transformer depth (per level in SDXL), the context width, the added embedding's input width, the text encoders'
width, depth, MLP width and projection. Whether the model predicts ε or v is not in the weights:
pipeline.load_pipeline decides it (a `v_pred` marker key here, else A1111's probe for SD2).

Loading keeps one copy of the weights: a safetensors file is memory-mapped and only the chosen keys are read,
renaming moves tensors between dicts, and splitting in_proj or squeezing a 1x1 conv makes views.
"""
import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .checkpoint import UserError

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_TEXT, OPEN_CLIP_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP_TEXT, XL_OPEN_CLIP_TEXT = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # not the training loss some files keep
# CLIP's contrastive head: SD2 conditions on token features, SDXL projects its pooled feature (logit scale unused)
OPEN_CLIP_UNUSED = {OPEN_CLIP_TEXT: ("text_projection", "logit_scale"), XL_OPEN_CLIP_TEXT: ("logit_scale",)}

# Each family's published values that shapes do not show (SD1.5's, SD2.1's and SDXL base's config files), and its
# tokenizer's padding token (OpenCLIP's tokenizers, SD2's and SDXL's second, pad with "!"); the scheduler is SD's
# (v-prediction is decided at load time), SDXL's the same schedule in its EulerDiscreteScheduler config.
SD1, SD2, SDXL = "SD1", "SD2", "SDXL"
PAD_TOKEN = {SD1: "<|endoftext|>", SD2: "!", SDXL: "<|endoftext|>"}
PAD_TOKEN_2 = "!"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
SDXL_SCHEDULER = dict(SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)
SDXL_TIME_EMBED_DIM = 256  # sinusoidal features per size id (addition_time_embed_dim): not in any weight's shape
HEAD_DIM = 64  # SD2's UNet heads and both text encoders' heads are 64 wide; SD1's UNet has 8 heads per block
OPEN_CLIP_H_LAYERS = 24  # OpenCLIP ViT-H/14's text tower; SD2 uses the first 23


@dataclass
class SingleFile:
    """The parts of a single-file checkpoint as a diffusers folder holds them: {part: (config dict, state dict)}."""
    path: str
    family: str
    parts: dict = field(default_factory=dict)
    v_pred_marker: bool = False  # the file says it predicts v (a `v_pred` key, as ComfyUI reads it)


# ----------------------------------------------------------------------------------------------------------
# Reading a file: safetensors, or a pickled .ckpt with tensors only.

def read_tensors(path, select, device="cpu"):
    """{key: tensor} for the keys that `select(all keys)` picks; the others are never read.

    A .safetensors file is memory-mapped; a .ckpt / .pt is read with torch.load(weights_only=True), which refuses
    any pickled object that is not a tensor or a plain container, so a file cannot run code."""
    name = os.path.basename(path)
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {k: f.get_tensor(k) for k in select(list(f.keys()))}
        if not path.endswith((".ckpt", ".pt", ".pth")):
            raise UserError(f"{name} is neither .safetensors nor .ckpt; pass a Stable Diffusion single-file "
                            "checkpoint or a diffusers model folder.")
        try:
            sd = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files from torch < 1.6 (not zip) cannot be memory-mapped: read them whole
                raise
            sd = torch.load(path, map_location=device, weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if isinstance(sd, dict) and isinstance(sd.get("module"), dict):  # a DeepSpeed (Lightning) save, as
            # VideoCrafter's loader reads it: the model's keys under "module", each led by "_forward_module."
            sd = {k.removeprefix("_forward_module."): v for k, v in sd["module"].items()}
        if not isinstance(sd, dict):
            raise UserError(f"{name} holds a {type(sd).__name__}, not a state dict; it is not a model checkpoint.")
        return {k: sd[k] for k in select([k for k, v in sd.items() if isinstance(v, torch.Tensor)])}
    except (torch.OutOfMemoryError, MemoryError, UserError):
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(f"{name} holds pickled objects other than tensors{f' ({found[1]})' if found else ''}, which npo "
                        "does not unpickle; convert it to .safetensors with a tool you trust.")
    except Exception as e:  # a truncated or damaged file: safetensors, zipfile and pickle each raise their own
        raise UserError(f"{name} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                        "download it again.")


def _flat_ema_key(key):
    """LDM keeps the EMA copy of `model.diffusion_model.X.Y` at `model_ema.diffusion_modelXY` (dots removed)."""
    return "model_ema." + "".join(key.split(".")[1:])


def unused_resblock(keys):
    """The prefix of the OpenCLIP layer SD2 does not use, or None. SD2 conditions on the penultimate layer, so the
    last of OpenCLIP ViT-H's 24 resblocks is unused; a file converted back from a diffusers folder holds only the
    23 used ones (then nothing is dropped). At other depths (the tests' tiny towers) the last one is unused."""
    pattern = re.escape(OPEN_CLIP_TEXT) + r"transformer\.resblocks\.(\d+)\."
    blocks = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if not blocks or len(blocks) == OPEN_CLIP_H_LAYERS - 1:
        return None
    return f"{OPEN_CLIP_TEXT}transformer.resblocks.{max(blocks)}."


def text_keys(keys, prefixes):
    """The keys of the text encoder under one of `prefixes`, without what the pipeline does not use (SD2's last
    layer, OpenCLIP's contrastive head but SDXL's projection)."""
    unused = unused_resblock(keys) or "\0"  # "\0" starts no key
    return {k: k for k in keys for p in prefixes if k.startswith(p) and not k.startswith(unused)
            and k[len(p):] not in OPEN_CLIP_UNUSED.get(p, ())}


def choose_keys(keys, parts, ema, path):
    """The keys to read, by part, and the renaming of EMA keys to the UNet's own ones."""
    unet = [k for k in keys if k.startswith(UNET)]
    if not unet:
        raise UserError(f"{os.path.basename(path)} holds no Stable Diffusion UNet (no model.diffusion_model.* keys): "
                        "it is not an SD1.x / SD2.x / SDXL checkpoint (a LoRA, VAE or embedding?); pass a full "
                        "checkpoint or a diffusers model folder.")
    chosen = {}
    if "unet" in parts:
        chosen["unet"] = {_flat_ema_key(k) if ema else k: k for k in unet}
        missing = [k for k in chosen["unet"] if k not in keys]
        if ema and missing:
            raise UserError(f"{os.path.basename(path)} has no EMA weights (no model_ema.* keys for the UNet); "
                            "drop --ema.")
    if "vae" in parts:
        chosen["vae"] = {k: k for k in keys if k.startswith(VAE) and k[len(VAE):].startswith(VAE_PARTS)}
    if "text_encoder" in parts:
        chosen["text_encoder"] = text_keys(keys, (CLIP_TEXT, OPEN_CLIP_TEXT, XL_CLIP_TEXT))
    if "text_encoder_2" in parts:
        chosen["text_encoder_2"] = text_keys(keys, (XL_OPEN_CLIP_TEXT,))
    return {part: names for part, names in chosen.items() if names}


def read(path, device="cpu", ema=False, parts=PARTS):
    """The parts of the single-file checkpoint at `path` that it holds, among `parts`, in diffusers' layout."""
    chosen, marker = {}, []

    def select(keys):
        chosen.update(choose_keys(set(keys), parts, ema, path))
        marker.append("v_pred" in keys)
        return [k for names in chosen.values() for k in names]

    tensors = read_tensors(path, select, device)
    return unpack(path, {part: {own: tensors[k] for k, own in names.items()} for part, names in chosen.items()},
                  marker[0])


def unpack(path, grouped, v_pred_marker=False):
    """A SingleFile of the tensors of each part ({part: {key: tensor}}, keys as `choose_keys` names them)."""
    result = SingleFile(path, SD1, v_pred_marker=v_pred_marker)
    if "unet" in grouped:
        unet_sd = rename_unet({k[len(UNET):]: v for k, v in grouped["unet"].items()})
        result.family = family(unet_sd, path)
        result.parts["unet"] = (unet_config(unet_sd, result.family), unet_sd)
    if "vae" in grouped:
        vae_sd = rename_vae({k[len(VAE):]: v for k, v in grouped["vae"].items()})
        result.parts["vae"] = (vae_config(vae_sd, result.family), vae_sd)
    for part in ("text_encoder", "text_encoder_2"):
        if part in grouped:
            result.parts[part] = text_encoder(grouped[part])
    return result


# ----------------------------------------------------------------------------------------------------------
# The UNet. LDM counts blocks flat: input_blocks.0 is conv_in, then per level L resnets (each with its transformer
# as sub-block 1) and a downsample `op`; middle_block is resnet, transformer, resnet; output_blocks has L + 1 resnets
# per level, the level's upsample following its last one.

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_ENDS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest):
    for ldm, ours in RESNET.items():
        if rest.startswith(ldm + "."):
            return ours + rest[len(ldm):]
    return rest


def unet_key(key, L):
    """One LDM UNet key in diffusers' names, with L resnets per down level."""
    for ldm, ours in UNET_ENDS.items():
        if key.startswith(ldm + "."):
            return ours + key[len(ldm):]
    m = re.fullmatch(r"middle_block\.([012])\.(.+)", key)
    if m:  # resnet, transformer, resnet
        slot = ["resnets.0", "attentions.0", "resnets.1"][int(m[1])]
        return f"mid_block.{slot}.{m[2] if m[1] == '1' else _resnet(m[2])}"
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", key)
    if m is None:
        return key  # not a UNet layer of SD: strict loading names it
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
    if kind == "input_blocks":
        level, k = divmod(i - 1, L + 1)
        if k == L:  # the level's downsample
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        block = f"down_blocks.{level}"
    else:
        level, k = divmod(i, L + 1)
        block = f"up_blocks.{level}"
        if rest.startswith("conv."):  # sub-block 1 (no transformer) or 2 holding the upsample's conv
            return f"{block}.upsamplers.0.{rest}"
    return f"{block}.resnets.{k}.{_resnet(rest)}" if j == 0 else f"{block}.attentions.{k}.{rest}"


def rename_unet(sd):
    """LDM UNet keys (without `model.diffusion_model.`) -> diffusers' names. L, the resnets per down level, is read
    from the layout: each level has L + 1 output blocks, and every level but the last has one `op` downsample."""
    levels = 1 + sum(1 for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    outputs = {k.split(".")[1] for k in sd if k.startswith("output_blocks.")}
    L = len(outputs) // levels - 1
    return {unet_key(k, L): v for k, v in sd.items()}


def _count(sd, pattern):
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def family(sd, path):
    """SD1, SD2 or SDXL: SDXL has the added "text_time" embedding (label_emb) and a 2048-wide context; SD1 and SD2
    differ in their context width (768 or 1024), else in the transformers' projections (SD2's are Linear)."""
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise UserError(f"{os.path.basename(path)} has a UNet without cross-attention; it is not an SD1.x / SD2.x / "
                        "SDXL checkpoint.")
    context = to_k.shape[1]
    if context == 2048 or "add_embedding.linear_1.weight" in sd:
        return SDXL
    if context in (768, 1024):
        return SD1 if context == 768 else SD2
    proj_in = next(v for k, v in sd.items() if k.endswith("proj_in.weight"))
    return SD2 if proj_in.ndim == 2 else SD1


def unet_config(sd, fam):
    """diffusers' unet/config.json fields of the family, with what varies read from the shapes."""
    levels = _count(sd, r"down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    channels = [sd[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(levels)]
    attends = [f"down_blocks.{b}.attentions.0.norm.weight" in sd for b in range(levels)]
    up_attends = [f"up_blocks.{b}.attentions.0.norm.weight" in sd for b in range(levels)]
    config = dict(
        sample_size=64,  # 512 px; an SD2 v-model is 768 px (96), set once the prediction type is known
        in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attends],
        transformer_layers_per_block=_count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        cross_attention_dim=sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        # diffusers' `attention_head_dim` is the number of heads here: 8 in SD1, channels / 64 in SD2 and SDXL
        attention_head_dim=8 if fam == SD1 else [c // HEAD_DIM for c in channels],
        use_linear_projection=fam != SD1,
        upcast_attention=fam == SD2,  # fp32 attention scores: SD2.1-v overflows fp16 without it (precision only)
    )
    if fam == SDXL:  # 1024 px; a transformer depth per level (1 where a level does not attend; the up levels take
        # them reversed); the added embedding of [pooled text; 6 size ids x 256 features]
        config.update(sample_size=128, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      transformer_layers_per_block=[
                          _count(sd, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
                          for b in range(levels)],
                      projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1])
    return config


# ----------------------------------------------------------------------------------------------------------
# The VAE. LDM's decoder counts its levels from the lowest resolution up, diffusers' from the latent down; the
# mid-block attention's q / k / v / proj_out are 1x1 convs, which are diffusers' legacy query / key / value /
# proj_attn names (unet.load_vae's legacy rename makes them Linear layers).

def rename_vae(sd):
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    rules = [
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v|proj_out)\.",
         lambda m: f".mid_block.attentions.0.{dict(q='query', k='key', v='value', proj_out='proj_attn')[m[1]]}."),
        (r"\.norm_out\.", ".conv_norm_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def vae_config(sd, fam=SD1):
    """SDXL's VAE scales its latents by 0.13025 and overflows in fp16 (force_upcast: decoded in float32)."""
    levels = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    return dict(block_out_channels=channels,
                layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                latent_channels=sd["decoder.conv_in.weight"].shape[1],
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                scaling_factor=0.13025 if fam == SDXL else 0.18215, force_upcast=True)


# ----------------------------------------------------------------------------------------------------------
# The text encoder: transformers' CLIP names for SD1; OpenCLIP's for SD2, renamed to them.

OPEN_CLIP_RULES = [
    (r"^token_embedding\.", "embeddings.token_embedding."),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_final\.", "final_layer_norm."),
    (r"^transformer\.resblocks\.", "encoder.layers."),
    (r"\.ln_(1|2)\.", r".layer_norm\1."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def rename_open_clip(sd):
    """OpenCLIP's text tower in transformers' names; its fused in_proj = [W_q; W_k; W_v] splits into three views.
    Its projection (SDXL's bigG) is applied as x @ P with P stored (width, proj); nn.Linear holds Pᵀ (proj, width)."""
    out = {}
    for key, value in sd.items():
        for pattern, replacement in OPEN_CLIP_RULES:
            key = re.sub(pattern, replacement, key)
        m = re.fullmatch(r"(.+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        else:
            out[key] = value
    return out


def text_encoder(sd):
    """(config, state dict) of a text encoder, from its keys in the file (one prefix: `cond_stage_model.` or
    `conditioner.embedders.N.`). Keys are transformers' CLIPTextModel names, `text_model.` prefix included, and
    `text_projection.weight` for SDXL's bigG, a CLIPTextModelWithProjection (clip.load's legacy rename drops SD1's
    position_ids buffer, which merged checkpoints often hold as damaged floats: it is a constant arange, not a
    weight)."""
    first = next(iter(sd))
    prefix = next(p for p in (CLIP_TEXT, OPEN_CLIP_TEXT, XL_CLIP_TEXT, XL_OPEN_CLIP_TEXT) if first.startswith(p))
    sd = {k[len(prefix):]: v for k, v in sd.items()}
    if prefix in (OPEN_CLIP_TEXT, XL_OPEN_CLIP_TEXT):
        sd, act = rename_open_clip(sd), "gelu"
    else:
        sd, act = {k.removeprefix("text_model."): v for k, v in sd.items()}, "quick_gelu"
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    config = dict(vocab_size=vocab, hidden_size=width, num_attention_heads=width // HEAD_DIM, hidden_act=act,
                  intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
                  max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0])
    if prefix in (XL_CLIP_TEXT, XL_OPEN_CLIP_TEXT):  # SDXL base's text configs: EOS found as the largest id
        config["eos_token_id"] = 2
    if "text_projection.weight" in sd:
        config["projection_dim"] = sd["text_projection.weight"].shape[0]
    return config, {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in sd.items()}
