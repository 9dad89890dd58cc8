"""VideoCrafter2's UNet keys and shapes, enumerated in the construction order of the authors' code
(AILab-CVC/VideoCrafter lvdm/modules/networks/openaimodel3d.py UNetModel.__init__, lvdm/modules/attention.py), with no
use of npo's loader: the layout a real `model.ckpt` has under `model.diffusion_model.`, at any config. The tests and
the GPU benchmark write synthetic files from it.
"""
from dataclasses import dataclass

PUBLISHED = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
                 channel_mult=(1, 2, 4, 4), num_head_channels=64, transformer_depth=1, context_dim=1024)


@dataclass
class Layout:
    """The UNet config of configs/inference_t2v_512_v2.0.yaml (use_linear, temporal_conv, fps_cond, addition_attention
    on; relative position off), its numbers free."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    temporal_conv: bool = True
    relative_position: bool = False  # VideoCrafter1
    temporal_length: int = 16


def linear(p, i, o, bias=True):
    return {f"{p}.weight": (o, i), **({f"{p}.bias": (o,)} if bias else {})}


def conv(p, i, o, kernel):
    return {f"{p}.weight": (o, i, *kernel), f"{p}.bias": (o,)}


def norm(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def attention(p, dim, heads, d_head, context, relative, cfg):
    """CrossAttention (attention.py:45-70): to_q/k/v without bias, to_out.0; the relative-position tables of VC1's
    temporal attention (attention.py:304-306)."""
    inner = heads * d_head
    keys = {**linear(f"{p}.to_q", dim, inner, False), **linear(f"{p}.to_k", context, inner, False),
            **linear(f"{p}.to_v", context, inner, False), **linear(f"{p}.to_out.0", inner, dim)}
    if relative:
        for kv in "kv":
            keys[f"{p}.relative_position_{kv}.embeddings_table"] = (2 * cfg.temporal_length + 1, d_head)
    return keys


def transformer(p, ch, heads, d_head, depth, context, linear_proj, temporal, cfg):
    """SpatialTransformer / TemporalTransformer (attention.py:233-258, 288-329): norm, proj_in, blocks, proj_out;
    a BasicTransformerBlock (l.189-201) is attn1, ff (GEGLU x4), attn2, norm1-3 in construction order. A temporal one
    attends to itself twice (only_self_att: context None)."""
    inner = heads * d_head
    proj = (lambda q, i, o: linear(q, i, o)) if linear_proj else (
        lambda q, i, o: conv(q, i, o, (1,) if temporal else (1, 1)))
    keys = {**norm(f"{p}.norm", ch), **proj(f"{p}.proj_in", ch, inner)}
    ctx = inner if temporal else context
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        rel = temporal and cfg.relative_position
        keys.update({**attention(f"{b}.attn1", inner, heads, d_head, inner, rel, cfg),
                     **linear(f"{b}.ff.net.0.proj", inner, inner * 4 * 2), **linear(f"{b}.ff.net.2", inner * 4, inner),
                     **attention(f"{b}.attn2", inner, heads, d_head, ctx, rel, cfg),
                     **norm(f"{b}.norm1", inner), **norm(f"{b}.norm2", inner), **norm(f"{b}.norm3", inner)})
    keys.update(proj(f"{p}.proj_out", inner, ch))
    return keys


def resblock(p, ch, out, emb, cfg):
    """ResBlock (openaimodel3d.py:149-193): in_layers, emb_layers, out_layers, skip_connection, temopral_conv."""
    keys = {**norm(f"{p}.in_layers.0", ch), **conv(f"{p}.in_layers.2", ch, out, (3, 3)),
            **linear(f"{p}.emb_layers.1", emb, out), **norm(f"{p}.out_layers.0", out),
            **conv(f"{p}.out_layers.3", out, out, (3, 3))}
    if out != ch:
        keys.update(conv(f"{p}.skip_connection", ch, out, (1, 1)))
    if cfg.temporal_conv:  # TemporalConvBlock (l.252-263): conv1 = GN, SiLU, Conv3d; conv2-4 = GN, SiLU, Dropout, Conv3d
        for n, last in ((1, 2), (2, 3), (3, 3), (4, 3)):
            keys.update({**norm(f"{p}.temopral_conv.conv{n}.0", out),
                         **conv(f"{p}.temopral_conv.conv{n}.{last}", out, out, (3, 1, 1))})
    return keys


def plan(cfg=Layout()):
    """The UNet's blocks in forward order (openaimodel3d.py:374-526): [(prefix, [(kind, in, out), ...])] with kinds
    conv_in, init_attn, res, spatial, temporal, down, up; input_blocks.*, middle_block, output_blocks.*."""
    mc = cfg.model_channels
    blocks = [("input_blocks.0", [("conv_in", cfg.in_channels, mc)]), ("init_attn", [("init_attn", mc, mc)])]
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers, ch = [("res", ch, mult * mc)], mult * mc
            if ds in cfg.attention_resolutions:
                layers += [("spatial", ch, ch), ("temporal", ch, ch)]
            blocks.append((f"input_blocks.{len(blocks) - 1}", layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append((f"input_blocks.{len(blocks) - 1}", [("down", ch, ch)]))
            chans.append(ch)
            ds *= 2
    blocks.append(("middle_block", [("res", ch, ch), ("spatial", ch, ch), ("temporal", ch, ch), ("res", ch, ch)]))
    i = 0
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for r in range(cfg.num_res_blocks + 1):
            layers, ch = [("res", ch + chans.pop(), mc * mult)], mc * mult
            if ds in cfg.attention_resolutions:
                layers += [("spatial", ch, ch), ("temporal", ch, ch)]
            if level and r == cfg.num_res_blocks:
                layers.append(("up", ch, ch))
                ds //= 2
            blocks.append((f"output_blocks.{i}", layers))
            i += 1
    return blocks


def layer_keys(p, kind, i, o, emb, cfg):
    d = cfg.num_head_channels
    if kind == "conv_in":
        return conv(p, i, o, (3, 3))
    if kind == "init_attn":  # 8 heads of num_head_channels, use_linear left at False: Conv1d projections (l.379-389)
        return transformer(p, i, 8, d, cfg.transformer_depth, cfg.context_dim, False, True, cfg)
    if kind == "res":
        return resblock(p, i, o, emb, cfg)
    if kind == "spatial":  # ch // 64 heads of 64 dims (l.405-416), Linear projections (use_linear)
        return transformer(p, i, i // d, d, cfg.transformer_depth, cfg.context_dim, True, False, cfg)
    if kind == "temporal":  # temporal_transformer_depth 1 (l.417-425)
        return transformer(p, i, i // d, d, 1, cfg.context_dim, True, True, cfg)
    return conv(f"{p}.op" if kind == "down" else f"{p}.conv", i, o, (3, 3))


def unet_keys(cfg=Layout()):
    """{key: shape} of the UNet of `cfg` (keys without `model.diffusion_model.`), in construction order."""
    mc, emb = cfg.model_channels, cfg.model_channels * 4
    keys = {**linear("time_embed.0", mc, emb), **linear("time_embed.2", emb, emb),
            **linear("fps_embedding.0", mc, emb), **linear("fps_embedding.2", emb, emb)}
    for prefix, layers in plan(cfg):
        for j, (kind, i, o) in enumerate(layers):
            keys.update(layer_keys(f"{prefix}.{j}", kind, i, o, emb, cfg))
    return {**keys, **norm("out.0", mc), **conv("out.2", mc, cfg.out_channels, (3, 3))}
