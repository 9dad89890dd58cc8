"""η from a full fine-tune (the paper's DiffDPO and DreamShaper rows): η = θ_ft − θ, layer by layer, cut to its best
low-rank approximation, so a fully fine-tuned model serves as a LoRA offset (`npo.py extract-lora`)."""
import itertools

import torch
import torch.nn as nn

from . import lora
from .checkpoint import UserError


def truncated_svd(delta, rank):
    """(up, down) whose product is the best rank-`rank` approximation of the matrix `delta` in the Frobenius norm
    (Eckart–Young): the SVD delta = U S Vᵀ cut to its `rank` largest singular values, up = U_r S_r, down = V_rᵀ.
    Its error is ‖delta − up·down‖²_F = Σ_{i>r} s_i², the smallest any rank-r matrix can reach."""
    on = delta.device
    if on.type == "mps":  # torch has no MPS kernel for linalg.svd: that one step runs on the CPU
        delta = delta.cpu()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * S[:rank]).to(on), Vh[:rank].to(on)


@torch.no_grad()
def extract_offset(model, tuned, name, rank, conv_rank=None, targets=lora.DEFAULT_TARGETS, device="cpu", progress=None):
    """η = θ_ft − θ on the `targets` layers as the offset `name` on `model` (θ), each layer's ΔW cut to its best
    rank-r approximation (`truncated_svd`), as kohya's extract_lora_from_models does, without its clamping of
    outlying entries (which gives up the optimum). A conv weight (out, in, k, k) is the matrix (out, in·k·k); 3x3
    convs get `conv_rank` (default `rank`); no layer gets more than min(out, in·k·k).

    Each layer's two weights go to `device` for the subtraction and the SVD, in float32; the models stay where they
    are. `progress(i, n, layer, share)` is called after layer i of n, `share` the part of the work done (an SVD of an
    m × n matrix costs ∝ m·n·min(m, n)).

    Every layer stores alpha = `rank`, one alpha for the whole file (what diffusers reads correctly); a layer of
    lower rank r' carries r'/rank in its up factor, since ΔW = (alpha / r')·up·down. Layers with θ_ft = θ get no
    offset. Returns {layer: (‖ΔW − ΔW_r‖²_F, ‖ΔW‖²_F)}, measured on the stored factors (`relative_errors`)."""
    lora.check_new_name(model, name)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError(f"LoRA ranks must be at least 1 (got --rank {rank}, --conv-rank {conv_rank}).")
    tuned_layers, stats = lora.targetable(tuned), {}
    names = lora.select_layers(model, targets)
    shapes = [model.get_submodule(n).weight.flatten(1).shape for n in names]
    if all(torch.equal(tuned_layers[n].weight.float(), model.get_submodule(n).weight.float()) for n in names):
        raise UserError(f"the two models are identical on the target layers ({', '.join(lora.target_list(targets))}); "
                        "there is no offset to extract: check --tuned, or --targets.")
    costs = [m * k * min(m, k) for m, k in shapes]
    cumulative = [c / sum(costs) for c in itertools.accumulate(costs)]
    for i, layer_name in enumerate(names):
        layer = model.get_submodule(layer_name)
        delta = (tuned_layers[layer_name].weight.to(device, torch.float32)
                 - layer.weight.to(device, torch.float32)).flatten(1)
        if delta.any():
            wide = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            r = min((conv_rank or rank) if wide else rank, *delta.shape)
            up, down = truncated_svd(delta, r)
            offset = lora.attach(model, layer_name, name, r, rank, torch.float32)
            offset.lora_up.weight.copy_((up * (r / rank)).view(offset.lora_up.weight.shape))
            offset.lora_down.weight.copy_(down.view(offset.lora_down.weight.shape))
            offset.requires_grad_(False)
            residual = delta - offset.delta_weight().to(device).flatten(1)
            stats[layer_name] = (residual.square().sum().item(), delta.square().sum().item())
        if progress is not None:
            progress(i + 1, len(names), layer_name, cumulative[i])
    return stats


def relative_errors(stats):
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of `extract_offset`'s layers, per block (down_blocks.0, mid_block, up_blocks.2, ...)
    and "overall": over all the entries of a block's layers together, so a large layer weighs more."""
    sums = {}
    for layer_name, (residual, norm) in stats.items():
        parts = layer_name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        r, n = sums.get(block, (0.0, 0.0))
        sums[block] = (r + residual, n + norm)
    sums["overall"] = tuple(sum(v) for v in zip(*stats.values()))
    return {key: (r / n) ** 0.5 for key, (r, n) in sums.items()}
