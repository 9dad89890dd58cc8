"""The video UNet of ModelScope's text-to-video (diffusers' UNet3DConditionModel), written by hand on unet.py's parts.

A video UNet is SD's UNet with temporal layers beside the spatial ones: every resnet is followed by a temporal conv
stack (convolutions of kernel 3 along the frames), every spatial transformer by a temporal transformer (attention
across the frames at each pixel), and `transformer_in` follows `conv_in`. The spatial layers are unet.py's, run on
the frames folded into the batch.

Batch-major folds. A video x of shape (B, C, F, h, w) is folded as

    spatial layers:  (B·F, C, h, w)     rows b·F … b·F + F − 1 are the frames of sample b
    temporal layers: (B·h·w, F, C)      rows b·h·w … are the pixels of sample b, the F frames the sequence

so every layer sees its rows grouped by sample, in sample order, and a per-sample LoRA multiplier of B values
applies to n·B rows as `m.repeat_interleave(n)` (lora.Offset.features). The time embedding and the text
embeddings are repeated over the frames the same way.

Names are diffusers' state-dict keys (`down_blocks.0.temp_attentions.0.transformer_blocks.0.attn2.to_q`,
`down_blocks.0.temp_convs.0.conv2.3.weight`: diffusers keeps the Dropout slot of each conv stack), so a
`text-to-video-ms` folder loads with one strict `load_state_dict`.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

from . import checkpoint, unet


@dataclass
class UNet3DConfig:
    """diffusers' UNet3DConditionModel config.json fields (ModelScope's text-to-video-ms values by default)."""
    sample_size: Optional[int] = 32
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: List[str] = field(default_factory=lambda: [
        "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"])
    up_block_types: List[str] = field(default_factory=lambda: [
        "UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"])
    block_out_channels: List[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    # Unlike SD1.x's UNet, here `attention_head_dim` IS the head dimension: a block of C channels has C / 64 heads.
    # transformer_in has 8 heads of this dimension (inner width 8·64 = 512 for ModelScope's 320 channels).
    attention_head_dim: int = 64

    # What unet.py's blocks read from their config, fixed for this model (not config.json fields): diffusers'
    # 3D blocks use linear projections around the spatial transformers, no dropout in the resnets, no upcasting.
    use_linear_projection = True
    upcast_attention = False
    dropout = 0.0

    def __post_init__(self):
        n = len(self.block_out_channels)
        kinds = {"down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"), "up_block_types": ("CrossAttnUpBlock3D", "UpBlock3D")}
        for name, allowed in kinds.items():
            if len(getattr(self, name)) != n or any(t not in allowed for t in getattr(self, name)):
                raise ValueError(f"{name} must be {n} (one per block_out_channels) of {' / '.join(allowed)}")
        for name in ("layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups"):
            if not isinstance(getattr(self, name), int):  # diffusers' transformer_in breaks on per-block lists too
                raise ValueError(f"{name} must be one integer for this video UNet (got {getattr(self, name)!r})")
        if self.act_fn not in unet.ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported ({', '.join(unet.ACTIVATIONS)})")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding {self.downsample_padding} is not supported (0 or 1)")
        for ch in self.block_out_channels:
            if ch % self.attention_head_dim or ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels {ch} must be divisible by attention_head_dim "
                                 f"({self.attention_head_dim}) and norm_num_groups ({self.norm_num_groups})")

    def heads(self, ch):
        return ch // self.attention_head_dim

    def per_block(self, name):
        """One value per block, as unet.UNetConfig.per_block gives (here every such field is one int)."""
        return [getattr(self, name)] * len(self.block_out_channels)


# UNet3DConditionModel fields npo does not implement, at the values where they change nothing.
UNET3D_NOOP_FIELDS = {"num_attention_heads": [None], "time_cond_proj_dim": [None]}


# ----------------------------------------------------------------------------------------------------------
# The temporal layers: each maps (B·F, C, h, w) to itself, mixing information across the F frames only.

class TemporalConvLayer(nn.Module):
    """x + conv4(conv3(conv2(conv1(x)))) over (B, C, F, h, w), each conv GroupNorm -> SiLU -> (Dropout) -> Conv3d
    with a (3, 1, 1) kernel: along the frames, pixel by pixel. ModelScope zero-initialises conv4, so a fresh stack
    is the identity."""

    def __init__(self, ch, groups, dropout=0.1):
        super().__init__()
        conv = lambda: nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))  # noqa: E731
        self.conv1 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), conv())
        self.conv2, self.conv3, self.conv4 = (
            nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Dropout(dropout), conv()) for _ in range(3))

    def forward(self, x, frames):
        bf, c, h, w = x.shape
        x = x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)  # (B·F, C, h, w) -> (B, C, F, h, w)
        x = x + self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return x.transpose(1, 2).reshape(bf, c, h, w)


class TransformerTemporalModel(nn.Module):
    """The temporal transformer: GroupNorm over (C/g, F, h, w), project in, transformer blocks whose tokens are the
    F frames of one pixel, project out, residual. Both attentions of each block are self-attentions across frames
    (diffusers' `double_self_attention`); there is no positional embedding, so frame order is known only through
    the temporal convs."""

    def __init__(self, ch, heads, head_dim, groups):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner)
        self.transformer_blocks = nn.ModuleList([unet.BasicTransformerBlock(inner, heads, context_dim=None)])
        self.proj_out = nn.Linear(inner, ch)

    def forward(self, x, frames):
        bf, c, h, w = x.shape
        b = bf // frames
        y = self.norm(x.reshape(b, frames, c, h, w).transpose(1, 2))  # normalised over frames and pixels together
        y = self.proj_in(y.permute(0, 3, 4, 2, 1).reshape(b * h * w, frames, c))  # (B, C, F, h, w) -> (B·h·w, F, C)
        for block in self.transformer_blocks:
            y = block(y, None)  # context None: attn2 attends to the frames as well
        y = self.proj_out(y).reshape(b, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + y


def temporal_transformers(ch, cfg, n):
    return nn.ModuleList([TransformerTemporalModel(ch, cfg.heads(ch), cfg.attention_head_dim, cfg.norm_num_groups)
                          for _ in range(n)])


def temporal_convs(ch, cfg, n):
    return nn.ModuleList([TemporalConvLayer(ch, cfg.norm_num_groups) for _ in range(n)])


# ----------------------------------------------------------------------------------------------------------
# The 3D blocks: unet.py's blocks with `temp_convs` beside `resnets` and `temp_attentions` beside `attentions`.
# Order inside a layer: resnet -> temporal conv -> spatial transformer -> temporal transformer.

class DownBlock3D(unet.DownBlock):
    def __init__(self, in_ch, out_ch, temb_ch, cfg, attn, downsample):
        layers = cfg.layers_per_block
        super().__init__(in_ch, out_ch, temb_ch, layers, cfg, attn, cfg.heads(out_ch), cfg.cross_attention_dim, 1,
                         downsample)
        self.temp_convs = temporal_convs(out_ch, cfg, layers)
        self.temp_attentions = temporal_transformers(out_ch, cfg, layers) if attn else None

    def forward(self, x, temb, context, frames):
        skips = []
        for i, (resnet, temp_conv) in enumerate(zip(self.resnets, self.temp_convs)):
            x = temp_conv(resnet(x, temb), frames)
            if self.attentions is not None:
                x = self.temp_attentions[i](self.attentions[i](x, context), frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock3D(unet.UpBlock):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, cfg, attn, upsample):
        layers = cfg.layers_per_block + 1
        super().__init__(in_ch, prev_ch, out_ch, temb_ch, layers, cfg, attn, cfg.heads(out_ch), cfg.cross_attention_dim,
                         1, upsample)
        self.temp_convs = temporal_convs(out_ch, cfg, layers)
        self.temp_attentions = temporal_transformers(out_ch, cfg, layers) if attn else None

    def forward(self, x, skips, temb, context, frames, upsample_size=None):
        for i, (resnet, temp_conv) in enumerate(zip(self.resnets, self.temp_convs)):
            x = temp_conv(resnet(torch.cat([x, skips.pop()], dim=1), temb), frames)
            if self.attentions is not None:
                x = self.temp_attentions[i](self.attentions[i](x, context), frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock3D(unet.MidBlock):
    def __init__(self, ch, temb_ch, cfg):
        super().__init__(ch, temb_ch, cfg, cfg.heads(ch), cfg.cross_attention_dim, 1)
        self.temp_convs = temporal_convs(ch, cfg, 2)
        self.temp_attentions = temporal_transformers(ch, cfg, 1)

    def forward(self, x, temb, context, frames):
        x = self.temp_convs[0](self.resnets[0](x, temb), frames)
        x = self.temp_attentions[0](self.attentions[0](x, context), frames)
        return self.temp_convs[1](self.resnets[1](x, temb), frames)


# ----------------------------------------------------------------------------------------------------------
# The UNet.

class UNet3DCondition(nn.Module):
    """ε_θ(x_t, t, c) for a video x_t of shape (B, C, F, h, w): ModelScope's text-to-video UNet."""

    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb_ch = ch[0] * 4
        last = len(ch) - 1

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = unet.TimestepEmbedding(ch[0], temb_ch, cfg.act_fn)
        self.transformer_in = TransformerTemporalModel(ch[0], 8, cfg.attention_head_dim, cfg.norm_num_groups)

        self.down_blocks = nn.ModuleList([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], temb_ch, cfg, kind == "CrossAttnDownBlock3D", downsample=i < last)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock3D(ch[-1], temb_ch, cfg)
        # the up path mirrors the down path: up block i works at the channels of down block (last - i)
        self.up_blocks = nn.ModuleList([
            UpBlock3D(ch[max(last - i - 1, 0)], ch[min(last - i + 1, last)], ch[last - i], temb_ch, cfg,
                      kind == "CrossAttnUpBlock3D", upsample=i < last)
            for i, kind in enumerate(cfg.up_block_types)])

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as diffusers
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def time_features(self, t, dtype, fps=None):
        """The time embedding (B, 4·C0) of timesteps t (B,). ModelScope's UNet takes no fps (VideoCrafter2's does)."""
        if fps is not None:
            raise ValueError("this video UNet (ModelScope's) has no fps conditioning: pass fps=None")
        c0 = self.config.block_out_channels[0]
        return self.time_embedding(unet.timestep_embedding(t, c0, flip_sin_to_cos=True, freq_shift=0).to(dtype))

    def forward(self, sample, timestep, encoder_hidden_states, fps=None):
        """ε_θ(x_t, t, c): sample (B, C, F, h, w), timestep scalar or (B,), encoder_hidden_states (B, L, D)
        -> (B, C_out, F, h, w)."""
        b, _, frames, h, w = sample.shape
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.ndim == 0 else t.reshape(-1).expand(b)
        # one time embedding and one text embedding per frame, repeated batch-major: row b·F + f is sample b
        temb = self.time_features(t, sample.dtype, fps).repeat_interleave(frames, dim=0)
        context = encoder_hidden_states.repeat_interleave(frames, dim=0)

        x = sample.transpose(1, 2).reshape(b * frames, -1, h, w)  # (B, C, F, h, w) -> (B·F, C, h, w)
        x = self.transformer_in(self.conv_in(x), frames)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, frames)
            skips += block_skips
        x = self.mid_block(x, temb, context, frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if skips else None  # the next skip's size (2x unless a side was odd)
            x = block(x, block_skips, temb, context, frames, size)

        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x.reshape(b, frames, -1, h, w).transpose(1, 2)  # (B·F, C, h, w) -> (B, C, F, h, w)


def is_video(model):
    """True for a video UNet (its inputs and outputs are (B, C, F, h, w))."""
    return isinstance(model, UNet3DCondition)


DECODE_CHUNK = 8  # frames per VAE call (--decode-chunk): at 512 px each holds about 1 GiB in fp32 (BENCHMARKS.md)


def decode_frames(vae, latents, chunk=DECODE_CHUNK):
    """Raw video latents (B, C, F, h, w) -> frames (B, F, 3, H, W) in about [-1, 1]: divided by the VAE's
    scaling factor and decoded frame by frame, at most `chunk` frames per VAE call, so the VAE's peak memory is
    that of `chunk` images whatever the video's length. Differentiable (VADER decodes chosen frames with gradients);
    sampling calls it under no_grad."""
    b, c, frames, h, w = latents.shape
    z = latents.transpose(1, 2).reshape(b * frames, c, h, w) / vae.scaling_factor  # batch-major: row b·F + f
    dtype = next(vae.parameters()).dtype
    images = torch.cat([vae.decode(part.to(dtype)).float() for part in z.split(chunk)])
    return images.reshape(b, frames, *images.shape[1:])


# ----------------------------------------------------------------------------------------------------------
# Loading: a diffusers `unet/` folder whose config.json names UNet3DConditionModel.

def unet3d_config(d, where):
    return checkpoint.config_from_dict(UNet3DConfig, d, where, UNET3D_NOOP_FIELDS)


def build_unet3d(cfg, state_dict, where, dtype=torch.float32):
    model = checkpoint.build_on_meta(lambda: UNet3DCondition(cfg))
    checkpoint.load_strict(model, state_dict, where, dtype)
    return model.eval().requires_grad_(False)


def load_unet3d(folder, dtype=torch.float32, device="cpu", variant=None):
    """The video UNet of a diffusers `unet/` folder (config.json + safetensors)."""
    cfg = unet3d_config(checkpoint.read_json(f"{folder}/config.json"), f"{folder}/config.json")
    path = checkpoint.find_weights(folder, ["diffusion_pytorch_model", "model"], variant)
    return build_unet3d(cfg, checkpoint.read_safetensors(path, device), path, dtype)
