"""LoRA, written by hand: named low-rank weight offsets (η, δ) on a frozen UNet, with per-sample multipliers.

A LoRA offset of rank r on a layer with weight W is ΔW = (alpha / r) · up · down, applied as

    y = base(x) + Σ_k m_k[b] · (alpha_k / r_k) · up_k(down_k(x))

where each named offset k (e.g. "eta", "delta") has its own rank, alpha and runtime multiplier m_k: a float, or
one value per batch row. NPO's CFG forward (DESIGN §2) is one batched call on [x_t; x_t] with η at [α, 1] and δ
at [β, 0]: the unconditional row sees θ + α·η + β·δ, the conditional row θ + η (eq. 10), without a second UNet.

Design. A targeted nn.Linear / nn.Conv2d is replaced in its parent by a `LoRALinear` / `LoRAConv2d`: a subclass
of the torch class that takes over the *same* weight and bias Parameters, so the frozen weights keep their keys
(`...attn1.to_q.weight`) and `isinstance(m, nn.Linear)` still holds. The offsets live inside the layer as
`to_q.offsets.<name>.lora_down.weight`, `.lora_up.weight` and `.alpha`: kohya's names, so one offset's state
dict is one module's entries of a kohya LoRA file. Removing the last offset puts a plain nn.Linear / nn.Conv2d
back. (A forward hook would leave the module's class alone, but hide the LoRA from anyone reading the layer.)

The down/up pair follows kohya and peft: for a Linear, down = Linear(in, r), up = Linear(r, out); for a Conv2d,
down is a conv with the base's kernel, stride and padding to r channels, up a 1x1 conv. LoRA weights are fp32 by
default whatever the base dtype: the offset is computed in the LoRA dtype and cast back.

Files: we write kohya's format (A1111, ComfyUI and diffusers' `load_lora_weights` read it) and read it plus
diffusers / peft's (`unet.<module>.lora_A.weight`, the older `.lora.down.weight`, and the first
`processor.to_q_lora.down.weight`). A file may also hold text-encoder offsets (kohya `lora_te_<module>`, diffusers
`text_encoder.<module>`): `load_loras` puts them on the CLIP text encoder, whose module names are transformers'
(`text_model.encoder.layers.0.self_attn.q_proj`), so the same rule maps kohya's flat names. kohya names SD1/2 UNet
layers after diffusers' modules and SDXL's after Stability's UNet (`lora_unet_input_blocks_4_1_...`, `sgm_name`);
both styles are read for any model, and SDXL files are written the SGM way with kohya's SDXL metadata (SDXL's
text-encoder keys, `lora_te1_` / `lora_te2_`, are refused). LoCon (kohya's LoRA on 3x3 convs) is a LoRA; LyCORIS's
LoHa, LoKr, OFT, DoRA... parametrise ΔW otherwise and are refused by name.
Several files at weights w_k load as one offset, their weighted sum (`weighted_sum`).
`extract_offset` makes an offset from a full fine-tune: per layer the truncated SVD of θ_ft − θ (Eckart–Young).

    load_lora(unet, "dpo.safetensors", "eta")              # η, the preference offset
    load_lora(unet, "npo.safetensors", "delta")            # δ, the NPO offset
    load_loras({"unet": unet, "text_encoder": te}, [("a.safetensors", 0.8), ("b.safetensors", 1.0)], "eta")
    with multipliers(unet, eta=[alpha, 1.0], delta=[beta, 0.0]):
        eps_neg, eps_pos = unet(torch.cat([x, x]), t, torch.cat([neg_embeds, pos_embeds])).chunk(2)
"""
import contextlib
import json
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from safetensors.torch import save

from . import checkpoint
from .checkpoint import UserError, few

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # both attn1 (self) and attn2 (cross), as the NPO authors
ROLES = ("eta", "delta")


# ----------------------------------------------------------------------------------------------------------
# The layers.

class Offset(nn.Module):
    """One low-rank offset ΔW = (alpha / rank) · lora_up · lora_down of a Linear or Conv2d layer."""

    def __init__(self, layer, rank, alpha, dtype=torch.float32):
        super().__init__()
        kw = dict(bias=False, device=layer.weight.device, dtype=dtype)
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                       layer.dilation, **kw)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, layer.out_features, **kw)
        # init as kohya and peft: down kaiming-uniform (a=√5, torch's Linear default), up zero, so ΔW = 0 at step 0
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=layer.weight.device))  # kept for files
        self.rank, self.scale = rank, alpha / rank
        self.multiplier = 1.0  # a float, or a (B,) tensor: one multiplier per batch row
        self.merged = False    # True while ΔW is fused into the base weight (then the forward skips it)

    def features(self, x):
        """m · (alpha / r) · down(x) in the LoRA dtype: a per-row m scales the rank-r features (the cheapest place)."""
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        m = self.multiplier
        if isinstance(m, torch.Tensor):
            # B values for n·B rows: a video UNet folds frames or pixels into the batch batch-major (rows b·n … b·n +
            # n − 1 are sample b's, video.py), so each value covers n consecutive rows; images have n = 1
            if h.shape[0] % m.shape[0]:
                raise ValueError(f"a per-sample LoRA multiplier has {m.shape[0]} values for a batch of {h.shape[0]}")
            m = m.repeat_interleave(h.shape[0] // m.shape[0]).to(h.device, h.dtype).view(-1, *[1] * (h.ndim - 1))
        return h * (m * self.scale)

    def forward(self, x):
        """m · (alpha / r) · up(down(x)), the offset's contribution to the layer's output."""
        return self.lora_up(self.features(x))

    @torch.no_grad()
    def accumulate(self, x, y):
        """y += m · (alpha / r) · up(down(x)) for a Linear, in place: one GEMM that accumulates into y (addmm_ with
        beta 1) instead of writing up(·) to a new tensor and reading both back to add them. Same sum, up to float
        rounding; only used without autograd (the in-place update of y would be in its graph)."""
        h = self.features(x)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_up.weight.t())

    def delta_weight(self):
        """ΔW in the base weight's shape: for a conv, the 1x1 up folds into the down kernel."""
        down, up = self.lora_down.weight, self.lora_up.weight
        return self.scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])


class LoRAMixin:
    """What LoRALinear and LoRAConv2d add to their torch class: the named offsets and the weight merge."""

    def __init__(self, *args):
        super().__init__(*args)
        self.offsets = nn.ModuleDict()
        self.unmerged = None  # the exact original weight while offsets are merged into it

    def forward(self, x):
        y = super().forward(x)
        for offset in self.offsets.values():
            # a merged offset is in the weight already; multiplier 0 is skipped, not multiplied: exactly the base
            if offset.merged or (isinstance(offset.multiplier, (int, float)) and offset.multiplier == 0):
                continue
            if isinstance(self, nn.Linear) and not torch.is_grad_enabled() and offset.lora_up.weight.dtype == y.dtype:
                offset.accumulate(x, y)  # sampling: the up-projection adds into y in place, no extra pass over y
            else:
                y = y + offset(x).to(y.dtype)
        return y


class LoRALinear(LoRAMixin, nn.Linear):
    pass


class LoRAConv2d(LoRAMixin, nn.Conv2d):
    pass


def _rebuild(cls, module):
    """A `cls` (nn.Linear / nn.Conv2d or a LoRA subclass) that takes over `module`'s weight and bias Parameters."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UserError(f"LoRA on a grouped or non-zero-padded conv is not supported ({module}).")
        args = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, 1, module.bias is not None)
    else:
        args = (module.in_features, module.out_features, module.bias is not None)
    with torch.device("meta"):  # nothing allocated: the parameters are the old module's
        new = cls(*args)
    new.weight, new.bias = module.weight, module.bias
    return new.train(module.training)


# ----------------------------------------------------------------------------------------------------------
# Offsets on a model.

def targetable(model):
    """Every nn.Linear / nn.Conv2d of `model` by module name: the layers a LoRA may target (not LoRA's own)."""
    found, inside = {}, None
    for name, m in model.named_modules():
        if inside and name.startswith(inside):  # the lora_down / lora_up layers of a LoRA layer
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            found[name], inside = m, name + "."
    return found


def lora_layers(model):
    return {name: m for name, m in targetable(model).items() if isinstance(m, LoRAMixin)}


def offsets(model, name):
    """The Offset modules named `name`, by layer name."""
    return {layer_name: layer.offsets[name] for layer_name, layer in lora_layers(model).items() if name in layer.offsets}


def offset_names(model):
    return sorted({name for layer in lora_layers(model).values() for name in layer.offsets})


def check_new_name(model, name):
    if not name.isidentifier():
        raise UserError(f"LoRA offset name {name!r} must be an identifier such as 'eta' or 'delta'.")
    if name in offset_names(model):
        raise UserError(f"the model already has a LoRA offset named {name!r}; remove it first or pick another name.")


def attach(model, layer_name, name, rank, alpha, dtype):
    """Add an Offset `name` to the layer `layer_name`, first swapping a plain Linear/Conv2d for its LoRA class."""
    layer = model.get_submodule(layer_name)
    if not isinstance(layer, LoRAMixin):
        layer = _rebuild(LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear, layer)
        model.set_submodule(layer_name, layer)
    layer.offsets[name] = Offset(layer, rank, alpha, dtype)
    return layer.offsets[name]


def _suffix(layer_name):
    """The layer's name inside its block, a valid target: `...transformer_blocks.0.attn1.to_out.0` -> `attn1.to_out.0`,
    `...resnets.1.conv1` -> `conv1`, `time_embedding.linear_1` -> itself."""
    parts = layer_name.split(".")
    last_index = max([i for i, p in enumerate(parts[:-1]) if p.isdigit()], default=-1)
    return ".".join(parts[last_index + 1:])


def target_list(targets):
    """`targets` as a list of suffixes: a comma-separated string ("to_q,to_k") is split, a sequence kept."""
    return [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)


def select_layers(model, targets):
    """The names of the Linear / Conv2d layers whose names end with one of `targets`: module-name suffixes such as
    `to_q`, `attn2.to_k`, `conv1`, `proj_in` (a comma-separated string works)."""
    targets = target_list(targets)
    layers = targetable(model)
    chosen = {t: [n for n in layers if n == t or n.endswith("." + t)] for t in targets}
    unmatched = [t for t, names in chosen.items() if not names]
    if unmatched or not targets:
        raise UserError(f"LoRA targets {unmatched or targets} match no Linear/Conv2d layer of the model; "
                        f"use suffixes such as {', '.join(DEFAULT_TARGETS)}, conv1, proj_in.")
    return sorted({n for names in chosen.values() for n in names})


def add_offset(model, name, rank=8, alpha=None, targets=DEFAULT_TARGETS, dtype=torch.float32):
    """A fresh trainable offset `name` (ΔW = 0) on every layer whose name ends with one of `targets`
    (`select_layers`); `alpha` defaults to `rank` (scale 1). Returns the offset's parameters, for the optimizer."""
    check_new_name(model, name)
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1 (got {rank}).")
    for layer_name in select_layers(model, targets):
        attach(model, layer_name, name, rank, rank if alpha is None else alpha, dtype)
    return parameters(model, name)


def parameters(model, name):
    return [p for offset in offsets(model, name).values() for p in offset.parameters()]


def _as_multiplier(value, device):
    """A float, or a 1-D float32 tensor on `device` (one value per batch row)."""
    if isinstance(value, (int, float)):
        return float(value)
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    return float(value) if value.ndim == 0 else value.reshape(-1)


def set_multipliers(model, **values):
    """Set the multiplier of each named offset: `set_multipliers(unet, eta=[α, 1], delta=[β, 0])`."""
    for name, value in values.items():
        found = offsets(model, name)
        if not found:
            raise UserError(f"the model has no LoRA offset named {name!r} (it has: {offset_names(model) or 'none'}).")
        m = _as_multiplier(value, next(iter(found.values())).alpha.device)
        for offset in found.values():
            offset.multiplier = m


@contextlib.contextmanager
def multipliers(model, **values):
    """`with multipliers(unet, eta=0.0): ...` sets multipliers for the block and restores the old ones after.

    Multiplier 0 switches an offset off exactly (DPO's reference model is the same UNet with η at 0)."""
    old = {offset: offset.multiplier for name in values for offset in offsets(model, name).values()}
    try:
        set_multipliers(model, **values)
        yield model
    finally:
        for offset, m in old.items():
            offset.multiplier = m


def remove(model, name=None):
    """Remove the offset `name` (all offsets when None); a layer left without offsets is a plain layer again."""
    if name is not None and name not in offset_names(model):
        raise UserError(f"the model has no LoRA offset named {name!r} (it has: {offset_names(model) or 'none'}).")
    for layer_name, layer in lora_layers(model).items():
        if layer.unmerged is not None:
            raise UserError("LoRA offsets are merged into the weights; call lora.unmerge(model) before removing them.")
        for n in [n for n in layer.offsets if name is None or n == name]:
            del layer.offsets[n]
        if not layer.offsets:
            model.set_submodule(layer_name, _rebuild(nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear, layer))


def share_offset(source, target, name):
    """Put `source`'s offset `name` on the same layers of `target` (a model of the same architecture) as the very
    same modules: one copy of the LoRA's weights serves both models. Their multipliers are shared too, so set them
    per call (`multipliers`), as the two-pass denoisers of pipeline.py do."""
    check_new_name(target, name)
    for layer_name, offset in offsets(source, name).items():
        layer = target.get_submodule(layer_name)
        if not isinstance(layer, LoRAMixin):
            layer = _rebuild(LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear, layer)
            target.set_submodule(layer_name, layer)
        layer.offsets[name] = offset

# ----------------------------------------------------------------------------------------------------------
# Merging offsets into the weights (the authors' way: fused weights, one weight set per branch).

def _merged_weight(layer, weights):
    """W + Σ_k m_k ΔW_k, summed in fp32 and cast to W's dtype."""
    w = layer.weight.detach().float()
    for name, m in weights.items():
        if name in layer.offsets:
            w = w + m * layer.offsets[name].delta_weight().detach().float()
    return w.to(layer.weight.dtype)


def _check_weights(model, weights):
    unknown = [n for n in weights if n not in offset_names(model)]
    if unknown:
        raise UserError(f"the model has no LoRA offset named {unknown} (it has: {offset_names(model) or 'none'}).")


def merge(model, weights):
    """Fuse offsets into the base weights in place, θ ← θ + Σ m_k ΔW_k, for `weights = {name: m_k}`.

    The merged offsets are skipped by the forward until `unmerge`, which restores θ bit for bit."""
    _check_weights(model, weights)
    layers = [layer for layer in lora_layers(model).values() if any(n in layer.offsets for n in weights)]
    if any(layer.unmerged is not None for layer in layers):
        raise UserError("LoRA offsets are already merged; call lora.unmerge(model) first.")
    with torch.no_grad():
        for layer in layers:
            layer.unmerged = layer.weight.detach().clone()  # keep θ itself: subtracting ΔW again would round
            layer.weight.copy_(_merged_weight(layer, weights))
            for n in weights:
                if n in layer.offsets:
                    layer.offsets[n].merged = True


def unmerge(model):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if layer.unmerged is not None:
                layer.weight.copy_(layer.unmerged)
                layer.unmerged = None
            for offset in layer.offsets.values():
                offset.merged = False


def merged_state_dict(model, weights):
    """The base model's state dict (no LoRA keys) with θ + Σ m_k ΔW_k in the layers the offsets touch.

    Untouched tensors are shared with `model`, not copied: a second UNet loaded from this dict (strictly, with
    `assign=True`) costs only the merged layers. This gives the authors' two weight sets for ε_pos and ε_neg."""
    _check_weights(model, weights)
    layers = lora_layers(model)
    if any(layer.unmerged is not None for layer in layers.values()):
        raise UserError("LoRA offsets are merged in place; call lora.unmerge(model) first.")
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(f"{layer_name}.offsets.") for layer_name in layers)}
    for layer_name, layer in layers.items():
        if any(n in layer.offsets for n in weights):
            state[f"{layer_name}.weight"] = _merged_weight(layer, weights)
    return state


# ----------------------------------------------------------------------------------------------------------
# Writing LoRA files (kohya's format).

def kohya_name(layer_name):
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return "lora_unet_" + layer_name.replace(".", "_")


def is_sdxl(model):
    return getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"


def is_sd2(model):
    """An SD2.x UNet (not SDXL): a 1024-wide text context (OpenCLIP ViT-H; SD1's CLIP ViT-L is 768), or at other
    widths (small test models) Linear projections in and out of the transformers, as singlefile.family decides."""
    cfg = model.config
    context = cfg.per_block("cross_attention_dim")[0]
    return context == 1024 or (context != 768 and bool(cfg.use_linear_projection))


def offset_state_dict(model, name):
    """The offset `name` as kohya keys: `lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`; the layer
    named as diffusers names it (kohya's SD1/2 files), or for SDXL as Stability's UNet does (kohya's SDXL files)."""
    found = offsets(model, name)
    if not found:
        raise UserError(f"the model has no LoRA offset named {name!r} (it has: {offset_names(model) or 'none'}).")
    sgm = is_sdxl(model) and all(sgm_name(n, model) for n in found)  # one style per file: readers take one or the other
    flat = (lambda n: "lora_unet_" + sgm_name(n, model)) if sgm else kohya_name
    return {f"{flat(layer_name)}.{k}": v for layer_name, offset in found.items() for k, v in offset.state_dict().items()}


# kohya trains SDXL on Stability's own UNet (generative-models, the original LDM layout), so its SDXL files name
# layers `input_blocks_4_1_transformer_blocks_0_attn1_to_q` where diffusers has `down_blocks.1.attentions.0...`.
# With L = layers_per_block, a down level holds L resnets (+ transformers) and a downsampler: input_blocks.i is
# down level (i−1)//(L+1), slot (i−1)%(L+1) (slot L the downsampler `op`), sub-module 0 the resnet, 1 the
# transformer; middle_block.0/1/2 is resnet, transformer, resnet; output_blocks.i is up block i//(L+1), slot
# i%(L+1), sub-module 0 resnet, 1 transformer, then the upsampler. Inside a resnet a few layers have other names.
SGM_RESNET = {"conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "conv2": "out_layers_3",
              "conv_shortcut": "skip_connection"}
SGM_OUTSIDE = {"conv_in": "input_blocks_0_0", "time_embedding.linear_1": "time_embed_0",
               "time_embedding.linear_2": "time_embed_2", "add_embedding.linear_1": "label_emb_0_0",
               "add_embedding.linear_2": "label_emb_0_2", "conv_out": "out_2"}


def sgm_name(layer_name, unet):
    """The SGM name (underscored, as in kohya's keys) of a diffusers UNet layer, by the rules above; None for a
    layer outside them, or a UNet whose levels differ in layers_per_block (no SGM counterpart)."""
    if layer_name in SGM_OUTSIDE:
        return SGM_OUTSIDE[layer_name]
    per_level = set(unet.config.per_block("layers_per_block"))
    block, *rest = layer_name.split(".")
    if len(per_level) != 1 or block not in ("down_blocks", "mid_block", "up_blocks"):
        return None
    group = per_level.pop() + 1  # SGM blocks per level: L resnets (+ transformers) and the down/upsampler
    if block == "mid_block":
        kind, k, rest = rest[0], int(rest[1]), rest[2:]
        sgm = f"middle_block_{2 * k if kind == 'resnets' else 1}"
    else:
        level, kind, k, rest = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        if block == "down_blocks":
            i = 1 + level * group + (group - 1 if kind == "downsamplers" else k)
            sub, rest = (0, ["op"]) if kind == "downsamplers" else ({"resnets": 0, "attentions": 1}[kind], rest)
            sgm = f"input_blocks_{i}_{sub}"
        else:  # up_blocks: the upsampler follows the last resnet (and its transformer, if the block has them)
            i = level * group + (group - 1 if kind == "upsamplers" else k)
            attn = unet.up_blocks[level].attentions is not None
            sub = {"resnets": 0, "attentions": 1, "upsamplers": 1 + attn}[kind]
            sgm = f"output_blocks_{i}_{sub}"
    if kind == "resnets":
        rest = [SGM_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return "_".join([sgm, *rest])


def save_lora(model, name, path, role=None, base_model=None, metadata=None, prediction_type=None):
    """Write the offset `name` as a kohya LoRA safetensors file, atomically (temporary file, then os.replace).

    The metadata strings say what it is: `npo_role` ("eta": the preference offset η, "delta": the NPO offset δ),
    rank, alpha, targets, base model, plus kohya's `ss_network_*` and `ss_base_model_version` (not on a video UNet)
    fields so other tools recognise the file (`prediction_type` "v_prediction" marks an SD1/2 v-model as kohya does).
    `metadata` adds more strings (e.g. suggested α / β).

    Offsets made by `add_offset` have one alpha. diffusers 0.42 would misread a file whose alphas differ between
    attention layers: its per-layer alphas never match those layers, which all get the most common alpha."""
    if role is not None and role not in ROLES:
        raise UserError(f"npo_role must be one of {ROLES}, not {role!r}.")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in offset_state_dict(model, name).items()}
    found = offsets(model, name)
    rank = Counter(o.rank for o in found.values()).most_common(1)[0][0]  # kohya files name one dim for the network
    alpha = Counter(float(o.alpha) for o in found.values()).most_common(1)[0][0]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "npo_rank": str(rank), "npo_alpha": f"{alpha:g}",
            "npo_targets": ",".join(sorted({_suffix(n) for n in found}))}
    if hasattr(model, "transformer_in"):  # a video UNet (video.py): kohya has no name for one, and SD2's would lie
        meta["npo_architecture"] = "unet3d"
    elif is_sdxl(model):  # what kohya's sd-scripts write for an SDXL LoRA (and its SAI model spec)
        meta.update({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "modelspec.sai_model_spec": "1.0.0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    else:  # kohya's SD1/2 names: sd_v1, sd_v2, and "_v" appended for v-prediction (sd_v2_v); A1111 reads ss_v2
        v2 = is_sd2(model)
        meta.update({"ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + "_v" * (prediction_type == "v_prediction"),
                     "ss_v2": str(v2)})
    if role is not None:
        meta["npo_role"] = role
    if base_model is not None:
        meta["npo_base_model"] = str(base_model)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    checkpoint.atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


# ----------------------------------------------------------------------------------------------------------
# Reading LoRA files: kohya's and diffusers / peft's.

KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
              "alpha": "alpha"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # kohya's flat names, per model
SDXL_TEXT_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
# LyCORIS's (and peft's) other parametrisations of ΔW, by the names of their tensors: not up · down, so refused
OTHER_TYPES = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "boft_": "BOFT", "dora_scale": "DoRA",
               "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon with a Tucker core", "ia3_l": "IA3",
               "on_input": "IA3", "diff": "full-weight difference", "diff_b": "full-weight difference",
               "w_norm": "norm-layer offset", "b_norm": "norm-layer offset"}


def _part(key):
    """The model a LoRA key belongs to: kohya's `lora_te_` and diffusers' `text_encoder.` name the text encoder,
    everything else (`lora_unet_`, `unet.`, peft's bare or `base_model.model.` names) the UNet."""
    return "text_encoder" if key.startswith(("lora_te_", "text_encoder.")) else "unet"


def _other_type(key):
    """The LyCORIS / peft type a key belongs to when it is not a LoRA down/up/alpha (`….hada_w1_a` is LoHa), or None."""
    for leaf in key.split(".")[1:]:
        for marker, kind in OTHER_TYPES.items():
            if leaf == marker or (marker.endswith("_") and leaf.startswith(marker)):
                return kind
    return None


def _legacy_attn_procs_name(key, part):
    """diffusers' first LoRA files (`save_attn_procs`, 2023) name the attention processor, not the layer:
    `attn1.processor.to_q_lora.down.weight` is `attn1.to_q.lora.down.weight` (`to_out_lora` is `to_out.0`), and in
    the text encoder `self_attn.to_q_lora.` is CLIP's `self_attn.q_proj.lora.`, `mlp.fc1.lora_linear_layer.` is
    `mlp.fc1.lora.`."""
    key = key.replace(".processor.", ".").replace(".lora_linear_layer.", ".lora.")
    if part == "text_encoder":
        return re.sub(r"\.to_(q|k|v|out)_lora\.", r".\1_proj.lora.", key)
    return re.sub(r"\.to_(q|k|v|out)_lora\.", lambda m: f".to_{m[1]}{'.0' if m[1] == 'out' else ''}.lora.", key)


def _parse_key(key, part, layers, kohya_names):
    """(layer name, "down" | "up" | "alpha") for a LoRA key of `part`, or None if it names no layer of the model."""
    prefix = KOHYA_PREFIXES[part]
    if key.startswith(prefix):  # kohya: the module name with "." as "_", then the tensor
        flat, _, leaf = key[len(prefix):].partition(".")
        return (kohya_names[flat], KOHYA_PARTS[leaf]) if flat in kohya_names and leaf in KOHYA_PARTS else None
    # diffusers / peft: `unet.` / `text_encoder.` from a pipeline's save_lora_weights, `base_model.model.` from peft
    key = _legacy_attn_procs_name(key.removeprefix(part + ".").removeprefix("base_model.model."), part)
    for leaf, role in PEFT_PARTS.items():
        layer = key.removesuffix("." + leaf)
        if layer != key:
            # transformers ≥ 5 names CLIP's modules without the `text_model.` level that ours (and the files) keep
            layer = layer if layer in layers else "text_model." + layer
            return (layer, role) if layer in layers else None
    return None


def _peft_config(path, metadata, part):
    """The LoraConfig fields saved with a diffusers / peft file for `part`, or {}.

    diffusers (≥0.33) stores them as JSON in the metadata string `lora_adapter_metadata` (keys prefixed `unet.` /
    `text_encoder.` when a pipeline saved them); peft's own save_pretrained writes `adapter_config.json` beside."""
    if "lora_adapter_metadata" in metadata:
        try:
            cfg = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: its lora_adapter_metadata is not JSON ({e}); the file is damaged.")
        mine = {k.removeprefix(part + "."): v for k, v in cfg.items() if k.startswith(part + ".")}
        return mine or {k: v for k, v in cfg.items() if "." not in k}
    beside = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.basename(path) == "adapter_model.safetensors" and os.path.isfile(beside):
        return checkpoint.read_json(beside)
    return {}


def _peft_alpha(cfg, layer_name, rank):
    """peft's alpha for a layer: `alpha_pattern` entries match a name suffix (first match wins), else `lora_alpha`.

    No config means diffusers' convention: no alpha, scale 1 (alpha = rank). With `use_rslora` peft scales by
    alpha / √r; we return the alpha that gives that scale as alpha / r."""
    alpha = cfg.get("lora_alpha", rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", layer_name):
            alpha = value
            break
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


def _fit(t, shape):
    """`t` in `shape`, also between the 2-D and 1x1-conv forms of one matrix (files disagree on SD1's proj_in)."""
    if tuple(t.shape) == shape:
        return t
    if {t.ndim, len(shape)} == {2, 4} and tuple(t.shape[:2]) == shape[:2] and t.numel() == math.prod(shape):
        return t.reshape(shape)
    return None


def _lora_shapes(layer, rank):
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def _check_kinds(path, tensors, parts):
    """Refuse what is not a LoRA for an SD UNet or SD1.x/2.x text encoder, or names a model not in `parts`."""
    for key in tensors:
        kind = _other_type(key)
        if kind is not None:
            found = [k for k in tensors if _other_type(k) == kind]
            raise UserError(f"{path} is a LyCORIS / peft {kind} file ({few(found, 3)}), not a LoRA; npo reads LoRA "
                            "and LoCon offsets (ΔW = up · down): merge it into the model with another tool instead.")
    sdxl_text = [k for k in tensors if k.startswith(SDXL_TEXT_PREFIXES)]
    if sdxl_text:
        raise UserError(f"{path} has {len(sdxl_text)} SDXL text-encoder LoRA keys ({few(sdxl_text, 3)}); npo applies "
                        "SDXL LoRAs to the UNet only: save the file again without the lora_te1_ / lora_te2_ keys.")
    text = [k for k in tensors if _part(k) == "text_encoder"]
    if text and "text_encoder" not in parts:
        raise UserError(f"{path} has {len(text)} text-encoder LoRA keys ({few(text, 3)}); only sampling applies "
                        "those (to the text encoder): use a UNet-only LoRA here.")


def _read_part(path, tensors, model, part, cfg, total):
    """{layer name: (lora_down, lora_up, alpha)} from the keys of one model, checked against its layers."""
    layers = targetable(model)
    kohya_names = {n.replace(".", "_"): n for n in layers}  # kohya's flat names, diffusers-style and SGM-style
    if hasattr(model, "up_blocks") and not hasattr(model, "transformer_in"):  # SGM names are an image UNet's
        kohya_names.update({flat: n for n, flat in ((n, sgm_name(n, model)) for n in layers) if flat})
    parts, unknown = {}, []
    for key, t in tensors.items():
        parsed = _parse_key(key, part, layers, kohya_names)
        if parsed is None:
            unknown.append(key)
        else:
            parts.setdefault(parsed[0], {})[parsed[1]] = (key, t)
    if unknown:
        raise UserError(f"{path}: {len(unknown)} of {total} keys name no Linear/Conv2d layer of this model's "
                        f"{part.replace('_', ' ')} or are not LoRA down/up/alpha weights ({few(unknown, 3)}); npo reads "
                        "kohya (lora_unet_<layer>.lora_down.weight, lora_te_...) and diffusers/peft "
                        "(<layer>.lora_A.weight) LoRAs for a Stable Diffusion 1.x/2.x/XL model.")
    incomplete = [key for p in parts.values() if "down" not in p or "up" not in p for key, _ in p.values()]
    if incomplete:
        raise UserError(f"{path}: {len(incomplete)} keys lack their lora_down/lora_up partner ({few(incomplete, 3)}); "
                        "the file is incomplete.")
    out, misshaped = {}, []
    for layer_name, p in parts.items():
        (down_key, down), (up_key, up) = p["down"], p["up"]
        rank = down.shape[0]
        down_shape, up_shape = _lora_shapes(layers[layer_name], rank)
        fitted = _fit(down, down_shape), _fit(up, up_shape)
        for key, t, shape, fit in ((down_key, down, down_shape, fitted[0]), (up_key, up, up_shape, fitted[1])):
            if fit is None:
                misshaped.append(f"{key} {tuple(t.shape)} vs {shape}")
        if "alpha" in p:
            alpha = float(p["alpha"][1]) or rank
        else:
            alpha = rank if down_key.startswith(KOHYA_PREFIXES[part]) else _peft_alpha(cfg, layer_name, rank)
        out[layer_name] = (*fitted, alpha)
    if misshaped:
        raise UserError(f"{path}: {len(misshaped)} LoRA tensors do not fit this model ({few(misshaped, 3)}); "
                        "was the LoRA made for another base model (e.g. SD1.x vs SD2.x)?")
    return out


def read_lora(path, models):
    """The offsets in a LoRA file as {part: {layer name: (lora_down, lora_up, alpha)}}, for the parts of `models`
    ({"unet": unet} or {"unet": unet, "text_encoder": text_encoder}) that the file has keys for.

    A key that names no Linear/Conv2d of its model, a down without its up, a tensor of the wrong shape, a LyCORIS
    type, or text-encoder keys when no text encoder is given is a UserError naming the keys. Missing alpha: kohya's
    rule (alpha = rank, so scale 1; alpha 0 counts as missing), or peft's config where the file carries one."""
    tensors = checkpoint.read_safetensors(path)
    if not tensors:
        raise UserError(f"{path} holds no tensors; it is not a LoRA file.")
    _check_kinds(path, tensors, models)
    unet_keys = [k for k in tensors if _part(k) == "unet"]  # a video UNet takes no LoRA without temporal layers
    if hasattr(models.get("unet"), "transformer_in") and unet_keys and not any("temp_attentions" in k or "transformer_in" in k for k in unet_keys):
        raise UserError(f"{path} has no temporal-layer keys (temp_attentions, transformer_in): it is an image LoRA and this is "
                        "a video UNet; train η/δ on the video model (npo.py train --model VIDEO_MODEL) and load that.")
    metadata = checkpoint.read_safetensors_metadata(path)
    out = {}
    for part, model in models.items():
        mine = {k: t for k, t in tensors.items() if _part(k) == part}
        if mine:
            out[part] = _read_part(path, mine, model, part, _peft_config(path, metadata, part), len(tensors))
    return out


def weighted_sum(loras, weights):
    """Σ_k w_k ΔW_k of several LoRAs ({layer: (down, up, alpha)} each) as one LoRA. With s_k = alpha_k / r_k,

        Σ_k w_k s_k up_k down_k = [w_1 s_1 up_1 | w_2 s_2 up_2 | …] · [down_1; down_2; …],

    a LoRA of rank Σ r_k (of the LoRAs that touch the layer) with the factors side by side and scale 1, computed in
    float32. So the sum is one offset, whose multipliers (eq. 10) act on every term alike. One LoRA at weight 1 is
    returned as it is."""
    if len(loras) == 1 and weights[0] == 1:
        return loras[0]
    out = {}
    for layer in dict.fromkeys(layer for entries in loras for layer in entries):  # first-seen order
        terms = [(entries[layer], w) for entries, w in zip(loras, weights) if layer in entries]
        down = torch.cat([d.float() for (d, _, _), _ in terms])
        up = torch.cat([u.float() * (w * alpha / d.shape[0]) for (d, u, alpha), w in terms], dim=1)
        out[layer] = (down, up, down.shape[0])
    return out


def load_loras(models, files, name, dtype=torch.float32):
    """Add the weighted sum of LoRA files, `files` = [(path, weight), ...], as the frozen offset `name` on each
    model of `models` ({"unet": ..., "text_encoder": ...}) that the files touch. Every file is read and checked
    before anything is attached. Returns each file's metadata strings."""
    for model in models.values():
        check_new_name(model, name)
    read = [read_lora(path, models) for path, _ in files]
    with torch.no_grad():
        for part, model in models.items():
            touching = [(r[part], w) for r, (_, w) in zip(read, files) if part in r]
            if not touching:
                continue
            for layer_name, (down, up, alpha) in weighted_sum(*zip(*touching)).items():
                offset = attach(model, layer_name, name, down.shape[0], alpha, dtype)
                offset.lora_down.weight.copy_(down)
                offset.lora_up.weight.copy_(up)
                offset.requires_grad_(False)
    return [checkpoint.read_safetensors_metadata(path) for path, _ in files]


def load_lora(model, path, name, dtype=torch.float32):
    """Add the UNet LoRA file at `path` to `model` as the (frozen) offset `name`; return the file's metadata strings."""
    return load_loras({"unet": model}, [(path, 1.0)], name, dtype)[0]
