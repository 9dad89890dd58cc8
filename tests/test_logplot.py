"""OUT/log.png: each metric's panel draws its values where they are, the first step left and the last right, the
lowest value at the bottom of the frame and the highest at the top."""
import json

import pytest
from PIL import Image

from npo import logplot


def line_pixels(picture, color, panel):
    """The (x, y) of the pixels of `color` in panel `panel`, y from the panel's top."""
    top = panel * logplot.PANEL_HEIGHT
    rgb = picture.convert("RGB")
    return [(x, y - top) for y in range(top, top + logplot.PANEL_HEIGHT) for x in range(picture.width)
            if rgb.getpixel((x, y)) == color]


@pytest.mark.parametrize("rising", [True, False])
def test_a_panel_draws_the_values_where_they_are(rising):
    values = [float(i) if rising else float(-i) for i in range(10)]
    picture = logplot.draw({"loss": [(10 * (i + 1), v) for i, v in enumerate(values)], "reward": [(10, 0.5), (100, 0.5)]})
    assert picture.size == (logplot.WIDTH, 2 * logplot.PANEL_HEIGHT)
    pixels = line_pixels(picture, logplot.COLORS[0], 0)
    left, right = min(pixels), max(pixels)  # the first step's point, the last one's
    assert abs(left[0] - logplot.LEFT) <= 3 and abs(right[0] - (logplot.WIDTH - logplot.RIGHT)) <= 3
    low, high = logplot.PANEL_HEIGHT - logplot.BOTTOM, logplot.TOP  # the frame's bottom and top rows
    first, last = (low, high) if rising else (high, low)  # rising: from the bottom to the top
    assert abs(left[1] - first) <= 3 and abs(right[1] - last) <= 3
    flat = line_pixels(picture, logplot.COLORS[1], 1)  # a constant: a level line in the middle of its frame
    assert flat and max(y for _, y in flat) - min(y for _, y in flat) <= 4
    assert abs(sum(y for _, y in flat) / len(flat) - (low + high) / 2) <= 3


def test_write_reads_the_metrics_of_the_log(tmp_path):
    lines = [{"event": "resume", "step": 0}, {"step": 1, "loss": 0.7, "implicit_acc": 0.5},
             {"step": 2, "loss": float("nan"), "implicit_acc": 0.6}, {"step": 3, "loss": 0.5, "implicit_acc": 0.75}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert logplot.read_log(tmp_path / "log.jsonl", ("loss", "implicit_acc", "reward")) == {
        "loss": [(1, 0.7), (3, 0.5)], "implicit_acc": [(1, 0.5), (2, 0.6), (3, 0.75)]}
    logplot.write(str(tmp_path), ("loss", "implicit_acc", "reward"))
    with Image.open(tmp_path / "log.png") as picture:
        assert picture.format == "PNG" and picture.size == (logplot.WIDTH, 2 * logplot.PANEL_HEIGHT)
