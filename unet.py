"""The Stable Diffusion 1.x / 2.x / XL UNet and its KL autoencoder (VAE), written by hand.

Attribute names are diffusers' state-dict keys (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q`),
so a diffusers checkpoint loads with one strict `load_state_dict`. Both models are built in loops from the
fields of their `config.json`, so the tests run the same code at tiny sizes.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}


# ----------------------------------------------------------------------------------------------------------
# Configs: field names are those of diffusers' unet/config.json and vae/config.json.

@dataclass
class UNetConfig:
    sample_size: Optional[int] = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: List[str] = field(default_factory=lambda: [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: List[str] = field(default_factory=lambda: [
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    block_out_channels: List[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: Union[int, List[int]] = 2
    # diffusers' name misleads: for SD1.x/2.x `attention_head_dim` is the number of heads per block
    # (8 for SD1.5, [5, 10, 20, 20] for SD2.x); the head dimension is channels // heads.
    attention_head_dim: Union[int, List[int]] = 8
    num_attention_heads: Optional[Union[int, List[int]]] = None
    cross_attention_dim: Union[int, List[int]] = 768
    transformer_layers_per_block: Union[int, List[int]] = 1
    use_linear_projection: bool = False  # SD2.x: nn.Linear instead of a 1x1 conv around the transformer
    upcast_attention: bool = False  # SD2.1: compute attention scores in fp32 (a precision choice only)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    act_fn: str = "silu"
    dropout: float = 0.0
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # SDXL: "text_time" adds an embedding of [pooled text; sinusoidal features of the six size ids] to the time
    # embedding; addition_time_embed_dim features per id (256), projection_class_embeddings_input_dim in all (2816)
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types must have one entry per block_out_channels ({n})")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"down block type {t!r} is not supported (CrossAttnDownBlock2D, DownBlock2D)")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"up block type {t!r} is not supported (CrossAttnUpBlock2D, UpBlock2D)")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"mid_block_type {self.mid_block_type!r} is not supported (UNetMidBlock2DCrossAttn)")
        if self.num_attention_heads is not None:  # diffusers refuses it for this model too
            raise ValueError("num_attention_heads must be null for this UNet (heads come from attention_head_dim)")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {self.addition_embed_type!r} is not supported (null, or SDXL's 'text_time')")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding {self.downsample_padding} is not supported (0 or 1)")
        for ch, heads in zip(self.block_out_channels, self.per_block("attention_head_dim")):
            if ch % heads or ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels {ch} must be divisible by its heads ({heads}) "
                                 f"and norm_num_groups ({self.norm_num_groups})")

    def per_block(self, name):
        """A config value that may be one int for all blocks or a list with one per block."""
        value = getattr(self, name)
        value = [value] * len(self.block_out_channels) if isinstance(value, int) else list(value)
        if len(value) != len(self.block_out_channels):
            raise ValueError(f"{name} must have one entry per block_out_channels ({len(self.block_out_channels)})")
        return value


# Fields of diffusers' UNet2DConditionModel that npo does not implement, with the values at which they are
# no-ops (the SD1.x/2.x/XL values). Any other value is refused by checkpoint.config_from_dict.
UNET_NOOP_FIELDS = {
    "center_input_sample": [False], "only_cross_attention": [False], "dual_cross_attention": [False],
    "class_embed_type": [None], "num_class_embeds": [None], "encoder_hid_dim": [None], "encoder_hid_dim_type": [None],
    "reverse_transformer_layers_per_block": [None], "resnet_time_scale_shift": ["default"],
    "resnet_skip_time_act": [False], "resnet_out_scale_factor": [1.0], "time_embedding_type": ["positional"],
    "time_embedding_act_fn": [None], "timestep_post_act": [None], "time_cond_proj_dim": [None],
    "attention_type": ["default"],
    "class_embeddings_concat": [False], "mid_block_only_cross_attention": [None, False],
    "cross_attention_norm": [None], "addition_embed_type_num_heads": [64],
}


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: List[str] = field(default_factory=lambda: ["DownEncoderBlock2D"] * 4)
    up_block_types: List[str] = field(default_factory=lambda: ["UpDecoderBlock2D"] * 4)
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Optional[int] = 512
    scaling_factor: float = 0.18215  # latents z = scaling_factor * posterior sample
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # decode in float32 even when the model runs in float16: SDXL's VAE overflows in fp16 (diffusers' SDXL
    # pipeline upcasts it; pipeline.load_pipeline keeps an SDXL VAE with this flag in float32)
    force_upcast: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if list(self.down_block_types) != ["DownEncoderBlock2D"] * n:
            raise ValueError(f"down_block_types must be {n} x DownEncoderBlock2D")
        if list(self.up_block_types) != ["UpDecoderBlock2D"] * n:
            raise ValueError(f"up_block_types must be {n} x UpDecoderBlock2D")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported ({', '.join(ACTIVATIONS)})")
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by norm_num_groups")


VAE_NOOP_FIELDS = {"shift_factor": [None, 0.0], "latents_mean": [None], "latents_std": [None]}


# ----------------------------------------------------------------------------------------------------------
# Building blocks shared by the UNet and the VAE.

class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv3x3 (+ time embedding) -> GroupNorm -> act -> dropout -> conv3x3, plus a skip."""

    def __init__(self, in_ch, out_ch, temb_ch, groups, eps, act="silu", dropout=0.0, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nonlinearity = ACTIVATIONS[act]()
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE pads right/bottom only, then convolves without padding
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # `size` is the skip connection's size, for inputs whose sides are not multiples of 2**n_downsamples
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def attention(q, k, v, heads, upcast=False):
    """Multi-head scaled dot-product attention on (B, N, heads*d) tensors."""
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention over the text embeddings."""

    def __init__(self, dim, heads, context_dim=None, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])  # the dropout slot keeps the key to_out.0
        self.query_blur = None  # SEG: q, (H, W) -> q with some rows blurred, while guiders.smoothed_queries is on

    def forward(self, x, context=None, hw=None):
        q = self.to_q(x)
        if self.query_blur is not None:  # SEG's perturbed rows attend with a smoothed query over the (H, W) grid
            q = self.query_blur(q, hw)
        context = x if context is None else context
        out = attention(q, self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU: one projection gives the value and its gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, and a GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, context_dim, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.skip_rows = None  # autoguidance's weak model: rows that bypass this block (guiders.skipped_blocks)

    def forward(self, x, context, hw=None):
        out = x + self.attn1(self.norm1(x), hw=hw)
        out = out + self.attn2(self.norm2(out), context)
        out = out + self.ff(self.norm3(out))
        if self.skip_rows is not None:
            out = out.clone()
            out[self.skip_rows] = x[self.skip_rows]
        return out


class Transformer2DModel(nn.Module):
    """The spatial transformer: GroupNorm, project in, transformer blocks over the H*W tokens, project out."""

    def __init__(self, ch, heads, context_dim, groups, n_layers=1, linear_proj=False, upcast=False):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim, upcast) for _ in range(n_layers)])
        self.proj_out = nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_proj:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) -> (B, H*W, C) tokens
        if self.linear_proj:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.linear_proj:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear_proj:
            x = self.proj_out(x)
        return x + residual


# ----------------------------------------------------------------------------------------------------------
# The UNet.

class DownBlock(nn.Module):
    """`layers` resnets, each followed by a transformer in a cross-attention block, then a stride-2 conv."""

    def __init__(self, in_ch, out_ch, temb_ch, layers, cfg, attn, heads, context_dim, n_tf, downsample):
        super().__init__()
        groups, eps, act, drop = cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.dropout
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps, act, drop)
                                      for i in range(layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_ch, heads, context_dim, groups, n_tf, cfg.use_linear_projection, cfg.upcast_attention)
            for _ in range(layers)]) if attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers` resnets over [x, skip] concatenations (each followed by a transformer), then a 2x upsample."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, layers, cfg, attn, heads, context_dim, n_tf, upsample):
        super().__init__()
        groups, eps, act, drop = cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.dropout
        # resnet i sees the running features (prev_ch first, then out_ch) concatenated with the matching
        # skip from the down path: out_ch for all but the last, which gets the previous block's in_ch.
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch,
                          temb_ch, groups, eps, act, drop)
            for i in range(layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_ch, heads, context_dim, groups, n_tf, cfg.use_linear_projection, cfg.upcast_attention)
            for _ in range(layers)]) if attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, ch, temb_ch, cfg, heads, context_dim, n_tf):
        super().__init__()
        groups, eps, act, drop, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.dropout, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps, act, drop, scale) for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(ch, heads, context_dim, groups, n_tf, cfg.use_linear_projection, cfg.upcast_attention)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal features of the timestep: frequencies max_period^(-i / (dim/2 - freq_shift))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim, act):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = ACTIVATIONS[act]()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class UNet2DCondition(nn.Module):
    """ε_θ(x_t, t, c): the noise prediction of Stable Diffusion 1.x / 2.x (v-prediction for SD2.x-768) and XL.

    SDXL is the same network by config: no attention in the first down block, `transformer_layers_per_block`
    [1, 2, 10] (up blocks reversed), and the "text_time" embedding added to the time embedding."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        heads = cfg.per_block("attention_head_dim")
        context_dims = cfg.per_block("cross_attention_dim")
        layers = cfg.per_block("layers_per_block")
        n_tf = cfg.per_block("transformer_layers_per_block")
        temb_ch = cfg.time_embedding_dim or ch[0] * 4
        last = len(ch) - 1

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, cfg.act_fn)
        if cfg.addition_embed_type == "text_time":  # SDXL (diffusers' add_time_proj has no weights: a function here)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch, "silu")

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock(
                ch[max(i - 1, 0)], ch[i], temb_ch, layers[i], cfg, kind == "CrossAttnDownBlock2D",
                heads[i], context_dims[i], n_tf[i], downsample=i < last))

        self.mid_block = MidBlock(ch[-1], temb_ch, cfg, heads[-1], context_dims[-1], n_tf[-1])

        # The up path mirrors the down path: block i works at the channels of down block (last - i).
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            j = last - i
            self.up_blocks.append(UpBlock(
                ch[max(j - 1, 0)], ch[min(j + 1, last)], ch[j], temb_ch, layers[j] + 1, cfg,
                kind == "CrossAttnUpBlock2D", heads[j], context_dims[j], n_tf[j], upsample=i < last))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = ACTIVATIONS[cfg.act_fn]()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        """ε_θ(x_t, t, c). SDXL's UNet also takes `text_embeds`, the pooled text embedding (B, P), and `time_ids`,
        its size conditioning (B, 6): diffusers' `added_cond_kwargs`."""
        cfg = self.config
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t.reshape(-1).expand(sample.shape[0])
        t_feat = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_feat.to(sample.dtype))
        if cfg.addition_embed_type == "text_time":
            temb = temb + self.add_embedding(self.text_time_features(text_embeds, time_ids).to(temb.dtype))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size (2x unless a side was odd on the way down)
            size = skips[-1].shape[2:] if skips else None
            x = block(x, block_skips, temb, context, size)

        return self.conv_out(self.conv_act(self.conv_norm_out(x)))

    def text_time_features(self, text_embeds, time_ids):
        """SDXL's added conditioning before its MLP: [pooled text (B, P); the sinusoidal features of each of the six
        size ids (original H, W; crop top, left; target H, W), addition_time_embed_dim each] (Podell et al. 2023)."""
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet is SDXL's (addition_embed_type 'text_time'): pass text_embeds and time_ids")
        cfg = self.config
        ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        return torch.cat([text_embeds.to(ids.dtype), ids.reshape(len(text_embeds), -1)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The KL autoencoder: images in [-1, 1] <-> latents with a diagonal Gaussian posterior.

class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with its own GroupNorm and residual."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, H*W, C)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1, upcast=True)
        y = self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w)
        return x + y


class VAEMidBlock(nn.Module):
    def __init__(self, ch, groups, act, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6, act) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, act, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6, act)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, act, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6, act)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, act, last = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, act, i < last)
                                          for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], groups, act, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, act, last = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.act_fn, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], groups, act, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, act, i < last)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The VAE posterior q(z | x) = N(mean, exp(logvar))."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Drawn on the generator's device, then moved, as diffusers' randn_tensor does: a CPU generator
        # gives the same latents whatever device the model is on.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.scaling_factor = cfg.scaling_factor
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)  # pixels per latent pixel (8 for SD)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lat = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if cfg.use_post_quant_conv else None

    def encode(self, images):
        """Images in [-1, 1], (B, 3, H, W) -> the posterior over (unscaled) latents (B, 4, H/8, W/8)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents):
        """Unscaled latents (already divided by scaling_factor) -> images in about [-1, 1]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


# Old VAE checkpoints (diffusers < 0.14 and conversions of them) name the mid-block attention
# query/key/value/proj_attn and keep its projections as 1x1 convs; the one rename we accept.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_vae_keys(state_dict):
    for key in list(state_dict):
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_VAE_ATTENTION:
            tensor = state_dict.pop(key)
            if tensor.ndim == 4:  # conv 1x1 weight (C, C, 1, 1) -> linear (C, C)
                tensor = tensor[:, :, 0, 0]
            state_dict[".".join(parts[:-2] + [_LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])] = tensor
    return state_dict


# ----------------------------------------------------------------------------------------------------------
# Loading: a config (diffusers' config.json fields) and a state dict in diffusers' names, from a model folder or
# from a single file (singlefile.py).

def unet_config(d, where):
    return checkpoint.config_from_dict(UNetConfig, d, where, UNET_NOOP_FIELDS)


def vae_config(d, where):
    return checkpoint.config_from_dict(VAEConfig, d, where, VAE_NOOP_FIELDS)


def build_unet(cfg, state_dict, where, dtype=torch.float32):
    model = checkpoint.build_on_meta(lambda: UNet2DCondition(cfg))
    checkpoint.load_strict(model, state_dict, where, dtype)
    return model.eval().requires_grad_(False)


def build_vae(cfg, state_dict, where, dtype=torch.float32):
    model = checkpoint.build_on_meta(lambda: AutoencoderKL(cfg))
    checkpoint.load_strict(model, rename_legacy_vae_keys(state_dict), where, dtype)
    return model.eval().requires_grad_(False)


def load_unet(folder, dtype=torch.float32, device="cpu", variant=None):
    """The UNet of a diffusers `unet/` folder (config.json + safetensors)."""
    cfg = unet_config(checkpoint.read_json(f"{folder}/config.json"), f"{folder}/config.json")
    path = checkpoint.find_weights(folder, ["diffusion_pytorch_model", "model"], variant)
    return build_unet(cfg, checkpoint.read_safetensors(path, device), path, dtype)


def load_vae(folder, dtype=torch.float32, device="cpu", variant=None):
    cfg = vae_config(checkpoint.read_json(f"{folder}/config.json"), f"{folder}/config.json")
    path = checkpoint.find_weights(folder, ["diffusion_pytorch_model", "model"], variant)
    return build_vae(cfg, checkpoint.read_safetensors(path, device), path, dtype)
