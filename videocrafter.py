"""VideoCrafter2 (Chen et al. 2024; AILab-CVC/VideoCrafter, configs/inference_t2v_512_v2.0.yaml): the video model of
the paper's VADER experiment, as one `model.ckpt`, loaded into our video UNet (video.py, diffusers' UNet3DCondition
names), SD's VAE and the OpenCLIP ViT-H text encoder that SD2 uses (penultimate layer, then ln_final).

VideoCrafter2's UNet is ModelScope's (diffusers' UNet3DConditionModel) by construction: the same levels, heads of 64,
Linear projections around the spatial transformers, temporal convs and temporal transformers in the same order. It
differs in three things:

    fps embedding     emb = MLP_t(sin(t)) + MLP_fps(sin(fps)): the frame rate, through the timestep's sinusoid
                      and an MLP of the same shape, is added to the time embedding (openaimodel3d.py:367-372, 538-542)
    init_attn         diffusers' transformer_in, with kernel-1 Conv1d projections (its use_linear is left False,
                      attention.py:298-302): the same map as a Linear layer, so the weights are squeezed
    names             the LDM layout: input_blocks / middle_block / output_blocks, each ResBlock holding its
                      temporal conv as `temopral_conv` (sic), each block [ResBlock, spatial, temporal transformer]

Its sampler rescales x̂_0: the model was trained on x_t = √ᾱ_t s(t) x_0 + √(1−ᾱ_t) ε (lvdm/models/ddpm3d.py:412-417,
s from 1 at t = 0 to 0.7 at t = 400, then 0.7), and each DDIM step multiplies x̂_0 by s(t_prev)/s(t) (ddim.py:280-289;
sampler.x0_scales). File:line references are to AILab-CVC/VideoCrafter at commit 11bcd76.

The file is read by rules, as singlefile.py reads SD's: no rename table. VideoCrafter1 (relative-position temporal
attention, no temporal convs; its image-to-video model's image cross-attention) is refused.
"""
import os
import re

import torch

from . import checkpoint
from . import clip
from . import singlefile
from . import unet
from . import video
from .checkpoint import UserError

UNET, VAE, TEXT = singlefile.UNET, singlefile.VAE, singlefile.OPEN_CLIP_TEXT

# The sampler of the authors' text-to-video script (scripts/run_text2video.sh, lvdm/models/samplers/ddim.py): SD's DDIM
# ("uniform" timesteps = leading + 1, ᾱ_prev of the last step = ᾱ_0) with the x̂_0 rescale of `use_scale`
# (ddpm3d.py:343-376: s(t) from scale_a at t = 0 linearly to scale_b at mid_step, then scale_b). The same timesteps
# when S divides 1000 (their 50); otherwise lvdm runs range(0, 1000, 1000 // S) + 1, more than S steps (31 for S = 30,
# utils_diffusion.py:57-59), and npo runs diffusers' S.
SCHEDULER = dict(singlefile.SCHEDULER, use_scale=True, scale_a=1.0, scale_b=0.7, mid_step=400)
# run_text2video.sh: 320x512, 16 frames (temporal_length), CFG 12, 50 DDIM steps at eta 1, fps 28
DEFAULTS = dict(height=320, width=512, frames=16, guidance=12.0, steps=50, ddim_eta=1.0, fps=28)


def is_videocrafter(keys):
    """A VideoCrafter file (1 or 2): an `init_attn` temporal transformer after conv_in, which SD has not."""
    return any(k.startswith(UNET + "init_attn.") for k in keys)


def check_videocrafter2(keys, path):
    """VideoCrafter1 files differ in their keys (configs/inference_t2v_512_v1.0.yaml, _1024_v1.0, i2v_512_v1.0):
    relative-position tables in the temporal attention and no temporal convs, or image cross-attention (to_k_ip)."""
    vc1 = any("relative_position_" in k or ".to_k_ip." in k for k in keys) or not any(
        ".temopral_conv." in k for k in keys)
    if vc1:
        raise UserError(f"{os.path.basename(path)} is a VideoCrafter1 checkpoint (relative-position temporal attention "
                        "and no temporal convs) or an image-to-video one (image cross-attention), which npo does not "
                        "load; pass VideoCrafter2's text-to-video model.ckpt.")


# ----------------------------------------------------------------------------------------------------------
# The UNet's keys. LDM counts blocks flat (see singlefile.unet_key): input_blocks.0 is conv_in, then per level L
# blocks of [ResBlock, spatial transformer, temporal transformer] (the last level: the ResBlock alone) and a
# downsample `op`; middle_block is ResBlock, spatial, temporal, ResBlock; output_blocks has L + 1 blocks per level,
# the level's upsample (`conv`) last. A ResBlock's `temopral_conv` is its sibling `temp_convs.k` in diffusers.

ENDS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "fps_embedding.0": "fps_embedding.linear_1", "fps_embedding.2": "fps_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "init_attn.0": "transformer_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
SLOTS = ("resnets", "attentions", "temp_attentions")  # sub-block j of a block
MID = (("resnets", 0), ("attentions", 0), ("temp_attentions", 0), ("resnets", 1))  # middle_block.j


def _resnet(block, k, rest):
    """A ResBlock's key: its temporal conv moves out to `temp_convs.k`, the rest renamed as SD's (singlefile)."""
    if rest.startswith("temopral_conv."):
        return f"{block}.temp_convs.{k}.{rest[len('temopral_conv.'):]}"
    return f"{block}.resnets.{k}.{singlefile._resnet(rest)}"


def unet_key(key, L):
    """One VideoCrafter2 UNet key (without `model.diffusion_model.`) in our names, with L ResBlocks per down level."""
    for ldm, ours in ENDS.items():
        if key.startswith(ldm + "."):
            return ours + key[len(ldm):]
    m = re.fullmatch(r"middle_block\.([0-3])\.(.+)", key)
    if m:
        (slot, k), rest = MID[int(m[1])], m[2]
        return _resnet("mid_block", k, rest) if slot == "resnets" else f"mid_block.{slot}.{k}.{rest}"
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", key)
    if m is None:
        return key  # not a layer of VideoCrafter2's UNet: strict loading names it
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
    if kind == "input_blocks":
        level, k = divmod(i - 1, L + 1)
        block = f"down_blocks.{level}"
        if k == L:  # the level's downsample
            return f"{block}.downsamplers.0.conv.{rest.removeprefix('op.')}"
    else:
        level, k = divmod(i, L + 1)
        block = f"up_blocks.{level}"
        if rest.startswith("conv."):  # the Upsample, after the level's last ResBlock and transformers
            return f"{block}.upsamplers.0.{rest}"
    return _resnet(block, k, rest) if j == 0 else f"{block}.{SLOTS[j]}.{k}.{rest}"


def rename_unet(sd):
    """VideoCrafter2's UNet state dict in our names. L is read from the layout as in singlefile.rename_unet; the
    kernel-1 Conv1d projections of `init_attn` (out, in, 1) become the Linear weights (out, in) they equal."""
    levels = 1 + sum(1 for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    L = len({k.split(".")[1] for k in sd if k.startswith("output_blocks.")}) // levels - 1
    out = {}
    for key, value in sd.items():
        key = unet_key(key, L)
        out[key] = value.squeeze(-1) if key.startswith("transformer_in.proj_") and value.ndim == 3 else value
    return out


def unet_config(sd):
    """UNet3DConfig fields of the renamed UNet, read from shapes: channels per level, ResBlocks per level, which levels
    attend, the context width, and the head width: init_attn has 8 heads (openaimodel3d.py:383), so its inner width
    is 8 × num_head_channels (64 in VideoCrafter2; heads per level = channels / 64, as diffusers' attention_head_dim)."""
    levels = singlefile._count(sd, r"down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    channels = [sd[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(levels)]
    attends = [f"down_blocks.{b}.attentions.0.norm.weight" in sd for b in range(levels)]
    up_attends = [f"up_blocks.{b}.attentions.0.norm.weight" in sd for b in range(levels)]
    return dict(
        sample_size=64,  # 512 px wide; the authors' videos are 320 x 512 (DEFAULTS)
        in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=channels, layers_per_block=singlefile._count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attends],
        up_block_types=["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in up_attends],
        cross_attention_dim=sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        attention_head_dim=sd["transformer_in.proj_in.weight"].shape[0] // 8)


# ----------------------------------------------------------------------------------------------------------
# The UNet: ModelScope's (video.UNet3DCondition) with the fps embedding.

UNET_FPS = 16  # the frame rate UNetModel.forward assumes when given none (openaimodel3d.py:534)


class VideoCrafterUNet(video.UNet3DCondition):
    """ε_θ(x_t, t, c, fps): VideoCrafter2's UNet. The frame rate is embedded as the timestep is, through the same
    sinusoid and an MLP of the same shape, and added to the time embedding (openaimodel3d.py:538-542):

        emb = MLP_t(sin(t)) + MLP_fps(sin(fps))"""

    def __init__(self, cfg):
        super().__init__(cfg)
        c0 = cfg.block_out_channels[0]
        self.fps_embedding = unet.TimestepEmbedding(c0, 4 * c0, cfg.act_fn)

    def time_features(self, t, dtype, fps=None):
        fps = torch.as_tensor(UNET_FPS if fps is None else fps, device=t.device)
        fps = fps.expand(len(t)) if fps.ndim == 0 else fps.reshape(-1).expand(len(t))
        c0 = self.config.block_out_channels[0]
        fps_features = unet.timestep_embedding(fps, c0, flip_sin_to_cos=True, freq_shift=0).to(dtype)
        return super().time_features(t, dtype) + self.fps_embedding(fps_features)


def build_unet(sd, where, dtype=torch.float32):
    """VideoCrafter2's UNet from its renamed state dict, loaded strictly (a missing or unexpected key names itself)."""
    cfg = video.unet3d_config(unet_config(sd), where)
    model = checkpoint.build_on_meta(lambda: VideoCrafterUNet(cfg))
    checkpoint.load_strict(model, sd, where, dtype)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# The file: model.diffusion_model.* (the UNet), first_stage_model.* (SD's VAE, read as singlefile reads it),
# cond_stage_model.model.* (OpenCLIP ViT-H's text tower, as SD2's). The DDPM buffers and scale_arr are not read.

PARTS = ("unet", "vae", "text_encoder")


def choose_keys(keys, path, parts=PARTS):
    """{part: {file key: key in the part}} of `parts`, VideoCrafter1 refused first."""
    check_videocrafter2(keys, path)
    chosen = {"unet": {k: k[len(UNET):] for k in keys if k.startswith(UNET)},
              "vae": {k: k[len(VAE):] for k in keys if k.startswith(VAE) and k[len(VAE):].startswith(singlefile.VAE_PARTS)},
              "text_encoder": singlefile.text_keys(keys, (TEXT,))}
    chosen = {part: chosen[part] for part in parts}
    missing = [part for part, names in chosen.items() if not names]
    if missing:
        raise UserError(f"{os.path.basename(path)} is a VideoCrafter2 checkpoint without its {' and '.join(missing)} "
                        "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.*); pass the whole "
                        "model.ckpt.")
    return chosen


def read(path, device="cpu", parts=PARTS):
    """{part: (config dict, state dict)} of `parts` of a VideoCrafter2 file, each in our names (the UNet's config is
    video.UNet3DConfig's fields, the VAE's and text encoder's those singlefile gives SD2's); only their tensors are
    read."""
    chosen = {}

    def select(keys):
        chosen.update(choose_keys(set(keys), path, parts))
        return [k for names in chosen.values() for k in names]

    tensors = singlefile.read_tensors(path, select, device)
    result = {}
    if "unet" in chosen:
        unet_sd = rename_unet({own: tensors[k] for k, own in chosen["unet"].items()})
        try:
            result["unet"] = (unet_config(unet_sd), unet_sd)
        except KeyError as e:
            raise UserError(f"{os.path.basename(path)} has a VideoCrafter UNet without {e.args[0]} (in our names), so it "
                            "is damaged or another model; pass VideoCrafter2's model.ckpt.")
    if "vae" in chosen:
        vae_sd = singlefile.rename_vae({own: tensors[k] for k, own in chosen["vae"].items()})
        result["vae"] = (singlefile.vae_config(vae_sd, singlefile.SD2), vae_sd)
    if "text_encoder" in chosen:
        result["text_encoder"] = singlefile.text_encoder({k: tensors[k] for k in chosen["text_encoder"]})
    return result


def file_keys(path):
    """The tensor names of a checkpoint file, no tensor read (a .ckpt is memory-mapped)."""
    seen = []
    singlefile.read_tensors(path, lambda keys: seen.extend(keys) or [])
    return seen


def load_unet(path, dtype=torch.float32, device="cpu"):
    """The UNet alone of a VideoCrafter2 file (--eta-model, extract-lora)."""
    return build_unet(read(path, device, ("unet",))["unet"][1], path, dtype)


def load_parts(path, dtype=torch.float32, device="cpu"):
    """(UNet, VAE, text encoder) of a VideoCrafter2 file, each loaded strictly into our modules."""
    parts = read(path, device)
    model = build_unet(parts["unet"][1], path, dtype)
    vae = unet.build_vae(unet.vae_config(parts["vae"][0], path), parts["vae"][1], path, dtype)
    config, state = parts["text_encoder"]
    return model, vae, clip.build_text_encoder(clip.text_config(config, path), state, path, dtype)
