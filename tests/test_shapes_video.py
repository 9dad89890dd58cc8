"""The video shapes world: its clips move as captioned, the pixel checker reads them (and rejects wrong direction,
color, or no motion), and the video reward ranks right over wrong and is a usable reward."""
import numpy as np
import pytest
import torch

from npo import rewards
from npo import shapes
from npo.checkpoint import UserError

OTHER_COLOR = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def clips(n, seed):
    """n drawn clips as (n, F, 3, 64, 64) in [0, 1], and their captions."""
    rng = np.random.default_rng(seed)
    drawn, captions = zip(*(shapes.draw_video_example(rng) for _ in range(n)))
    pixels = np.stack([np.stack([np.asarray(frame) for frame in clip]) for clip in drawn])
    return torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).float() / 255, list(captions)


def recaption(caption, color=None, direction=None):
    _, c, shape, moving, d = caption.split()
    return f"a {color or c} {shape} {moving} {direction or d}"


def test_prompts_and_parse():
    prompts = shapes.video_prompts()
    assert len(prompts) == 48 == len(set(prompts)) and "a red circle moving right" in prompts
    assert shapes.parse_video("A Blue Square moving Up") == ("blue", "square", "up")
    assert shapes.parse_video("a blue square") is None and shapes.parse_video("a cat moving left") is None


def test_drawn_clips_move_as_captioned():
    """Ground truth from the drawing itself: a shape alone on its flat background, never touching the border, whose
    mass (each pixel's distance from the background: coverage × ‖color − background‖, anti-aliased edges included)
    has a centroid that moves by the same step every frame, along the captioned axis."""
    x, captions = clips(24, 0)
    assert sorted({c.split()[-1] for c in captions}) == sorted(shapes.DIRECTIONS)
    for clip, caption in zip(x, captions):
        background = clip[0, :, 0, 0]
        mass = (clip - background[None, :, None, None]).norm(dim=1)  # (F, H, W)
        border = torch.cat([mass[:, 0], mass[:, -1], mass[:, :, 0], mass[:, :, -1]])
        assert border.max() < 0.05  # the shape is ~0.8 off; only the Lanczos filter's faint ringing reaches 2 px out
        track = shapes.centroid_track(mass)
        steps = track[1:] - track[:-1]
        dx, dy = shapes.DIRECTIONS[caption.split()[-1]]
        along = steps @ torch.tensor([dx, dy], dtype=torch.float32)
        assert along.min() > 1.5 and along.max() - along.min() < 0.5  # constant speed, the captioned way
        assert (steps @ torch.tensor([dy, dx], dtype=torch.float32)).abs().max() < 0.3  # a straight line


def test_travel_of_a_translated_block():
    """`travel` of a block shifted by (2, −1) pixels per frame over 6 frames is exactly (10, −5)."""
    masses = torch.zeros(6, 32, 32)
    for f in range(6):
        masses[f, 12 - f:18 - f, 4 + 2 * f:9 + 2 * f] = 1
    assert torch.allclose(shapes.travel(shapes.centroid_track(masses)), torch.tensor([10.0, -5.0]), atol=1e-5)


def test_checker_passes_drawn_clips():
    x, captions = clips(48, 1)
    assert shapes.video_correct(x, captions).tolist() == [1.0] * 48
    assert shapes.video_direction_correct(x, captions).tolist() == [1.0] * 48


def test_checker_fails_wrong_direction_color_and_still_clips():
    x, captions = clips(24, 2)
    reversed_ = x.flip(1)  # the same frames played backwards: the opposite direction
    assert shapes.video_correct(reversed_, captions).sum() == 0
    assert shapes.video_direction_correct(reversed_, captions).sum() == 0
    assert shapes.video_correct(reversed_, [recaption(c, direction=OPPOSITE[c.split()[-1]]) for c in captions]).sum() == 24
    wrong_color = [recaption(c, color=OTHER_COLOR[c.split()[1]]) for c in captions]
    assert shapes.video_correct(x, wrong_color).sum() == 0
    still = x[:, :1].expand_as(x)  # the first frame held: nothing moves
    assert shapes.video_correct(still, captions).sum() == 0
    assert all(shapes.judge_video(p)[2] is None for p in shapes.video_pixels(still))


def test_video_reward_prefers_the_prompted_clip():
    x, captions = clips(24, 3)
    right = shapes.video_reward(x, captions)
    assert right.min() > 0.7
    backwards = shapes.video_reward(x.flip(1), captions)
    still = shapes.video_reward(x[:, :1].expand_as(x).contiguous(), captions)
    wrong_color = shapes.video_reward(x, [recaption(c, color=OTHER_COLOR[c.split()[1]]) for c in captions])
    for worse in (backwards, still, wrong_color):
        assert (worse < right - 0.3).all()
    assert (backwards <= still + 1e-6).all()  # going the wrong way is worse than not moving


def test_video_reward_is_differentiable_and_bounded():
    x, captions = clips(4, 4)
    x = x[:, :1].expand_as(x).clone().requires_grad_(True)  # still clips: the reward wants motion
    r = shapes.video_reward(x, captions)
    assert ((r >= 0) & (r <= 1)).all()
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a small step up the gradient raises every clip's reward (first order: ΔR ≈ lr · ‖∇R‖² > 0)
    with torch.no_grad():
        stepped = shapes.video_reward((x + 0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)), captions)
    assert (stepped > r.detach()).all()


def test_video_reward_through_rewards_load():
    r = rewards.load("shapes:video_reward")
    assert rewards.is_differentiable(r) and rewards.is_bounded(r) and r.video
    with pytest.raises(UserError, match="moving"):
        rewards.check_prompts(r, ["a red circle"])
    rewards.check_prompts(r, shapes.video_prompts())
    with pytest.raises(ValueError, match="at least 2"):
        shapes.video_reward(torch.rand(1, 1, 3, 64, 64), ["a red circle moving up"])


def test_checker_reads_a_shape_the_frames_split_on_as_unclear():
    """A red clip moving right whose frames show a circle in k of 8 and a square in the rest: the shape is the
    frames' majority, and a 4-4 split is unclear (None), the same in every process (not a tie broken by the order in
    which a set of strings iterates, which Python's per-process string hashing changes)."""
    def spliced(k):
        circle, square = (shapes.draw_clip("red", s, 12, (16, 32), (4, 0), (235, 235, 235)) for s in ("circle", "square"))
        return np.stack([np.asarray(frame) for frame in circle[:k] + square[k:]])
    assert shapes.judge_video(spliced(8)) == ("red", "circle", "right")
    assert shapes.judge_video(spliced(5)) == ("red", "circle", "right")
    assert shapes.judge_video(spliced(3)) == ("red", "square", "right")
    assert shapes.judge_video(spliced(4)) is None
