"""The embedded video model in weights/video/: it borrows the image model's parts by npo_model.json, `sample --video`
names it, and it draws the prompted shape moving the prompted way, judged by pixels."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import npo
from npo import guided
from npo import pipeline
from npo import shapes
from npo import unet
from npo import video
from npo.checkpoint import UserError
from conftest import ROOT


def recipe():
    """weights/make_video_model.py, the recipe of the embedded video model, as a module."""
    spec = importlib.util.spec_from_file_location("make_video_model", os.path.join(ROOT, "weights", "make_video_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inflation_keeps_the_image_weights_and_adds_temporal_layers_that_add_nothing_yet_but_learn():
    image = unet.load_unet(os.path.join(ROOT, "weights", "unet"))
    model = recipe().inflate(image).train()
    state = model.state_dict()
    assert all(torch.equal(state[k].reshape(v.shape), v) for k, v in image.state_dict().items())
    temporal = [m for m in model.modules() if isinstance(m, (video.TemporalConvLayer, video.TransformerTemporalModel))]
    # transformer_in; 2 down blocks of 1 layer (a conv stack and a transformer each); the mid block's 2 conv stacks
    # and 1 transformer; 2 up blocks of 2 layers
    assert len(temporal) == 1 + 2 * 1 * 2 + 3 + 2 * 2 * 2
    for layer in temporal:  # each is the identity on its residual stream, frames folded batch-major
        x = torch.randn(2 * shapes.FRAMES, layer.proj_out.out_features if hasattr(layer, "proj_out") else
                        layer.conv1[0].num_channels, 4, 4)
        assert torch.equal(layer(x, shapes.FRAMES), x)
    # and they learn: one ε-loss gradient reaches every spatial parameter and each temporal layer's zeroed output
    # (the layers before it follow once it is nonzero; a zeroed norm before a zeroed conv would never learn)
    x, ctx = torch.randn(2, 4, shapes.FRAMES, 8, 8), torch.randn(2, 77, 32)
    ((model(x, torch.tensor([900, 300]), ctx) - torch.randn_like(x)) ** 2).mean().backward()
    new = [k for k in state if k not in image.state_dict()]
    outputs = [k for k in new if ".conv4.3.weight" in k or "proj_out.weight" in k]
    assert len(outputs) == len(temporal) and all(not state[k].any() for k in outputs)
    learning = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(outputs) | set(image.state_dict()) <= learning, sorted(set(outputs) - learning)


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
    notes = dict(shared_parts=shared, defaults=dict(frames=5))
    lent = pipeline.load_pipeline(borrower(tiny_video_dir, tmp_path / "m", notes))
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


@pytest.fixture(scope="module")
def video_pipe():
    return pipeline.load_pipeline(pipeline.DEFAULT_VIDEO_MODEL)


def test_the_video_model_is_the_image_models_parts_plus_its_unet(video_pipe):
    from diffusers import UNet3DConditionModel
    image = pipeline.load_pipeline(pipeline.DEFAULT_MODEL)
    assert video_pipe.is_video and video_pipe.default_frames == shapes.FRAMES
    for part in ("vae", "text_encoder"):
        mine, lent = getattr(video_pipe, part).state_dict(), getattr(image, part).state_dict()
        assert all(torch.equal(mine[k], lent[k]) for k in lent)
    ref = UNet3DConditionModel.from_pretrained(os.path.join(pipeline.DEFAULT_VIDEO_MODEL, "unet")).float().eval()
    x, ctx = torch.randn(1, 4, shapes.FRAMES, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(video_pipe.unet(x, 500, ctx), ref(x, 500, ctx).sample, rtol=1e-4, atol=1e-5)


def test_sample_video_writes_the_embedded_models_clip(tmp_path):
    out = tmp_path / "out"
    assert npo.main(["sample", "--video", "--prompt", "a red circle moving right", "--steps", "4", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["00000-seed0", "00000-seed0.webp"]
    assert sorted(os.listdir(out / "00000-seed0")) == [f"{f:03d}.png" for f in range(shapes.FRAMES)]


def test_samples_show_the_prompted_shape_and_some_move_the_prompted_way(video_pipe):
    """16 prompts (every direction, color and shape), one seed each, at sample's defaults (50 DDIM steps, guidance
    9), judged by pixels. Measured (weights/README.md): the prompted color and shape (`shapes.judge_video`) in 11 of
    16 clips, all three, direction too (`shapes.video_correct`), in 11, and the prompted direction in 14 (chance: 4)."""
    prompts = [shapes.video_prompts()[(13 * i) % 48] for i in range(16)]
    assert {shapes.parse_video(p)[2] for p in prompts} == set(shapes.DIRECTIONS)
    clips = guided.generate(video_pipe, prompts, [1000 + i for i in range(16)], frames=video_pipe.default_frames)
    clips = (clips + 1) / 2
    seen = [shapes.judge_video(p) for p in shapes.video_pixels(clips)]
    content = sum(s is not None and s[:2] == shapes.parse_video(p)[:2] for s, p in zip(seen, prompts))
    right = int(shapes.video_correct(clips, prompts).sum())
    direction = int(shapes.video_direction_correct(clips, prompts).sum())
    assert content >= 10 and right >= 9 and direction >= 12, \
        f"color and shape in {content} of 16, all three in {right}, the direction in {direction}"
