"""The small flags of `npo.py sample` users expect, each against diffusers where diffusers has the feature:
--clip-skip (StableDiffusionPipeline's clip_skip), --variant (from_pretrained(variant=...)), --scheduler-config
(a scheduler built from that file), a JSONL row's negative_prompt (the pipeline's per-image negative_prompt).
The command's PNG equals `pipeline.generate` with the same settings exactly; generate equals diffusers to ATOL."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import images
import npo
import pipeline
from conftest import diffusers_pipeline
from test_sample import ATOL, SD15_SCHEDULER, dpm_scheduler, to01

SMALL = ["--steps", "3", "--height", "32", "--width", "32"]


def png(path):
    picture = Image.open(path)
    return np.asarray(picture.convert("RGB")), picture.text["parameters"]


def as_png(out):
    return np.asarray(images.to_pil(out)[0])


# ---- --clip-skip ------------------------------------------------------------------------------------------

def clip_skip_pipeline(path, refs):
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm` for clip_skip, a module level transformers 5
    dropped; give it the same layer norm under that name, so diffusers' own clip_skip code runs unchanged."""
    ref_pipe = diffusers_pipeline(path, refs)
    te = ref_pipe.text_encoder
    object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return ref_pipe


def test_clip_skip_matches_diffusers(tiny_model):
    """A1111's "Clip skip 2" is diffusers' clip_skip=1 and our generate(clip_skip=1). Without CFG (guidance 1) it is
    StableDiffusionPipeline(clip_skip=1) itself. With CFG, A1111 skips the layer for the negative prompt too, and so
    do we; diffusers' pipeline skips it for the prompt only, so the reference encodes both with encode_prompt."""
    path, refs = tiny_model
    ref_pipe = clip_skip_pipeline(path, refs)
    pipe = pipeline.load_pipeline(path)
    prompts, seeds, kw = ["a red circle", "a blue square"], [1, 2], dict(height=32, width=32)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = ref_pipe(prompts, num_inference_steps=4, guidance_scale=1.0, clip_skip=1, output_type="pt", generator=gens,
                   **kw).images
    out = pipeline.generate(pipe, prompts, seeds, steps=4, guidance=1.0, clip_skip=1, **kw)
    assert (to01(out) - ref).abs().max() <= ATOL
    plain = pipeline.generate(pipe, prompts, seeds, steps=4, guidance=1.0, **kw)
    assert (to01(plain) - ref).abs().max() > 10 / 255  # the skip changes the image

    with torch.no_grad():
        pos = ref_pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=1)[0]
        neg = ref_pipe.encode_prompt(["blurry"] * 2, "cpu", 1, False, clip_skip=1)[0]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = ref_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=7.5,
                   output_type="pt", generator=gens, **kw).images
    out = pipeline.generate(pipe, prompts, seeds, "blurry", steps=4, guidance=7.5, clip_skip=1, **kw)
    assert (to01(out) - ref).abs().max() <= ATOL


def test_cli_clip_skip(tiny_model, tmp_path):
    path, _ = tiny_model
    assert npo.main(["sample", "--model", path, *SMALL, "--clip-skip", "2", "--out", str(tmp_path / "x.png")]) == 0
    pixels, params = png(tmp_path / "x.png")
    assert "Clip skip: 2" in params
    expected = pipeline.generate(pipeline.load_pipeline(path), ["a red circle"], [0], steps=3, height=32, width=32,
                                 clip_skip=1)
    assert np.array_equal(pixels, as_png(expected))
    for bad in ("0", "3"):  # the tiny text encoder has 2 layers
        assert npo.main(["sample", "--model", path, *SMALL, "--clip-skip", bad, "--out", str(tmp_path / "y.png")]) == 2
    assert not (tmp_path / "y.png").exists()


# ---- --variant --------------------------------------------------------------------------------------------

def test_cli_variant_fp16(tiny_model, tmp_path):
    """A folder holding only `*.fp16.safetensors` (the UNet's in float16) samples like diffusers' pipeline whose UNet
    is `from_pretrained(..., variant="fp16")`."""
    from diffusers import UNet2DConditionModel
    path, refs = tiny_model
    model = tmp_path / "model"
    shutil.copytree(path, model)
    src = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(src).items()}, model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    src.unlink()
    for part, name in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        os.rename(model / part / f"{name}.safetensors", model / part / f"{name}.fp16.safetensors")
    assert npo.main(["sample", "--model", str(model), *SMALL, "--out", str(tmp_path / "plain.png")]) == 2  # no plain files
    assert npo.main(["sample", "--model", str(model), *SMALL, "--variant", "fp16", "--out", str(tmp_path / "x.png")]) == 0
    assert npo.main(["info", "--model", str(model), "--variant", "fp16"]) == 0

    ref_pipe = diffusers_pipeline(path, refs)
    ref_pipe.unet = UNet2DConditionModel.from_pretrained(str(model / "unet"), variant="fp16",
                                                         torch_dtype=torch.float32).eval()
    ref = ref_pipe(["a red circle"], num_inference_steps=3, height=32, width=32, output_type="pt",
                   generator=[torch.Generator().manual_seed(0)]).images
    out = pipeline.generate(pipeline.load_pipeline(str(model), variant="fp16"), ["a red circle"], [0], steps=3,
                            height=32, width=32)
    assert (to01(out) - ref).abs().max() <= ATOL
    assert np.array_equal(png(tmp_path / "x.png")[0], as_png(out))


# ---- --scheduler-config -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_cli_scheduler_config_and_dpm_sampler(tiny_model, tmp_path):
    """--scheduler-config replaces the folder's scheduler/ for the run: DPM-Solver++ with trailing spacing, against
    DPMSolverMultistepScheduler.from_config(the same file)."""
    path, refs = tiny_model
    config = {**SD15_SCHEDULER, "timestep_spacing": "trailing", "_class_name": "DPMSolverMultistepScheduler"}
    (tmp_path / "sched").mkdir()
    (tmp_path / "sched" / "scheduler_config.json").write_text(json.dumps(config))
    for where in ("sched/scheduler_config.json", "sched"):  # the file or its folder
        assert npo.main(["sample", "--model", path, *SMALL, "--sampler", "dpmpp-2m", "--scheduler-config",
                         str(tmp_path / where), "--out", str(tmp_path / "x.png")]) == 0
        pixels, params = png(tmp_path / "x.png")
        assert "Sampler: DPM++ 2M" in params and "DDIM eta" not in params

        ref_pipe = diffusers_pipeline(path, refs)
        ref_pipe.scheduler = dpm_scheduler(config)
        ref = ref_pipe(["a red circle"], num_inference_steps=3, height=32, width=32, output_type="pt",
                       generator=[torch.Generator().manual_seed(0)]).images
        pipe = pipeline.load_pipeline(path)
        pipe.scheduler_config = pipeline.read_scheduler_config(str(tmp_path / where))
        out = pipeline.generate(pipe, ["a red circle"], [0], steps=3, height=32, width=32, sampler="dpmpp-2m")
        assert (to01(out) - ref).abs().max() <= ATOL
        assert np.array_equal(pixels, as_png(out))


@pytest.mark.parametrize("args, words", [
    (["--scheduler-config", "/nonexistent/scheduler_config.json"], "--scheduler-config"),
    (["--sampler", "dpmpp-2m", "--ddim-eta", "1"], "--ddim-eta"),
    (["--sampler", "dpmpp-2m", "--steps", "1000"], "at most 999 steps"),
    (["--sampler", "dpmpp-2m", "--scheduler-config", "KARRAS"], "use_karras_sigmas"),
    (["--scheduler-config", "BAD_SPACING"], "timestep_spacing"),
])
def test_cli_sampler_bad_input_exits_2(tiny_model, tmp_path, capsys, args, words):
    (tmp_path / "karras.json").write_text(json.dumps({**SD15_SCHEDULER, "use_karras_sigmas": True}))
    (tmp_path / "bad.json").write_text(json.dumps({**SD15_SCHEDULER, "timestep_spacing": "karras"}))
    args = [{"KARRAS": str(tmp_path / "karras.json"), "BAD_SPACING": str(tmp_path / "bad.json")}.get(a, a) for a in args]
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, *args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "o.png").exists()


# ---- a negative prompt per JSONL row ------------------------------------------------------------------------

def test_cli_negative_prompt_per_row(tiny_model, tmp_path):
    """A row's "negative_prompt" is its c'; rows without one take --negative-prompt. Against the pipeline's
    per-image negative_prompt list."""
    path, refs = tiny_model
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "a red circle", "negative_prompt": "blurry"}\n{"prompt": "a blue square"}\n')
    assert npo.main(["sample", "--model", path, *SMALL, "--prompts-file", str(rows), "--negative-prompt", "ugly",
                     "--batch-size", "2", "--seed", "5", "--out", str(tmp_path / "o")]) == 0
    prompts, negatives, seeds = ["a red circle", "a blue square"], ["blurry", "ugly"], [5, 6]
    ref = diffusers_pipeline(path, refs)(prompts, num_inference_steps=3, height=32, width=32, output_type="pt",
                                         negative_prompt=negatives,
                                         generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    out = pipeline.generate(pipeline.load_pipeline(path), prompts, seeds, negatives, steps=3, height=32, width=32)
    assert (to01(out) - ref).abs().max() <= ATOL
    for k, (name, negative) in enumerate([("00000-seed5.png", "blurry"), ("00001-seed6.png", "ugly")]):
        pixels, params = png(tmp_path / "o" / name)
        assert params.startswith(f"{prompts[k]}\nNegative prompt: {negative}\n")
        assert np.array_equal(pixels, np.asarray(images.to_pil(out)[k]))


# ---- --out: numbering on, never overwriting; no folder left by a failed run; a folder, not an image name ---------

def test_cli_numbers_on_and_never_overwrites(tiny_model, offsets, tmp_path):
    """A second run into the same folder numbers on from the highest number there (A1111's way), whatever its
    kind: images NNNNN-seedS.png, --compare grids compare-NNNN-seedS.png; the first run's files are untouched."""
    path, out = tiny_model[0], tmp_path / "o"
    assert npo.main(["sample", "--model", path, *SMALL, "--n", "2", "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(before) == ["00000-seed0.png", "00001-seed1.png"]
    assert npo.main(["sample", "--model", path, *SMALL, "--seed", "5", "--prompt", "a blue square",
                     "--out", str(out)]) == 0
    (out / "00007-seed9.png").write_bytes(before["00000-seed0.png"])  # a gap: the next number is 8
    assert npo.main(["sample", "--model", path, *SMALL, "--seed", "5", "--out", str(out)]) == 0
    for _ in range(2):
        assert npo.main(["sample", "--model", path, *SMALL, "--npo", offsets["delta"], "--compare", "--seed", "3",
                         "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["00000-seed0.png", "00001-seed1.png", "00002-seed5.png", "00007-seed9.png",
                                       "00008-seed5.png", "compare-0000-seed3.png", "compare-0001-seed3.png"]
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert png(out / "00002-seed5.png")[1].startswith("a blue square\n")
    assert png(out / "00008-seed5.png")[1].startswith("a red circle\n")


def test_cli_failed_run_leaves_no_folder(tiny_model, tmp_path, capsys):
    """The output folder (and its missing parents) is made when the first picture is written: a run that fails,
    before the model loads or after, leaves nothing behind."""
    bad_lora = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_lora))
    for flags in (["--steps", "0"], ["--steps", "1001"], ["--lora", str(bad_lora)]):
        assert npo.main(["sample", "--model", tiny_model[0], "--height", "32", "--width", "32", *flags,
                         "--out", str(tmp_path / "new" / "o")]) == 2
        assert "Traceback" not in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--out", str(tmp_path / "new" / "o")]) == 0
    assert os.listdir(tmp_path / "new" / "o") == ["00000-seed0.png"]


@pytest.mark.parametrize("out, words", [("x.jpg", "looks like an image file, but --out is a folder"),
                                        ("x.JPEG", "looks like an image file, but --out is a folder"),
                                        ("notes.txt", "is an existing file, but --out is a folder"),
                                        ("notes.txt/sub", "is not a writable folder"),
                                        ("dir.png", "is a folder, not a .png file"),
                                        ("", "--out is empty")])
def test_cli_out_must_be_a_folder(tiny_model, tmp_path, capsys, out, words):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dir.png").mkdir()
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--out", str(tmp_path / out) if out else ""]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path / "dir.png") == []
