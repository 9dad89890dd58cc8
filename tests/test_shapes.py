"""The shapes world: its pictures, and its reward ranking right over wrong, clean over dirty."""
import numpy as np
import pytest
import torch

from npo import rewards
from npo import shapes


def pictures(n, seed):
    rng = np.random.default_rng(seed)
    images, captions = zip(*(shapes.draw_example(rng) for _ in range(n)))
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images]), list(captions)


def other(caption, k):
    _, color, shape = caption.split()
    if k == 0:  # another color
        return f"a {[c for c in shapes.COLORS if c != color][0]} {shape}"
    return f"a {color} {[s for s in shapes.SHAPES if s != shape][0]}"


def test_prompts_and_parse():
    assert len(shapes.prompts()) == 12 and "a red circle" in shapes.prompts()
    assert shapes.parse("A Yellow Triangle") == ("yellow", "triangle") and shapes.parse("a cat") is None


def test_reward_prefers_the_prompted_picture():
    x, captions = pictures(24, 3)
    right = shapes.reward(x, captions)
    assert ((0 <= right) & (right <= 1)).all() and right.mean() > 0.85
    for k in (0, 1):  # the same pictures, judged against a wrong color / a wrong shape
        wrong = shapes.reward(x, [other(c, k) for c in captions])
        assert (right > wrong).float().mean() >= 0.95 and right.mean() - wrong.mean() > 0.3


def test_reward_prefers_clean_and_sharp_pictures():
    x, captions = pictures(12, 4)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    clean = shapes.reward(x, captions)
    assert (clean > shapes.reward(noisy, captions)).all() and (clean > shapes.reward(blurred, captions)).all()


def test_reward_is_differentiable_and_bounded_for_npo():
    x, captions = pictures(4, 5)
    x.requires_grad_(True)
    shapes.reward(x, captions).sum().backward()
    assert x.grad.abs().sum() > 0
    assert rewards.is_differentiable(shapes.reward) and rewards.is_bounded(shapes.reward)
    assert rewards.load("shapes:reward") is shapes.reward
    with pytest.raises(ValueError, match="color"):
        shapes.reward(x[:1], ["a photo of a cat"])
