"""Rewards R(x, c) for reward-based training, and NPO's reversal of them: R_NPO = 1 − R (paper eq. 7).

A reward is any callable `reward(images, prompts) -> Tensor[B]`, images float (B, 3, H, W) in [0, 1]. What it is
is read from what it does: `probe` calls it once on random images that require grad, and it is differentiable if
its scores depend on them through autograd. Training checks every call's scores (`checked`): one finite score per
image, and, where 1 − R is trained, each in [0, 1]. A reward may also state its properties, and offer a hook:

    reward.differentiable   True / False: skips the probe's verdict (e.g. False for a JPEG size)
    reward.bounded          True: scores lie in [0, 1]; False: they do not (1 − R then needs a range or a sigmoid)
    reward.check_prompts    a function(prompts) that raises ValueError for prompts the reward cannot score, called
                            on every training prompt before any model loads
    reward.step_aware       True: it scores x̂_0 of a noisy latent knowing its timestep, called by SPO as
                            reward(images, prompts, timesteps=t) with t (B,) (0: a finished image) and by everything
                            else without timesteps (then it must score finished images); the built-ins and
                            scorers.py's are blind to the timestep

    r = rewards.load("rewards:brightness")             # a built-in, or "my_module:my_reward" of your own
    r = rewards.load("pickscore:/models/PickScore_v1")  # a learned scorer on weights you give (scorers.py)
    r_npo = rewards.negate(r)                           # 1 − R: what the NPO offset δ is trained on
    r = rewards.affine(rewards.load("rewards:jpeg_incompressibility"), low=0, high=40)   # kB, mapped to [0, 1]

Built-ins that need no downloaded weights: `brightness` and `saturation` (differentiable, bounded, for
demonstrations and tests), `jpeg_compressibility` / `jpeg_incompressibility` (DDPO's: ∓ kB of the JPEG at quality
95; not differentiable, unbounded until mapped). The paper's learned scorers (PickScore, HPSv2, LAION-aesthetic,
CLIP score) load from weights you give, as `pickscore:PATH` and the like (scorers.py).
"""
import importlib
import io
import math
import os
import sys

import torch
from PIL import Image

import scorers
from checkpoint import UserError

RANGE_HINT = "give it a range (--reward-range LOW,HIGH) or a sigmoid scale (--reward-sigmoid SCALE)"


def reward(differentiable, bounded):
    """Decorator that states a reward function's two properties."""
    def mark(fn):
        fn.differentiable, fn.bounded = differentiable, bounded
        return fn
    return mark


def is_differentiable(r):
    """What the reward states: True, False, or None when it states nothing (then `probe` decides)."""
    return getattr(r, "differentiable", None)


def is_bounded(r):
    """What the reward states about [0, 1]: True, False, or None (then its scores are checked as they come)."""
    return getattr(r, "bounded", None)


def is_step_aware(r):
    """Whether the reward takes `timesteps=` (SPO's step-aware preference model); the wrappers below keep it."""
    return bool(getattr(r, "step_aware", False))


def name_of(r):
    return getattr(r, "__name__", type(r).__name__)


def _wrapped(r, fn, name, bounded):
    """`fn` as a reward derived from `r`: r's differentiability and prompt check, the given bounds and name."""
    fn.differentiable, fn.bounded, fn.__name__, fn.step_aware = is_differentiable(r), bounded, name, is_step_aware(r)
    if hasattr(r, "check_prompts"):
        fn.check_prompts = r.check_prompts
    return fn


# ----------------------------------------------------------------------------------------------------------
# What a reward is, read from what it does; its scores checked at every call.

def check_scores(scores, batch, name, unit_range=False):
    """One finite score per image, shape (B,); in [0, 1] where `unit_range` (1 − R is trained). Else a UserError."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise UserError(f"the reward {name} returned {got} for a batch of {batch} images; it must return a tensor "
                        f"of shape ({batch},), one score per image.")
    if not torch.isfinite(scores).all():
        raise UserError(f"the reward {name} returned non-finite scores ({scores.detach().tolist()}); "
                        "make it return finite numbers.")
    if unit_range and ((scores < 0) | (scores > 1)).any():
        bad = scores[(scores < 0) | (scores > 1)][0].item()
        raise UserError(f"the reward {name} returned {bad:g}, outside [0, 1], so 1 − R is not a reward; {RANGE_HINT}.")


def checked(r, unit_range=False):
    """R whose every call's scores pass `check_scores` (in [0, 1] too when `unit_range`)."""
    def checked_reward(images, prompts, **timesteps):
        scores = r(images, prompts, **timesteps)
        check_scores(scores, len(images), name_of(r), unit_range)
        return scores
    return _wrapped(r, checked_reward, name_of(r), is_bounded(r))


def check_prompts(r, prompts):
    """Call the reward's `check_prompts` hook, if it has one, turning its ValueError into a UserError."""
    hook = getattr(r, "check_prompts", None)
    if hook is not None:
        try:
            hook(list(prompts))
        except ValueError as e:
            raise UserError(f"the reward {name_of(r)} cannot score these prompts: {e}; "
                            "train with prompts it knows.")


def probe(r, prompts, size=64):
    """Call the reward once on 2 random images that require grad. Returns whether it is differentiable: what it
    states, else whether its scores depend on the pixels through autograd. Raises a UserError if it fails or its
    scores are malformed."""
    prompts = (list(prompts) * 2)[:2]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_()
    try:
        scores = r(images, prompts)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"the reward {name_of(r)} failed on a test batch ({type(e).__name__}: {e}); "
                        "fix it or pass another --reward.")
    check_scores(scores, 2, name_of(r))
    if is_differentiable(r) is not None:
        return bool(is_differentiable(r))
    if not scores.requires_grad:
        return False
    (grad,) = torch.autograd.grad(scores.sum(), images, allow_unused=True)
    return grad is not None and bool(grad.abs().sum() > 0)


# ----------------------------------------------------------------------------------------------------------
# NPO's reversal and the maps that make a reward fit for it.

def negate(r):
    """R_NPO(x, c) = 1 − R(x, c) (eq. 7): maximizing it trains the offset toward what R ranks low.

    A reward that states it is unbounded is refused; one that states nothing has each call's scores checked to
    lie in [0, 1]."""
    if is_bounded(r) is False:
        raise UserError(f"the reward {name_of(r)} is not bounded to [0, 1], so 1 − R is not a reward; {RANGE_HINT}.")

    def npo_reward(images, prompts, **timesteps):
        scores = r(images, prompts, **timesteps)
        check_scores(scores, len(images), name_of(r), unit_range=True)
        return 1 - scores
    return _wrapped(r, npo_reward, f"1 - {name_of(r)}", True)


def affine(r, low, high):
    """(R − low) / (high − low), clamped to [0, 1]: for a reward whose useful range is known, e.g. kB of a JPEG."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise UserError(f"a reward range needs LOW < HIGH, got {low}, {high}; pass e.g. --reward-range 0,40.")

    def mapped(images, prompts, **timesteps):
        return ((r(images, prompts, **timesteps) - low) / (high - low)).clamp(0, 1)
    return _wrapped(r, mapped, f"{name_of(r)} in [{low:g}, {high:g}]", True)


def sigmoid(r, scale, center=0.0):
    """σ((R − center) / scale): for a reward with no natural range; differentiable everywhere, unlike a clamp."""
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"a reward sigmoid scale must be a positive number, got {scale}.")

    def squashed(images, prompts, **timesteps):
        return torch.sigmoid((r(images, prompts, **timesteps) - center) / scale)
    return _wrapped(r, squashed, f"sigmoid({name_of(r)})", True)


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


# ----------------------------------------------------------------------------------------------------------
# Loading a reward by name.

def load(spec):
    """A reward by name: `module:function`, or `SCORER:PATH`, a learned scorer on weights you give (scorers.py).

    The text before the first ':' decides. One of scorers.SCORERS (pickscore, hpsv2, aesthetic, clipscore) makes all
    after it the PATH, so a path may hold ':' itself (`pickscore:C:\\models\\PickScore_v1`); those four names are
    taken, not Python modules, here. Anything else is `module:function`: the module is imported by name (from the
    current folder or an installed package), so the only code run is code the user names; `rewards:NAME` gives a
    built-in."""
    module_name, sep, attr = spec.partition(":")
    if module_name in scorers.SCORERS:
        if not attr:
            raise UserError(f"--reward {spec!r} names no weights; pass {module_name}:PATH.")
        return scorers.load(module_name, attr)
    if not sep or not module_name or not attr:
        raise UserError(f"--reward {spec!r} is not module:function; pass e.g. rewards:brightness or my_rewards:score, "
                        f"or SCORER:PATH with SCORER one of {', '.join(scorers.SCORERS)}.")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise UserError(f"--reward {spec!r} is neither module:function ({module_name!r}, {attr!r} are not Python "
                        f"names) nor SCORER:PATH; a path goes after a scorer name, e.g. pickscore:{spec}.")
    # `python npo.py` puts the script's folder on the path, not the current one: look there too, for this import only
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({e}); run from the folder that holds "
                        f"{module_name}.py or install it.")
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {module_name} has no function {attr}.")
    return fn
