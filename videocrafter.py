"""VideoCrafter2 (Chen et al. 2024; AILab-CVC/VideoCrafter, configs/inference_t2v_512_v2.0.yaml): the video model of
the paper's VADER experiment, as one `model.ckpt`, loaded into our video UNet (video.py, diffusers' UNet3DCondition
names), SD's VAE and the OpenCLIP ViT-H text encoder that SD2 uses (penultimate layer, then ln_final).

VideoCrafter2's UNet is ModelScope's (diffusers' UNet3DConditionModel) by construction, with three differences:

    fps embedding     emb = MLP_t(sin(t)) + MLP_fps(sin(fps)): the frame rate, through the timestep's sinusoid
                      and an MLP of the same shape, is added to the time embedding (openaimodel3d.py:367-372, 538-542)
    projections       the spatial transformers' proj_in / proj_out are Linear (SD2.1's use_linear_projection),
                      ModelScope's 1x1 convs; `init_attn` (diffusers' transformer_in) keeps kernel-1 Conv1d ones
    names             the LDM layout: input_blocks / middle_block / output_blocks, each ResBlock holding its
                      temporal conv as `temopral_conv` (sic), each block [ResBlock, spatial, temporal transformer]

and its sampler rescales x̂_0 (sampler.ddim_posterior's `x0_scale`; lvdm/models/samplers/ddim.py:280-289). The facts,
each with its file and line, are in the branch's notes (notes/videocrafter2.md of the session).

The file is read by rules, as singlefile.py reads SD's: no rename table. VideoCrafter1 (relative-position temporal
attention, no temporal convs; its image-to-video model's image cross-attention) is refused.
"""
import os
import re

import torch

from . import clip
from . import singlefile
from . import unet
# from . import video
from .checkpoint import UserError

UNET, VAE, TEXT = singlefile.UNET, singlefile.VAE, singlefile.OPEN_CLIP_TEXT

# The sampler of the authors' text-to-video script (scripts/run_text2video.sh, lvdm/models/samplers/ddim.py): SD's DDIM
# ("uniform" timesteps = leading + 1, ᾱ_prev of the last step = ᾱ_0) with the x̂_0 rescale of `use_scale`
# (ddpm3d.py:343-376: s(t) from scale_a at t = 0 linearly to scale_b at mid_step, then scale_b).
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
                        "or image cross-attention, no temporal convs), which npo does not load; pass VideoCrafter2's "
                        "model.ckpt.")


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
