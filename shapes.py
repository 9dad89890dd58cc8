"""The embedded model's world: colored shapes on a plain background, drawn procedurally, with their captions.

    image, caption = shapes.draw_example(np.random.default_rng(0))     # a PIL image and "a red circle"

Every picture is one shape (circle, square or triangle) of one of four colors, at a random size and position on a
light, slightly tinted background; its caption is `a {color} {shape}`. The shapes are drawn at 4x and downsampled,
so their edges are anti-aliased as in a photograph rather than stair-stepped. `weights/make_model.py` trains the
embedded Stable-Diffusion-shaped model on these pictures; the tests judge its samples with a pixel checker.
`reward(images, prompts)` scores a picture for its prompt (R in [0, 1], differentiable): the AI feedback of the
NPO experiment and a reward for `npo.py train --method reward --reward shapes:reward`.

The video world moves the same shapes: `a {color} {shape} moving {direction}` clips of FRAMES frames
(`draw_video_example`), their reward `video_reward` (`--reward shapes:video_reward`) and a pixel checker of clips,
`video_correct` (color, shape and direction by color thresholding), for `weights/make_video_model.py` and its tests.
"""
import math
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE = 64  # pixels; the VAE makes 8x8 latents of it


def prompts():
    """Every caption of the world: the 12 `a {color} {shape}` prompts."""
    return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


def draw(color, shape, radius, center, background, size=SIZE, supersample=4):
    """One picture: a `shape` of `color` with circumradius `radius` (pixels) at `center` on `background`."""
    s = supersample
    image = Image.new("RGB", (size * s, size * s), tuple(background))
    pen = ImageDraw.Draw(image)
    cx, cy, r = center[0] * s, center[1] * s, radius * s
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r / np.sqrt(2)  # the square inscribed in the circle of radius r
        pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":  # equilateral, pointing up
        pen.polygon([(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return image.resize((size, size), Image.LANCZOS)


def draw_example(rng, size=SIZE):
    """A random picture and its caption, drawn from `rng` (a numpy Generator)."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.2, 0.34) * size
    margin = radius + 2
    center = rng.uniform(margin, size - margin, 2)
    background = 235 + rng.integers(-12, 13, 3)  # near white, slightly tinted
    return draw(color, shape, radius, center, background, size), f"a {color} {shape}"


# ----------------------------------------------------------------------------------------------------------
# The reward of this world: is the picture what the prompt asks for, and is it clean? R in [0, 1], differentiable.

def parse(prompt):
    """'a red circle' -> ('red', 'circle'); None for prompts outside the world."""
    words = prompt.lower().split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return (color, shape) if color and shape else None


def template(shape, center, area, size, sharpness=1.5):
    """A soft (H, W) mask of the ideal `shape` with the given center (x, y) and area in pixels."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    dx, dy = xs - center[0], ys - center[1]
    if shape == "circle":
        inside = (area / math.pi) ** 0.5 - (dx ** 2 + dy ** 2).sqrt()  # signed distance to the edge
    elif shape == "square":
        inside = area ** 0.5 / 2 - torch.maximum(dx.abs(), dy.abs())
    else:  # equilateral triangle pointing up, centroid at `center`: inradius ρ = side / (2√3), area = 3√3 ρ²
        rho = (area / (3 * 3 ** 0.5)) ** 0.5
        normals = [(0.0, 1.0), (-(3 ** 0.5) / 2, -0.5), ((3 ** 0.5) / 2, -0.5)]  # outward, y pointing down
        inside = torch.stack([rho - (nx * dx + ny * dy) for nx, ny in normals]).amin(0)
    return torch.sigmoid(inside / sharpness * 4)


def reward(images, prompts):
    """R(x, c) in [0, 1] for pictures of this world: 0.4 · color + 0.4 · shape + 0.2 · clean background.

    The object is the soft set of pixels far from the background color (the median of the border); color = how
    close its mean color is to the prompt's; shape = soft IoU of the object with the ideal prompted shape of the
    same area and centroid, against the other shapes' (a softmax); clean = how little the background strays from flat. Differentiable in the pixels
    (the background color and the template's placement are treated as constants). Images (B, 3, H, W) in [0, 1]."""
    b, _, h, w = images.shape
    scores = []
    for image, prompt in zip(images, prompts):
        wanted = parse(prompt)
        if wanted is None:
            raise ValueError(f"the shapes reward only knows 'a {{color}} {{shape}}' prompts, not {prompt!r}")
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        background = border.median(dim=1).values.detach()
        distance = (image - background[:, None, None]).norm(dim=0)  # (H, W), up to √3
        mask = torch.sigmoid((distance - 0.3) * 20)
        area = mask.sum()
        if area.item() < 4:  # nothing drawn
            scores.append(0.2 * torch.exp(-distance.mean() / 0.05))
            continue
        mean_color = (image * mask).sum(dim=(1, 2)) / area
        target = torch.tensor(COLORS[wanted[0]], dtype=image.dtype, device=image.device) / 255
        color = torch.exp(-((mean_color - target) ** 2).sum() / 0.02)
        with torch.no_grad():
            ys, xs = torch.meshgrid(torch.arange(h, dtype=image.dtype) + 0.5, torch.arange(w, dtype=image.dtype) + 0.5,
                                    indexing="ij")
            center = [((mask * xs).sum() / area).item(), ((mask * ys).sum() / area).item()]
        # same-area shapes overlap a lot (a circle and a square: IoU ~0.9), so the score compares the IoU with
        # the prompted shape against those with the other two: a softmax over the three IoUs, sharpened
        iou = torch.stack([torch.minimum(mask, ideal).sum() / torch.maximum(mask, ideal).sum()
                           for ideal in (template(s, center, area.item(), h).to(image.device) for s in SHAPES)])
        shape = torch.softmax(40 * iou, dim=0)[SHAPES.index(wanted[1])]
        clean = torch.exp(-((1 - mask) * distance).sum() / (1 - mask).sum().clamp(min=1) / 0.05)
        scores.append(0.4 * color + 0.4 * shape + 0.2 * clean)
    return torch.stack(scores)


# ----------------------------------------------------------------------------------------------------------
# Judges that training never sees: they score pictures by other means than `reward`, for the experiment's
# evaluation (and the embedded model's test). Each takes uint8 pixels (H, W, 3) or images (B, 3, H, W) in [0, 1].

def judge(pixels):
    """(color, shape) of the one object in an (H, W, 3) uint8 picture, by pixels alone; None where unclear.

    Foreground = pixels far from the border's median color. Color = the nearest of COLORS to the mean foreground
    pixel. Shape = how much of its bounding box the object fills: a square ~1, a circle π/4 ~ 0.79, a triangle 1/2."""
    image = pixels.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(image - background, axis=-1) > 80
    if mask.sum() < 0.03 * mask.size:
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    mean = image[mask].mean(axis=0)
    color = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c])))
    return color, shape


def correct(images, prompts):
    """1 where `judge` reads the prompted color and shape, else 0: the pixel checker's verdict per image."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([float(judge(p) == parse(prompt)) for p, prompt in zip(pixels, prompts)])


def edge_sharpness(images, prompts=None):
    """The 99th percentile of the luma gradient's magnitude (central differences), per image: crisp edges are steep
    (a drawn edge spans about one pixel), blurred ones are not."""
    luma = (images.detach() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1)
    gx = luma[:, 1:-1, 2:] - luma[:, 1:-1, :-2]
    gy = luma[:, 2:, 1:-1] - luma[:, :-2, 1:-1]
    return ((gx ** 2 + gy ** 2).sqrt() / 2).flatten(1).quantile(0.99, dim=1)


def background_noise(images, prompts=None):
    """The standard deviation of the background (pixels near the border's median color), per image: the drawn
    world's backgrounds are flat, so lower is better."""
    x = images.detach()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    near = (x - background).norm(dim=1, keepdim=True) < 0.3
    deviation = ((x - background) ** 2).sum(dim=1, keepdim=True)
    return ((deviation * near).flatten(1).sum(1) / near.flatten(1).sum(1).clamp(min=1)).sqrt()


def check_prompts(prompts):
    """The reward's prompt check (rewards.check_prompts calls it before training): ValueError for a prompt outside
    this world."""
    bad = [p for p in prompts if parse(p) is None]
    if bad:
        raise ValueError(f"it knows only 'a {{color}} {{shape}}' prompts (colors {', '.join(COLORS)}; shapes "
                         f"{', '.join(SHAPES)}), and {len(bad)} prompt(s) are not, e.g. {bad[0]!r}")


reward.differentiable, reward.bounded, reward.check_prompts = True, True, check_prompts


# ----------------------------------------------------------------------------------------------------------
# The video world: one shape crossing part of the frame at constant speed, `a {color} {shape} moving {direction}`.
# `weights/make_video_model.py` trains the embedded video model on these clips.

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # unit steps; image y points down
FRAMES = 8  # frames per clip


def video_prompts():
    """Every caption of the video world: the 48 `a {color} {shape} moving {direction}` prompts."""
    return [f"a {color} {shape} moving {d}" for color in COLORS for shape in SHAPES for d in DIRECTIONS]


def draw_clip(color, shape, radius, start, velocity, background, frames=FRAMES, size=SIZE):
    """A clip (list of `frames` PIL images): the shape's center at start + f · velocity in frame f (pixels)."""
    return [draw(color, shape, radius, (start[0] + f * velocity[0], start[1] + f * velocity[1]), background, size)
            for f in range(frames)]


def draw_video_example(rng, frames=FRAMES, size=SIZE):
    """A random clip and its caption: the shape travels 30% to 45% of the frame in a straight line, at constant speed,
    never touching the border; it is a bit smaller than the image world's shapes (18% to 22% of the frame) to have
    room to move."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    radius = rng.uniform(0.18, 0.22) * size
    travel = rng.uniform(0.30, 0.45) * size
    margin = radius + 2
    low = rng.uniform(margin, size - margin - travel)  # the lower end of the path on the moving axis
    across = rng.uniform(margin, size - margin)  # the fixed coordinate
    dx, dy = DIRECTIONS[direction]
    along = low if dx + dy > 0 else low + travel  # start at the end the motion leaves from
    start = (along, across) if dx else (across, along)
    step = travel / (frames - 1)
    background = 235 + rng.integers(-12, 13, 3)
    clip = draw_clip(color, shape, radius, start, (dx * step, dy * step), background, frames, size)
    return clip, f"a {color} {shape} moving {direction}"


def parse_video(prompt):
    """'a red circle moving right' -> ('red', 'circle', 'right'); None for prompts outside the video world."""
    still = parse(prompt)
    direction = next((w for w in prompt.lower().split() if w in DIRECTIONS), None)
    return (*still, direction) if still and direction else None


def centroid_track(weights):
    """Centroids (x, y) in pixels of per-frame masses `weights` (..., F, H, W), as (..., F, 2)."""
    h, w = weights.shape[-2:]
    ys = torch.arange(h, dtype=weights.dtype, device=weights.device) + 0.5
    xs = torch.arange(w, dtype=weights.dtype, device=weights.device) + 0.5
    mass = weights.sum(dim=(-2, -1)).clamp(min=1e-6)
    return torch.stack([(weights.sum(-2) * xs).sum(-1) / mass, (weights.sum(-1) * ys).sum(-1) / mass], dim=-1)


def travel(track):
    """The straight-line travel of a track (..., F, 2) from its first frame to its last: the least-squares slope of
    position against frame index, times F − 1 (one fitted velocity, so one bad frame moves it little)."""
    f = torch.arange(track.shape[-2], dtype=track.dtype, device=track.device)
    f = (f - f.mean())[:, None]
    slope = (f * (track - track.mean(dim=-2, keepdim=True))).sum(-2) / (f ** 2).sum()
    return slope * (track.shape[-2] - 1)


def motion_score(video, color, direction):
    """How well the prompted color's mass moves in `direction` across a (F, 3, H, W) clip in [0, 1], in [0, 1].

    The mass is each pixel's closeness to the prompted color, exp(−‖x − c‖² / 0.02); its centroid's travel t
    (`travel`) splits into t_∥ along the direction and t_⊥ across it. Score = σ((t_∥ − 4 px) / 1.5 px) ·
    exp(−(t_⊥ / 6 px)²): a shape that crosses at least a few pixels the right way and keeps its line scores ~1,
    a still one ~0.07, one going the wrong way ~0. Differentiable in the pixels."""
    target = torch.tensor(COLORS[color], dtype=video.dtype, device=video.device)[:, None, None] / 255
    weights = torch.exp(-((video - target) ** 2).sum(dim=1) / 0.02)  # (F, H, W)
    if (weights.sum(dim=(1, 2)) < 1).any():  # the color is missing from a frame: no track to follow
        return video.sum() * 0
    t = travel(centroid_track(weights))
    d = torch.tensor(DIRECTIONS[direction], dtype=video.dtype, device=video.device)
    along, across = (t * d).sum(), (t * d.flip(0)).sum()
    return torch.sigmoid((along - 4) / 1.5) * torch.exp(-(across / 6) ** 2)


def video_reward(videos, prompts):
    """R(v, c) in [0, 1] for clips of the video world: the image `reward` of each frame for `a {color} {shape}`,
    averaged over the frames, times 0.2 + 0.8 · `motion_score` for the prompted direction (the floor keeps the
    frames' gradient alive where nothing moves yet, or the color is wrong). Videos (B, F, 3, H, W) in [0, 1], at
    least two frames; differentiable in the pixels."""
    b, frames = videos.shape[:2]
    if frames < 2:
        raise ValueError(f"the video reward follows the shape across frames and needs at least 2, not {frames}")
    wanted = [parse_video(p) for p in prompts]
    check_video_prompts(prompts)
    still = [f"a {color} {shape}" for color, shape, _ in wanted for _ in range(frames)]
    per_frame = reward(videos.flatten(0, 1), still).view(b, frames).mean(dim=1)
    motion = torch.stack([motion_score(v, color, d) for v, (color, _, d) in zip(videos, wanted)])
    return per_frame * (0.2 + 0.8 * motion)


def check_video_prompts(prompts):
    """ValueError for a prompt outside the video world (rewards.check_prompts calls it before training)."""
    bad = [p for p in prompts if parse_video(p) is None]
    if bad:
        raise ValueError(f"it knows only 'a {{color}} {{shape}} moving {{direction}}' prompts (colors "
                         f"{', '.join(COLORS)}; shapes {', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)}), and "
                         f"{len(bad)} prompt(s) are not, e.g. {bad[0]!r}")


video_reward.differentiable, video_reward.bounded, video_reward.check_prompts = True, True, check_video_prompts
video_reward.video = True  # it scores whole clips (B, F, 3, H, W), not single frames


# Judges of clips, for the video experiment and the embedded video model's test; training never sees them. They
# read pixels only (uint8 (F, H, W, 3), or videos (B, F, 3, H, W) in [0, 1]) and share no code with the reward.

def judge_direction(pixels, color, min_travel=4.0):
    """Where the pixels of `color` go across a (F, H, W, 3) uint8 clip: 'left', 'right', 'up', 'down', or None.

    Color thresholding: a pixel is the shape's when it is within 90 (of 255, Euclidean) of COLORS[color]. Each frame
    with at least 20 such pixels gives a centroid; a least-squares line through them gives the travel from the first
    frame to the last. The direction is the axis of the larger travel, if it is at least `min_travel` pixels and
    twice the other axis'; a still or wandering shape is None."""
    image = pixels.astype(np.float32)
    mask = np.linalg.norm(image - np.array(COLORS[color], dtype=np.float32), axis=-1) < 90  # (F, H, W)
    frames, points = [], []
    for f, m in enumerate(mask):
        if m.sum() >= 20:
            ys, xs = np.nonzero(m)
            frames.append(f)
            points.append((xs.mean(), ys.mean()))
    if len(frames) < max(2, len(mask) // 2):
        return None
    (sx, sy), span = np.polyfit(np.array(frames, dtype=np.float64), np.array(points), 1)[0], len(mask) - 1
    dx, dy = sx * span, sy * span
    if max(abs(dx), abs(dy)) < min_travel or min(abs(dx), abs(dy)) * 2 > max(abs(dx), abs(dy)):
        return None
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def judge_video(pixels):
    """(color, shape, direction) of the one moving object in a (F, H, W, 3) uint8 clip; None where unclear.

    Color and shape: `judge` on every frame, each the most frequent reading of the frames it reads, which at least
    half of the clip's frames must give and no other reading as often (a tie is unclear, not a coin toss);
    direction: `judge_direction` for that color (None when it does not move clearly)."""
    seen = [s for s in map(judge, pixels) if s is not None]
    if not seen:
        return None
    readings = []
    for values in zip(*seen):  # the colors read, then the shapes
        (best, n), *others = Counter(values).most_common(2)
        if n * 2 < len(pixels) or (others and others[0][1] == n):  # under half the clip, or a tie: unclear
            return None
        readings.append(best)
    color, shape = readings
    return color, shape, judge_direction(pixels, color)


def video_pixels(videos):
    """Videos (B, F, 3, H, W) in [0, 1] as uint8 clips (B, F, H, W, 3)."""
    return (videos.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def video_correct(videos, prompts):
    """1 where `judge_video` reads the prompted color, shape and direction, else 0: the checker's verdict per clip."""
    return torch.tensor([float(judge_video(p) == parse_video(prompt))
                         for p, prompt in zip(video_pixels(videos), prompts)])


def video_direction_correct(videos, prompts):
    """1 where the prompted color moves in the prompted direction (`judge_direction`), whatever the shape, else 0."""
    return torch.tensor([float(judge_direction(p, parse_video(prompt)[0]) == parse_video(prompt)[2])
                         for p, prompt in zip(video_pixels(videos), prompts)])
