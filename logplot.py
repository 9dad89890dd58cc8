"""A training run's log as a picture: OUT/log.png beside OUT/log.jsonl, one panel per metric over the steps (the
loss, and what the method prints beside it: DPO's implicit accuracy and reward margin, the reward R, DDPO's KL and
clip fraction). Drawn with pillow alone; train.py rewrites it, atomically, at every checkpoint and at the end.

Each panel is a line through the logged (step, value) points inside a frame whose corners are labelled with the
first and last step (x) and the lowest and highest value (y), so the picture reads without the log.
"""
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from . import images

WIDTH, PANEL_HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 26, 30  # the frame's margins inside each panel, in pixels
BACKGROUND, FRAME, TEXT = (255, 255, 255), (96, 96, 96), (0, 0, 0)
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
NAMES = {"loss": "loss", "implicit_acc": "implicit accuracy", "reward_margin": "reward margin",
         "reward": "reward R", "reward_std": "reward R, std", "approx_kl": "approx. KL", "clipfrac": "clip fraction"}


def read_log(path, keys):
    """(steps, {key: values}) of the metric lines of a log.jsonl (the events have no loss); keys it lacks are left
    out, and a key's non-finite values are dropped with their steps."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for text in f:
            entry = json.loads(text)
            if "loss" in entry and "step" in entry:
                lines.append(entry)
    series = {}
    for key in keys:
        points = [(e["step"], e[key]) for e in lines if key in e and math.isfinite(e[key])]
        if points:
            series[key] = points
    return series


def draw(series):
    """An image of WIDTH × (PANEL_HEIGHT · panels): one panel per {key: [(step, value), ...]}, top to bottom."""
    picture = Image.new("RGB", (WIDTH, PANEL_HEIGHT * max(1, len(series))), BACKGROUND)
    canvas, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for i, (key, points) in enumerate(series.items()):
        _panel(canvas, font, i * PANEL_HEIGHT, NAMES.get(key, key), points, COLORS[i % len(COLORS)])
    return picture


def _panel(canvas, font, top, title, points, color):
    x0, y0, x1, y1 = LEFT, top + TOP, WIDTH - RIGHT, top + PANEL_HEIGHT - BOTTOM
    steps, values = [s for s, _ in points], [v for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi == v_lo:  # a flat line: centre it
        v_lo, v_hi = v_lo - 0.5 * (abs(v_lo) or 1), v_hi + 0.5 * (abs(v_hi) or 1)
    # step s at x0 … x1, value v at y1 (lowest) … y0 (highest)
    xy = [(x0 + (x1 - x0) * ((s - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5),
           y1 - (y1 - y0) * (v - v_lo) / (v_hi - v_lo)) for s, v in points]
    canvas.rectangle([x0, y0, x1, y1], outline=FRAME)
    canvas.text((x0, top + 6), title, fill=TEXT, font=font)
    canvas.text((4, y0), f"{v_hi:.4g}", fill=TEXT, font=font)
    canvas.text((4, y1 - 10), f"{v_lo:.4g}", fill=TEXT, font=font)
    canvas.text((x0, y1 + 6), f"step {s_lo}", fill=TEXT, font=font)
    if s_hi > s_lo:
        canvas.text((x1 - 60, y1 + 6), f"step {s_hi}", fill=TEXT, font=font)
    if len(xy) > 1:
        canvas.line(xy, fill=color, width=2)
    for x, y in xy if len(xy) <= 50 else []:  # few points: mark each
        canvas.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def write(out, keys):
    """OUT/log.png from OUT/log.jsonl: the panels of `keys` that the log holds (nothing when it holds no metric)."""
    log = os.path.join(out, "log.jsonl")
    series = read_log(log, keys) if os.path.isfile(log) else {}
    if series:
        images.save_png(draw(series), os.path.join(out, "log.png"))
