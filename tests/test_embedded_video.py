"""The embedded video model in weights/video/: it borrows the image model's parts by npo_model.json, `sample --video`
names it, and it draws the prompted shape moving the prompted way, judged by pixels."""
import json
import os
import shutil

import pytest
import torch

import npo
from npo import pipeline
from npo.checkpoint import UserError


def borrower(tiny_video_dir, folder, notes):
    """A model folder with tiny_video_dir's unet/ and scheduler/ only, and `notes` as its npo_model.json."""
    for part in ("unet", "scheduler"):
        shutil.copytree(os.path.join(tiny_video_dir, part), os.path.join(folder, part))
    with open(os.path.join(folder, "npo_model.json"), "w") as f:
        json.dump(notes, f)
    return str(folder)


def test_a_folder_borrows_the_parts_its_npo_model_json_names(tiny_video_dir, tmp_path):
    shared = {part: os.path.relpath(os.path.join(tiny_video_dir, part), tmp_path / "m")
              for part in ("vae", "text_encoder", "tokenizer")}
    whole = pipeline.load_pipeline(tiny_video_dir)
    lent = pipeline.load_pipeline(borrower(tiny_video_dir, tmp_path / "m", dict(shared_parts=shared, frames=5)))
    assert lent.is_video and lent.default_frames == 5 and whole.default_frames is None
    for part in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(lent, part).state_dict(), getattr(whole, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(lent.tokenizer(["a red circle moving up"]), whole.tokenizer(["a red circle moving up"]))


def test_a_borrowed_part_that_is_not_there_is_one_sentence(tiny_video_dir, tmp_path):
    shared = {part: os.path.relpath(os.path.join(tiny_video_dir, part), tmp_path / "m")
              for part in ("text_encoder", "tokenizer")}
    folder = borrower(tiny_video_dir, tmp_path / "m", dict(shared_parts=dict(shared, vae="../nowhere")))
    with pytest.raises(UserError, match=r"has no vae/ folder \(its npo_model.json lends it from ../nowhere"):
        pipeline.load_pipeline(folder)


def test_video_flag_names_the_embedded_video_model(capsys):
    args = npo.build_parser().parse_args(["sample", "--video"])
    assert args.video and pipeline.DEFAULT_VIDEO_MODEL == os.path.join(pipeline.DEFAULT_MODEL, "video")
    assert npo.main(["sample", "--video", "--model", "elsewhere", "--prompt", "a red circle moving up"]) == 2
    assert "--video samples the embedded video model" in capsys.readouterr().err
