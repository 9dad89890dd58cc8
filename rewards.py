"""Rewards R(x, c) for reward-based training, and NPO's reversal of them: R_NPO = 1 − R (paper eq. 7).

A reward is a callable `reward(images, prompts) -> Tensor[B]`, images float (B, 3, H, W) in [0, 1]. Two attributes
say how it may be used (plain functions get the defaults):

    reward.differentiable   True if gradients flow from the score to the pixels (needed by --method reward)
    reward.bounded          True if scores lie in [0, 1] (needed by `negate`: 1 − R must stay a reward)

    r = rewards.load("rewards:brightness")             # a built-in, or "my_module:my_reward" of your own
    r_npo = rewards.negate(r)                           # 1 − R: what the NPO offset δ is trained on
    r = rewards.affine(rewards.load("rewards:jpeg_incompressibility"), low=0, high=40)   # kB, mapped to [0, 1]

Built-ins that need no downloaded weights: `brightness` and `saturation` (differentiable, bounded, for
demonstrations and tests), `jpeg_compressibility` / `jpeg_incompressibility` (DDPO's: ∓ kB of the JPEG at quality
95; not differentiable, unbounded until mapped), and `AestheticHead` (LAION-aesthetic style: a CLIP image
embedding into an MLP, from weights you supply).
"""
import importlib
import io
import math
import os
import sys

import torch
import torch.nn as nn
from PIL import Image

import checkpoint
from checkpoint import UserError


def reward(differentiable, bounded):
    """Decorator that states a reward function's two properties."""
    def mark(fn):
        fn.differentiable, fn.bounded = differentiable, bounded
        return fn
    return mark


def is_differentiable(r):
    return getattr(r, "differentiable", False)


def is_bounded(r):
    return getattr(r, "bounded", False)


# ----------------------------------------------------------------------------------------------------------
# NPO's reversal and the maps that make a reward fit for it.

def negate(r):
    """R_NPO(x, c) = 1 − R(x, c) (eq. 7): maximizing it trains the offset toward what R ranks low."""
    if not is_bounded(r):
        raise UserError(f"the reward {name_of(r)} is not bounded to [0, 1], so 1 − R is not a reward; give it a "
                        "range (--reward-range LOW,HIGH) or a sigmoid scale (--reward-sigmoid SCALE).")

    @reward(is_differentiable(r), True)
    def npo_reward(images, prompts):
        return 1 - r(images, prompts)
    npo_reward.__name__ = f"1 - {name_of(r)}"
    return npo_reward


def affine(r, low, high):
    """(R − low) / (high − low), clamped to [0, 1]: for a reward whose useful range is known, e.g. kB of a JPEG."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise UserError(f"a reward range needs LOW < HIGH, got {low}, {high}; pass e.g. --reward-range 0,40.")

    @reward(is_differentiable(r), True)
    def mapped(images, prompts):
        return ((r(images, prompts) - low) / (high - low)).clamp(0, 1)
    mapped.__name__ = f"{name_of(r)} in [{low:g}, {high:g}]"
    return mapped


def sigmoid(r, scale, center=0.0):
    """σ((R − center) / scale): for a reward with no natural range; differentiable everywhere, unlike a clamp."""
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"a reward sigmoid scale must be a positive number, got {scale}.")

    @reward(is_differentiable(r), True)
    def squashed(images, prompts):
        return torch.sigmoid((r(images, prompts) - center) / scale)
    squashed.__name__ = f"sigmoid({name_of(r)})"
    return squashed


def name_of(r):
    return getattr(r, "__name__", type(r).__name__)


# ----------------------------------------------------------------------------------------------------------
# Built-in rewards.

@reward(differentiable=True, bounded=True)
def brightness(images, prompts):
    """Mean pixel value, in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


@reward(differentiable=True, bounded=True)
def saturation(images, prompts):
    """Mean of (max − min) over the RGB channels of each pixel (HSV saturation times value), in [0, 1]."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))


def _jpeg_kilobytes(images):
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for p in pixels:
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@reward(differentiable=False, bounded=False)
def jpeg_compressibility(images, prompts):
    """DDPO's compressibility: −kB of the image as a JPEG at quality 95 (higher = simpler images)."""
    return -_jpeg_kilobytes(images)


@reward(differentiable=False, bounded=False)
def jpeg_incompressibility(images, prompts):
    """DDPO's incompressibility: kB of the image as a JPEG at quality 95 (higher = more detail)."""
    return _jpeg_kilobytes(images)


class AestheticHead(nn.Module):
    """LAION-aesthetic-style predictor: a CLIP image embedding, L2-normalized, through an MLP to a score (~1-10).

    The MLP is the improved-aesthetic-predictor's: Linear(d, 1024) → Linear(1024, 128) → Linear(128, 64) →
    Linear(64, 16) → Linear(16, 1), with dropout between the first three in training (none at inference) and no
    nonlinearity, under the keys `layers.0/2/4/6/7.weight|bias` of that project's files (converted to
    safetensors). `embed(images)` is the CLIP image tower, which you supply: any module that maps (B, 3, 224,
    224) CLIP-normalized pixels to (B, d) embeddings. Unbounded: wrap it in `affine(head, 1, 10)` for `negate`."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalization
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, embed, dim=768):
        super().__init__()
        self.embed = embed
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        self.differentiable, self.bounded = True, False
        self.__name__ = "aesthetic"

    @classmethod
    def from_file(cls, path, embed, dim=768):
        head = cls(embed, dim)
        state = checkpoint.read_safetensors(path)
        missing = {k for k in head.layers.state_dict()} - {k.removeprefix("layers.") for k in state}
        if missing:
            raise UserError(f"{path} is not an aesthetic MLP (missing {sorted(missing)[:3]}); convert the "
                            "improved-aesthetic-predictor weights to safetensors with keys layers.N.weight|bias.")
        head.layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        return head.eval().requires_grad_(False)

    def forward(self, images, prompts=None):
        x = nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=x.device).view(1, 3, 1, 1)
        e = self.embed((x - mean) / std)
        return self.layers(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# Loading a reward by name.

def load(spec):
    """`module:function` → the callable. The module is imported by name (from the current folder or an installed
    package): the only code run is code the user names. `rewards:NAME` gives a built-in."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--reward {spec!r} is not module:function; pass e.g. rewards:brightness or my_rewards:score.")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `python npo.py` puts the script's folder on the path, not the current one
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({e}); run from the folder that holds "
                        f"{module_name}.py or install it.")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {module_name} has no function {attr}.")
    return fn
