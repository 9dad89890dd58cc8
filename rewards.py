"""Rewards R(x, c) for reward-based training, and NPO's reversal of them: R_NPO = 1 − R (paper eq. 7).

A reward is any callable `reward(images, prompts) -> Tensor[B]`, images float (B, 3, H, W) in [0, 1]. What it is
is read from what it does: `probe` calls it once on random images that require grad, and it is differentiable if
its scores depend on them through autograd. Training checks every call's scores (`checked`): one finite score per
image, and, where 1 − R is trained, each in [0, 1]. A reward may also state its properties, and offer a hook:

    reward.differentiable   True / False: skips the probe's verdict (e.g. False for a JPEG size)
    reward.bounded          True: scores lie in [0, 1]; False: they do not (1 − R then needs a range or a sigmoid)
    reward.check_prompts    a function(prompts) that raises ValueError for prompts the reward cannot score, called
                            on every training prompt before any model loads
    reward.timestep_aware   True: the reward also reads the diffusion timestep of each image (SPO's step-aware
                            preference model, `spm:PATH`). A sampler that scores x̂_0, the prediction at timestep t,
                            calls it `reward(images, prompts, timesteps=t)`, t the training timesteps (B,) in
                            0 … 999 (0 for a finished image); `rewards.score(r, images, prompts, t)` does that, and
                            calls a reward without the keyword as `r(images, prompts)` (it is blind to t). Called
                            without timesteps, a timestep-aware reward scores at t = 0. The wrappers below (checked,
                            negate, affine, sigmoid) pass the timesteps through and keep the property.

    r = rewards.load("rewards:brightness")             # a built-in, or "my_module:my_reward" of your own
    r = rewards.load("path/to/my_module.py:my_reward")  # a file of yours, loaded from its path
    r = rewards.load("pickscore:/models/PickScore_v1")  # a learned scorer on weights you give (scorers.py)
    r_npo = rewards.negate(r)                           # 1 − R: what the NPO offset δ is trained on
    r = rewards.affine(rewards.load("rewards:jpeg_incompressibility"), low=0, high=40)   # kB, mapped to [0, 1]

Built-ins that need no downloaded weights: `brightness` and `saturation` (differentiable, bounded, for
demonstrations and tests), `jpeg_compressibility` / `jpeg_incompressibility` (DDPO's: ∓ kB of the JPEG at quality
95; not differentiable, unbounded until mapped). The paper's learned scorers (PickScore, HPSv2, LAION-aesthetic,
CLIP score) and SPO's step-aware preference model load from weights you give, as `pickscore:PATH`, `spm:PATH` and the
like (scorers.py).
"""
import difflib
import importlib
import importlib.util
import io
import math
import os
import sys

import torch
from PIL import Image

from . import scorers
from .checkpoint import UserError

RANGE_HINT = "give it a range (--reward-range LOW,HIGH) or a sigmoid scale (--reward-sigmoid SCALE)"


def reward(differentiable, bounded, timestep_aware=False):
    """Decorator that states a reward function's properties; `timestep_aware=True` for one that takes `timesteps=`."""
    def mark(fn):
        fn.differentiable, fn.bounded, fn.timestep_aware = differentiable, bounded, timestep_aware
        return fn
    return mark


def takes_timesteps(r):
    """Whether the reward reads the timestep of each image (it then takes the keyword `timesteps`)."""
    return bool(getattr(r, "timestep_aware", False))


def score(r, images, prompts, timesteps=None):
    """R(x, c, t) for a timestep-aware reward given timesteps; R(x, c) otherwise (t is then not passed)."""
    if timesteps is not None and takes_timesteps(r):
        return r(images, prompts, timesteps=timesteps)
    return r(images, prompts)


def is_differentiable(r):
    """What the reward states: True, False, or None when it states nothing (then `probe` decides)."""
    return getattr(r, "differentiable", None)


def is_bounded(r):
    """What the reward states about [0, 1]: True, False, or None (then its scores are checked as they come)."""
    return getattr(r, "bounded", None)


def scores_videos(r):
    """Whether the reward scores whole clips (B, F, 3, H, W) rather than images (B, 3, H, W): it says so with
    `r.video = True` (e.g. shapes.video_reward, which follows the shape across the frames)."""
    return bool(getattr(r, "video", False))


def name_of(r):
    return getattr(r, "__name__", type(r).__name__)


def _wrapped(r, fn, name, bounded):
    """`fn` as a reward derived from `r`: r's differentiability, timestep awareness and prompt check, the given
    bounds and name."""
    fn.differentiable, fn.bounded, fn.__name__ = is_differentiable(r), bounded, name
    fn.timestep_aware, fn.video = takes_timesteps(r), scores_videos(r)
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
    def checked_reward(images, prompts, timesteps=None):
        scores = score(r, images, prompts, timesteps)
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
    """Call the reward once on 2 random images (a reward of clips: 2 random clips of 4 frames) that require grad.
    Returns whether it is differentiable: what it states, else whether its scores depend on the pixels through
    autograd. Raises a UserError if it fails or its scores are malformed."""
    prompts = (list(prompts) * 2)[:2]
    shape = (2, 4, 3, size, size) if scores_videos(r) else (2, 3, size, size)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
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

    def npo_reward(images, prompts, timesteps=None):
        scores = score(r, images, prompts, timesteps)
        check_scores(scores, len(images), name_of(r), unit_range=True)
        return 1 - scores
    return _wrapped(r, npo_reward, f"1 - {name_of(r)}", True)


def affine(r, low, high):
    """(R − low) / (high − low), clamped to [0, 1]: for a reward whose useful range is known, e.g. kB of a JPEG."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise UserError(f"a reward range needs LOW < HIGH, got {low}, {high}; pass e.g. --reward-range 0,40.")

    def mapped(images, prompts, timesteps=None):
        return ((score(r, images, prompts, timesteps) - low) / (high - low)).clamp(0, 1)
    return _wrapped(r, mapped, f"{name_of(r)} in [{low:g}, {high:g}]", True)


def sigmoid(r, scale, center=0.0):
    """σ((R − center) / scale): for a reward with no natural range; differentiable everywhere, unlike a clamp."""
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"a reward sigmoid scale must be a positive number, got {scale}.")

    def squashed(images, prompts, timesteps=None):
        return torch.sigmoid((score(r, images, prompts, timesteps) - center) / scale)
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

def close_scorer(name):
    """The scorer name `name` most likely misspells (hps -> hpsv2, PickScore -> pickscore), or None."""
    close = difflib.get_close_matches(name.lower(), scorers.SCORERS, n=1, cutoff=0.6)
    return close[0] if close else None


def likely_scorer_spec(spec):
    """The SCORER:PATH a user most likely meant by a `spec` that names no scorer: a misspelt scorer name corrected
    (hps:/m -> hpsv2:/m), else the whole spec taken as the path (C:\\m -> pickscore:C:\\m, for a Windows path or a
    path that holds a ':')."""
    name, _, path = spec.partition(":")
    return f"{close_scorer(name)}:{path}" if close_scorer(name) else f"pickscore:{spec}"


def load(spec, flag="--reward"):
    """A reward by name: `module:function`, `path/to/file.py:function`, or `SCORER:PATH`, a learned scorer on weights
    you give (scorers.py).

    The text before the first ':' decides. One of scorers.SCORERS (pickscore, hpsv2, aesthetic, clipscore, ...) makes
    all after it the PATH, so a path may hold ':' itself (`pickscore:C:\\models\\PickScore_v1`); those names are
    taken, not Python modules, here. A spec whose text before its last ':' ends in `.py` is a file, loaded from that
    path. `rewards:NAME` and `shapes:reward` are npo's own. Anything else is `module:function`: a module Python can
    import by name (an installed package), else NAME.py in the current folder, loaded from its file. sys.path is never
    touched, and the only code run is code the user names. `flag` is the option the messages name (--reward, or
    evaluate's --scorer)."""
    module_name, sep, attr = spec.partition(":")
    if module_name in scorers.SCORERS:
        if not attr:
            raise UserError(f"{flag} {spec!r} names no weights; pass {module_name}:PATH.")
        return scorers.load(module_name, attr)
    path, _, file_attr = spec.rpartition(":")
    if path.endswith(".py"):  # rpartition: a Windows path holds a ':' of its own
        return _function(spec, _module_from_file(spec, path, flag), file_attr, flag)
    if not sep or not module_name or not attr:
        raise UserError(f"{flag} {spec!r} is not module:function; pass e.g. rewards:brightness or my_rewards:score, "
                        f"or SCORER:PATH with SCORER one of {', '.join(scorers.SCORERS)}.")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise UserError(f"{flag} {spec!r} is neither module:function nor SCORER:PATH with SCORER one of "
                        f"{', '.join(scorers.SCORERS)}; pass e.g. {likely_scorer_spec(spec)}.")
    return _function(spec, _import(spec, module_name, attr, flag), attr, flag)


OWN = ("rewards", "shapes")  # npo's own modules of rewards, named as in `rewards:brightness`, `shapes:reward`


def _import(spec, module_name, attr, flag):
    """The module of `module_name:attr`: npo's own, an importable one, or NAME.py in the current folder."""
    if module_name in OWN:  # from npo itself, whatever the current folder holds
        return importlib.import_module(f".{module_name}", __package__)
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        # `python npo.py` imports from the script's folder, not the current one: read NAME.py there from its file
        local = os.path.join(*module_name.split(".")) + ".py"
        if not os.path.isfile(local):
            scorer = close_scorer(module_name)  # hps:model is more likely hpsv2:model than a module of your own
            raise UserError(f"{flag} {spec}: cannot import {module_name}: no installed module of that name and no "
                            f"{local} in the current folder ({os.getcwd()}); run from the folder that holds it or "
                            f"pass its path, e.g. path/to/{local}:{attr}" + (
                                f", or pass the scorer {scorer}:{attr} (the scorers are {', '.join(scorers.SCORERS)})"
                                if scorer else "") + ".")
        return _module_from_file(spec, local, flag)
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{flag} {spec}: cannot import {module_name} ({e}); install it or pass its file, "
                        f"e.g. path/to/{module_name.split('.')[-1]}.py:{attr}.")


def _module_from_file(spec, path, flag="--reward"):
    """The Python file at `path` run as a module of its own (under a private name, so that it shadows nothing)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {spec}: there is no file {path}; give the path of a .py file that defines it.")
    name = "npo_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as importlib's recipe does: dataclasses and pickling look their module up there
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[name]
        raise UserError(f"{flag} {spec}: {path} failed to import ({e}); install what it needs.")
    return module


def _function(spec, module, attr, flag="--reward"):
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {module.__name__} has no function {attr}.")
    return fn
