"""The appendix's training-free baselines beside NPO (tables 5-6): guidance away from the same UNet, perturbed.

- SEG, Smoothed Energy Guidance (Hong 2024): the self-attention queries of chosen layers blurred by a Gaussian
  (`smooth_query`) on a third, conditional branch; combined by `sampler.seg_combine`.
- Autoguidance (Karras et al. 2024): the unconditional branch runs a weak model. The paper's rows take the base θ
  (eq. 10 at α = β = 0, plain CFG); diffusers' AutoGuidance skips chosen transformer blocks (`skipped_blocks`).

The perturbations act on rows of one batched forward (`smoothed_queries`, `skipped_blocks`), so the other rows of the
same call run the plain UNet; `seg_denoiser` and `autoguidance_denoiser` build eq. 10's batched rows around them, and
`guided.generate(..., guider=Guider(...))` samples with them. The flags of `npo.py sample` are read here too
(`add_arguments`, `from_arguments`, `png_settings`).
"""
import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import guided
from . import lora
from . import sampler
from .checkpoint import UserError, finite_float

SEG_INFINITE_SIGMA = 9999.0  # SEG's threshold: a larger σ is the infinite blur, every token's query the mean


def smooth_query(q, h, w, sigma):
    """Smoothed Energy Guidance (Hong 2024): blur the self-attention query (B, H*W, C) over its (H, W) token grid by
    a Gaussian of std σ, per channel; σ > 9999 is the infinite blur, the mean query. Blurring the query flattens the
    attention's energy landscape; the UNet with it is SEG's "bad" prediction.

    Kernel as the SEG authors': size ⌈6σ⌉ rounded up to odd, reflect padding. Like diffusers (the authors' code
    fails there) the size is capped at the grid side (+1 when even), so that the padding fits a small grid."""
    b, n, c = q.shape
    grid = q.transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)
    if sigma > SEG_INFINITE_SIGMA:
        return grid.mean(dim=(2, 3)).unsqueeze(1).expand(b, n, c)
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2

    def kernel1d(side):
        k = min(size, side + 1 - side % 2)
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=q.device)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        return pdf / pdf.sum()
    kernel = torch.outer(kernel1d(h), kernel1d(w)).to(q.dtype)
    kh, kw = kernel.shape
    grid = F.pad(grid, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    grid = F.conv2d(grid, kernel.expand(c, 1, kh, kw), groups=c)
    return grid.reshape(b, c, n).transpose(1, 2)


def transformer_blocks(model):
    """The UNet's transformer blocks (one self-attention `attn1` each) by part, in module order: {"down": [...],
    "mid": [...], "up": [...]}. `down[i]` is what the SEG authors' code calls layer "d<i>" (and "m<i>", "u<i>")."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module as _orig_mod
    parts = {"down": model.down_blocks, "mid": [model.mid_block], "up": model.up_blocks}
    return {part: [tb for block in blocks for attn in (block.attentions or []) for tb in attn.transformer_blocks]
            for part, blocks in parts.items()}


@contextlib.contextmanager
def smoothed_queries(blocks, sigma, rows):
    """SEG inside the `with`: the self-attention of each transformer block in `blocks` blurs the query of the batch
    rows `rows` (a slice) by σ (`smooth_query`); the other rows run unchanged, so one forward holds both."""
    def blur(q, hw):
        q = q.clone()
        q[rows] = smooth_query(q[rows], *hw, sigma)
        return q
    for block in blocks:
        block.attn1.query_blur = blur
    try:
        yield
    finally:
        for block in blocks:
            block.attn1.query_blur = None


@contextlib.contextmanager
def skipped_blocks(blocks, rows):
    """Autoguidance's weak model inside the `with`: the batch rows `rows` (a slice) pass each transformer block in
    `blocks` unchanged, its output = its input (diffusers' layer skip at dropout 1); the other rows run it."""
    for block in blocks:
        block.skip_rows = rows
    try:
        yield
    finally:
        for block in blocks:
            block.skip_rows = None


@dataclass
class Guider:
    """A guidance method beside plain CFG (npo.py's --guidance-method), its "bad" prediction from the same UNet:
    "seg": Smoothed Energy Guidance, the self-attention queries of `layers` blurred by `seg_sigma` on a third,
    conditional branch weighted `seg_scale` (`sampler.seg_combine`); "autoguidance": the unconditional branch runs
    a weak model, the transformer blocks `layers` skipped (diffusers' AutoGuidance). `layers` are names
    (`named_blocks`). The paper's own autoguidance rows, the base θ as the weak model, are plain CFG at α = β = 0.
    `guided.generate(..., guider=)` samples with it."""
    method: str
    layers: tuple = ("mid",)
    seg_scale: float = 3.0
    seg_sigma: float = float("inf")

    def denoiser(self, pipe, neg, pos, guidance, alpha, beta):
        """ε(x_t, t) for `pipe` and the branches' conditionings (c', c). The perturbations act on rows of the one
        batched forward of θ with LoRA offsets, which a fully fine-tuned η (two weight sets) does not run."""
        if pipe.eta_unet is not None:
            raise UserError(f"--guidance-method {self.method} perturbs rows of one batched forward, and --eta-model "
                            "runs two weight sets; give η as a --lora, or use --guidance-method cfg.")
        build = {"seg": seg_denoiser, "autoguidance": autoguidance_denoiser}[self.method]
        return build(pipe.unet, neg, pos, guidance, self, alpha, beta)


def named_blocks(model, names, flag="layers"):
    """The transformer blocks named in `names`: a part, "down", "mid" or "up" (all its blocks), or one block,
    "d<i>", "m<i>", "u<i>", counted in module order within the part (the SEG authors' `seg_applied_layers_index`)."""
    parts = transformer_blocks(model)
    chosen = []
    for name in names:
        part = {"d": "down", "m": "mid", "u": "up"}.get(name[:1])
        if name in parts:
            chosen += parts[name]
        elif part and name[1:].isdigit() and int(name[1:]) < len(parts[part]):
            chosen.append(parts[part][int(name[1:])])
        else:
            ranges = ", ".join(f"{p[0]}0-{p[0]}{len(b) - 1}" for p, b in parts.items() if b)
            raise UserError(f"{flag} {name} names no transformer block of this UNet; use down, mid, up, or one "
                            f"block of {ranges}.")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# The denoisers: eq. 10's branches in one batched forward, with the perturbed rows.

def seg_denoiser(model, neg_embeds, pos_embeds, guidance, guider, alpha=1.0, beta=1.0):
    """ε(x_t, t) of SEG beside NPO, one batched forward of [x_t; x_t; x_t]: the unconditional rows (c', θ + α·η + β·δ),
    the conditional rows (c, θ + η), and SEG's rows, the conditional branch again with its queries blurred in the
    chosen blocks (eq. 10's weights per branch, `sampler.npo_weights`). With g ≤ 1 the unconditional rows are left
    out: ε = ε_pos + s·(ε_pos − ε_seg), as the SEG authors' code without CFG."""
    b = len(guided.as_kwargs(pos_embeds)["encoder_hidden_states"])
    device = guided.as_kwargs(pos_embeds)["encoder_hidden_states"].device
    conditional = sampler.npo_branch(sampler.npo_weights(alpha, beta), 1)  # SEG perturbs the conditional model θ + η
    seg_rows = {k: torch.full((b,), float(v), device=device) for k, v in conditional.items()}
    if guidance > 1:
        cfg_rows = guided.npo_multipliers(b, alpha, beta, device)
        weights = {k: torch.cat([cfg_rows[k], seg_rows[k]]) for k in seg_rows}
        branches = (neg_embeds, pos_embeds, pos_embeds)
    else:
        weights = {k: torch.cat([v, v]) for k, v in seg_rows.items()}
        branches = (pos_embeds, pos_embeds)
    weights = {k: v for k, v in weights.items() if k in set(lora.offset_names(model))}
    context, n = guided.cat_conditioning(*branches), len(branches)
    blocks = named_blocks(model, guider.layers, "--seg-layers")

    seg_slice = slice((n - 1) * b, None)  # the last b rows

    def denoise(x, t):
        with lora.multipliers(model, **weights), smoothed_queries(blocks, guider.seg_sigma, seg_slice):
            eps = guided.run_unet(model, torch.cat([x] * n), t, context).chunk(n)
        eps_neg, eps_pos, eps_seg = eps if n == 3 else (eps[0], *eps)  # without CFG ε_neg = ε_pos, and g drops out
        return sampler.seg_combine(eps_neg, eps_pos, eps_seg, guidance, guider.seg_scale)
    return denoise


def autoguidance_denoiser(model, neg_embeds, pos_embeds, guidance, guider, alpha=1.0, beta=1.0):
    """ε(x_t, t) of autoguidance as diffusers' guider runs it: CFG whose unconditional branch is a weak model, the
    same weights (eq. 10's θ + α·η + β·δ) with the transformer blocks `guider.layers` skipped on its rows."""
    cfg = guided.npo_denoiser(model, neg_embeds, pos_embeds, guidance, alpha, beta)
    blocks = named_blocks(model, guider.layers, "--auto-layers")
    b = len(guided.as_kwargs(pos_embeds)["encoder_hidden_states"])

    def denoise(x, t):
        with skipped_blocks(blocks, slice(0, b)):  # the first b rows of [x_t; x_t] are the unconditional ones
            return cfg(x, t)
    return denoise


# ----------------------------------------------------------------------------------------------------------
# npo.py sample's flags.

def parse_layers(text, flag):
    """--seg-layers / --auto-layers: a comma list of transformer-block names (`named_blocks` checks them
    against the model once it is loaded)."""
    names = tuple(n.strip() for n in text.split(","))
    for name in names:
        if not re.fullmatch(r"down|mid|up|[dmu]\d+", name):
            raise UserError(f"{flag} {text}: {name!r} is not a layer name; use down, mid, up, or one block such as "
                            "d0, m0, u3, comma-separated.")
    return names


def from_arguments(args):
    """npo.py sample's --guidance-method and its flags, checked before the model loads: a `Guider`, or None for plain
    CFG and for the paper's autoguidance, which is plain CFG with the base θ on the unconditional branch (eq. 10 at
    α = β = 0: npo.py sets them)."""
    method = args.guidance_method
    owners = {"--seg-scale": "seg", "--seg-sigma": "seg", "--seg-layers": "seg", "--auto-layers": "autoguidance"}
    for flag, owner in owners.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and method != owner:
            raise UserError(f"{flag} is a setting of --guidance-method {owner}; drop it or pass that method.")
    if method == "cfg":
        return None
    if args.guidance is not None and args.guidance <= 1 and method == "autoguidance":
        raise UserError("autoguidance pushes away from the weak model through the CFG scale; pass --guidance above 1.")
    if (method == "seg" or args.auto_layers) and (args.mode == "merged" or args.eta_model):
        raise UserError(f"--guidance-method {method} perturbs rows of the one batched forward of θ with LoRA offsets; "
                        f"drop {'--mode merged' if args.mode == 'merged' else '--eta-model (give η as a --lora)'}.")
    if method == "seg":
        sigma = math.inf if args.seg_sigma is None else args.seg_sigma
        scale = 3.0 if args.seg_scale is None else args.seg_scale
        if not sigma > 0:
            raise UserError(f"--seg-sigma {sigma:g} is not a blur; pass a positive σ (e.g. 3), or inf for the mean "
                            "query.")
        if not 0 <= scale < math.inf:
            raise UserError(f"--seg-scale {scale:g} must be a number ≥ 0 (the SEG authors use 3).")
        return Guider("seg", parse_layers(args.seg_layers or "mid", "--seg-layers"), scale, sigma)
    if args.auto_layers is not None:
        return Guider("autoguidance", parse_layers(args.auto_layers, "--auto-layers"))
    given = [f for f, v in (("--alpha", args.alpha), ("--beta", args.beta), ("--npo", args.npo),
                            ("--sweep-alpha", args.sweep_alpha), ("--sweep-beta", args.sweep_beta),
                            ("--compare", args.compare or None)) if v is not None]
    if given:
        raise UserError(f"the paper's autoguidance fixes the unconditional branch to the base model (α = β = 0), "
                        f"so {given[0]} has no place; drop it, or pass --auto-layers for a layer-skipped weak model.")
    if not (args.lora or args.eta_model):
        raise UserError("the paper's autoguidance guides η's model away from the base model; pass η with --lora "
                        "or --eta-model, or --auto-layers for a layer-skipped weak model.")
    return None


def png_settings(args):
    """The guidance method's PNG parameters (none for plain CFG, whose parameters stay A1111's)."""
    method = getattr(args, "guidance_method", "cfg")
    g = getattr(args, "guider", None)
    if method == "seg":
        return {"Guidance method": "SEG", "SEG scale": g.seg_scale, "SEG sigma": g.seg_sigma,
                "SEG layers": ",".join(g.layers)}
    if method == "autoguidance":
        return {"Guidance method": "autoguidance", **({"Autoguidance layers": ",".join(g.layers)} if g else
                                                      {"Autoguidance weak model": "base"})}
    return {}


def add_arguments(p):
    """--guidance-method and its settings: the appendix's training-free baselines beside NPO (tables 5-6)."""
    p.add_argument("--guidance-method", choices=["cfg", "seg", "autoguidance"], default="cfg",
                   help="cfg: classifier-free guidance with NPO's eq. 10 (default). seg: Smoothed Energy Guidance "
                        "(Hong 2024), ε = ε_neg + g·(ε_pos − ε_neg) + s·(ε_pos − ε_seg), ε_seg the conditional "
                        "branch with its self-attention queries blurred (the paper's table 5). autoguidance: the "
                        "unconditional branch runs a weak model: the base θ, with η given (the paper's tables 5-6; "
                        "eq. 10 at α = β = 0), or with --auto-layers the model with those blocks skipped (diffusers')")
    p.add_argument("--seg-scale", type=finite_float, help="SEG's scale s ≥ 0 (default 3, the SEG authors')")
    p.add_argument("--seg-sigma", type=float, help="SEG's Gaussian blur σ of the queries over the token grid, > 0; "
                                                   "above 9999, or inf, the mean query (default inf, the authors')")
    p.add_argument("--seg-layers", help="SEG's blurred layers, comma-separated: down, mid, up (all blocks of the "
                                        "part) or one transformer block, d<i>, m<i>, u<i> (default mid, the authors')")
    p.add_argument("--auto-layers", help="autoguidance's weak model: the transformer blocks to skip on the "
                                         "unconditional branch, named as --seg-layers (diffusers' AutoGuidance at "
                                         "dropout 1); without it the weak model is the base θ (the paper's)")
