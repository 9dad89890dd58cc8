"""Videos with NPO: the files (frames + WebP preview with their parameters, atomic, numbered on), `npo.py evaluate`
on video folders (frame-averaged scores, paired by prompt and seed), and, on tiny random video models, whole videos
against diffusers' TextToVideoSDPipeline and NPO video sampling against a two-UNet diffusers reference."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import npo
from npo import evaluate
from npo import images
from npo import sample
from npo import videos
from npo.checkpoint import UserError

TEXT = "a red circle moving left, ünïcode\nNegative prompt: blurry\nSteps: 5, Sampler: DDIM, Seed: 3, Frames: 4, FPS: 5"


def flat_frames(greys, size=(16, 8)):
    """One flat RGB frame per grey level (red channel = grey, green = k so that frames differ)."""
    return [Image.new("RGB", size, (g, k, 255 - g)) for k, g in enumerate(greys)]


def test_save_video_writes_frames_and_preview_with_parameters(tmp_path):
    frames = flat_frames([10, 80, 160, 240])
    folder = videos.save_video(frames, str(tmp_path), "00000-seed3", TEXT, fps=5)
    assert folder == str(tmp_path / "00000-seed3")
    assert sorted(os.listdir(tmp_path)) == ["00000-seed3", "00000-seed3.webp"]  # no temporary name left behind
    assert sorted(os.listdir(folder)) == ["000.png", "001.png", "002.png", "003.png"]
    for k, frame in enumerate(frames):
        with Image.open(os.path.join(folder, f"{k:03d}.png")) as png:
            assert png.text["parameters"] == TEXT  # A1111's PNG text chunk, as images.save_png writes it
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(frame))  # lossless
    with Image.open(tmp_path / "00000-seed3.webp") as webp:
        assert webp.format == "WEBP" and webp.n_frames == 4 and webp.info["loop"] == 0
        durations = []
        for k in range(webp.n_frames):
            webp.seek(k)
            # lossy, but a flat frame keeps its colour within a few levels
            assert np.abs(np.asarray(webp.convert("RGB"), dtype=int) - np.asarray(frames[k], dtype=int)).max() <= 4
            durations.append(webp.info["duration"])  # known once the frame is loaded
        assert durations == [200] * 4  # 1000 ms / 5 fps
        # the EXIF UserComment read by pillow alone, decoded as EXIF defines it: "UNICODE\0" + UCS-2 in the file's
        # byte order (big-endian, "MM", as piexif writes it for A1111)
        exif = webp.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert exif.endian == ">" and comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == TEXT
    assert videos.read_parameters(str(tmp_path / "00000-seed3.webp")) == TEXT
    assert videos.read_parameters(os.path.join(folder, "002.png")) == TEXT


def test_save_video_is_atomic(tmp_path, monkeypatch):
    """A failure halfway leaves neither the frames' folder nor the preview nor a temporary folder; an existing video
    is never overwritten."""
    calls = []
    real = images.save_png

    def failing(image, path, parameters=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(image, path, parameters)
    monkeypatch.setattr(images, "save_png", failing)
    with pytest.raises(UserError, match=r"cannot write the video .*00000-seed0 \(No space left on device\)"):
        videos.save_video(flat_frames([1, 2, 3, 4]), str(tmp_path), "00000-seed0", TEXT)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(images, "save_png", real)
    videos.save_video(flat_frames([1, 2]), str(tmp_path), "00000-seed0", TEXT)
    with pytest.raises(UserError, match="00000-seed0 exists already"):
        videos.save_video(flat_frames([5, 6]), str(tmp_path), "00000-seed0", TEXT)
    with Image.open(tmp_path / "00000-seed0" / "000.png") as first:
        assert first.getpixel((0, 0))[0] == 1  # the first video's frame, untouched


def test_numbering_continues_after_videos_and_images(tmp_path):
    videos.save_video(flat_frames([1, 2]), str(tmp_path), "00004-seed1", TEXT)
    assert sample.next_number(str(tmp_path)) == 5
    images.save_png(Image.new("RGB", (8, 8)), str(tmp_path / "00007-seed0.png"), TEXT)
    assert sample.next_number(str(tmp_path)) == 8
    os.makedirs(tmp_path / ".00009-seed2.abc.tmp")  # a temporary folder of a video being written is not counted
    assert sample.next_number(str(tmp_path)) == 8


def test_parameters_carry_frames_and_fps():
    args = npo.build_parser().parse_args(["sample", "--prompt", "a red circle moving up", "--frames", "6", "--fps", "4"])
    job = dict(prompt="a red circle moving up", negative=None, seed=2, alpha=1.0, beta=1.0)
    text = sample.a1111_parameters(args, job, (32, 32))
    assert text.startswith("a red circle moving up\nNegative prompt: \nSteps: 50, Sampler: DDIM, CFG scale: None, "
                           "Seed: 2, Size: 32x32, Frames: 6, FPS: 4, Model: ")
    assert evaluate.prompt_and_seed(text, "x") == ("a red circle moving up", 2)
    args = npo.build_parser().parse_args(["sample"])
    assert "Frames" not in sample.a1111_parameters(args, job, (32, 32))  # images keep A1111's settings only


# ----------------------------------------------------------------------------------------------------------
# npo.py evaluate on video folders

PROMPTS = ["a red circle moving left", "a blue square moving up", "a red circle moving left"]
SEEDS = [0, 1, 7]


def parameters(prompt, seed, frames):
    args = npo.build_parser().parse_args(["sample", "--prompt", prompt, "--frames", str(frames), "--fps", "8"])
    return sample.a1111_parameters(args, dict(prompt=prompt, negative=None, seed=seed, alpha=1.0, beta=1.0), (16, 8))


def write_videos(folder, greys, shuffle_names=None):
    """One video per (prompt, seed) of PROMPTS × SEEDS, video i of flat grey frames greys[i] (a list, one grey per
    frame); numbered in another order when `shuffle_names` (a seed), so that pairing can only work through the
    parameters."""
    os.makedirs(folder, exist_ok=True)
    order = list(range(len(greys)))
    if shuffle_names is not None:
        random.Random(shuffle_names).shuffle(order)
    for number, i in zip(order, range(len(greys))):
        frames = [Image.new("RGB", (16, 8), (g,) * 3) for g in greys[i]]
        videos.save_video(frames, str(folder), f"{number:05d}-seed{SEEDS[i]}", parameters(PROMPTS[i], SEEDS[i],
                                                                                          len(frames)))
    return str(folder)


def test_evaluate_scores_videos_by_their_frame_mean(tmp_path):
    """rewards:brightness of a flat grey frame is grey / 255, so each video's score is the mean of its greys / 255;
    videos of different lengths in the two folders still pair by prompt and seed."""
    a_greys = [[10, 20, 30, 40], [100, 100, 100, 100], [0, 0, 0, 200]]  # means 25, 100, 50
    b_greys = [[30, 30], [90, 110, 120], [50, 50, 50, 50, 50, 50]]      # means 30, 106.67, 50
    a = write_videos(tmp_path / "a", a_greys)
    b = write_videos(tmp_path / "b", b_greys, shuffle_names=3)
    results = evaluate.evaluate([a, b], ["rewards:brightness"], str(tmp_path / "report"), batch_size=3)
    r = results["scorers"]["rewards:brightness"]
    assert results["pairs"] == 3
    a_means = sorted(zip(zip(PROMPTS, SEEDS), [sum(g) / len(g) / 255 for g in a_greys]))  # in (prompt, seed) order
    b_means = sorted(zip(zip(PROMPTS, SEEDS), [sum(g) / len(g) / 255 for g in b_greys]))
    assert r["mean"][a] == pytest.approx(np.mean([m for _, m in a_means]), rel=1e-6)
    assert r["mean"][b] == pytest.approx(np.mean([m for _, m in b_means]), rel=1e-6)
    # video by video: 25 < 30, 100 < 106.67, 50 = 50 -> a wins (0 + 0 + 0.5) / 3
    assert r["win_rate"][a][b] == pytest.approx(1 / 6) and r["win_rate"][b][a] == pytest.approx(5 / 6)
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == results


def test_evaluate_video_folders_bad_input(tmp_path):
    a = write_videos(tmp_path / "a", [[10, 20], [30, 40], [50, 60]])
    b = write_videos(tmp_path / "b", [[10, 20], [30, 40], [50, 60]])
    report = str(tmp_path / "report")
    os.remove(os.path.join(b, "00001-seed1", "000.png"))  # a frame deleted by hand: 001.png alone is left
    with pytest.raises(UserError, match=r"00001-seed1 lacks frame 000.png of its 2; sample the video again"):
        evaluate.evaluate([a, b], ["rewards:brightness"], report)
    assert not os.path.exists(report)
    c = tmp_path / "c"  # the same prompts and seeds as images, not videos
    os.makedirs(c)
    for i, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
        images.save_png(Image.new("RGB", (16, 8)), str(c / f"{i:05d}-seed{s}.png"), parameters(p, s, 2))
    with pytest.raises(UserError, match=r"a/00001-seed1 is a video but .*c/00001-seed1.png \(the same prompt and "
                                        r"seed\) is an image"):
        evaluate.evaluate([a, str(c)], ["rewards:brightness"], report)
    assert npo.main(["evaluate", a, str(c), "--scorer", "rewards:brightness", "--out", report]) == 2
