"""The small flags of `npo.py sample` users expect, each against diffusers where diffusers has the feature:
--clip-skip (StableDiffusionPipeline's clip_skip), --variant (from_pretrained(variant=...)), --scheduler-config
(a scheduler built from that file), a JSONL row's negative_prompt (the pipeline's per-image negative_prompt).
The command's PNG equals `guided.generate` with the same settings exactly; generate equals diffusers to ATOL."""
import argparse
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from npo import checkpoint
from npo import guided
from npo import images
import npo
from npo import pipeline
from conftest import diffusers_pipeline, random_lora_files
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
    out = guided.generate(pipe, prompts, seeds, steps=4, guidance=1.0, clip_skip=1, **kw)
    assert (to01(out) - ref).abs().max() <= ATOL
    plain = guided.generate(pipe, prompts, seeds, steps=4, guidance=1.0, **kw)
    assert (to01(plain) - ref).abs().max() > 10 / 255  # the skip changes the image

    with torch.no_grad():
        pos = ref_pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=1)[0]
        neg = ref_pipe.encode_prompt(["blurry"] * 2, "cpu", 1, False, clip_skip=1)[0]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = ref_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=7.5,
                   output_type="pt", generator=gens, **kw).images
    out = guided.generate(pipe, prompts, seeds, "blurry", steps=4, guidance=7.5, clip_skip=1, **kw)
    assert (to01(out) - ref).abs().max() <= ATOL


def test_cli_clip_skip(tiny_model, tmp_path):
    path, _ = tiny_model
    assert npo.main(["sample", "--model", path, *SMALL, "--clip-skip", "2", "--out", str(tmp_path / "x.png")]) == 0
    pixels, params = png(tmp_path / "x.png")
    assert "Clip skip: 2" in params
    expected = guided.generate(pipeline.load_pipeline(path), ["a red circle"], [0], steps=3, height=32, width=32,
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
    out = guided.generate(pipeline.load_pipeline(str(model), variant="fp16"), ["a red circle"], [0], steps=3,
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
        out = guided.generate(pipe, ["a red circle"], [0], steps=3, height=32, width=32, sampler="dpmpp-2m")
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
    out = guided.generate(pipeline.load_pipeline(path), prompts, seeds, negatives, steps=3, height=32, width=32)
    assert (to01(out) - ref).abs().max() <= ATOL
    for k, (name, negative) in enumerate([("00000-seed5.png", "blurry"), ("00001-seed6.png", "ugly")]):
        pixels, params = png(tmp_path / "o" / name)
        assert params.startswith(f"{prompts[k]}\nNegative prompt: {negative}\n")
        assert np.array_equal(pixels, np.asarray(images.to_pil(out)[k]))


# ---- guidance, prompts, float flags -------------------------------------------------------------------------

def test_finite_float():
    assert checkpoint.finite_float("1.5") == 1.5 and checkpoint.finite_float("-0") == 0.0
    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a finite number"):
            checkpoint.finite_float(text)
    with pytest.raises(ValueError):
        checkpoint.finite_float("x")


@pytest.mark.parametrize("flag, value", [("--guidance", "nan"), ("--guidance", "1e999"), ("--alpha", "inf"),
                                         ("--beta", "-inf"), ("--ddim-eta", "nan")])
def test_cli_non_finite_float_flags_exit_2(tiny_model, offsets, tmp_path, capsys, flag, value):
    """--guidance nan once wrote a black image with exit 0: argparse refuses a non-finite number in one line."""
    with pytest.raises(SystemExit) as e:
        npo.main(["sample", "--model", tiny_model[0], "--steps", "1", "--height", "16", "--width", "16", "--lora",
                  offsets["eta"], "--npo", offsets["delta"], f"{flag}={value}", "--out",
                  str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {value!r} is not a finite number" in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--sweep-alpha", "0,nan"], "--sweep-alpha takes comma-separated finite numbers"),
    (["--sweep-beta", "inf"], "--sweep-beta takes comma-separated finite numbers"),
    (["--lora", "ETA:nan"], "is not a finite number"),
    (["--guidance", "-3"], "--guidance -3 is negative"),
])
def test_cli_non_finite_lists_and_negative_guidance_exit_2(tiny_model, offsets, tmp_path, capsys, flags, words):
    flags = [offsets["eta"] + ":nan" if f == "ETA:nan" else f for f in flags]
    assert npo.main(["sample", "--model", tiny_model[0], "--steps", "1", "--height", "16", "--width", "16", "--lora",
                     offsets["eta"], "--npo", offsets["delta"], *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_cli_guidance_0_samples_the_prompt_alone(tiny_model, tmp_path):
    """g = 0 is allowed: like any g <= 1 it runs the conditional branch alone, as diffusers' pipeline does."""
    path, refs = tiny_model
    assert npo.main(["sample", "--model", path, *SMALL, "--guidance", "0", "--seed", "2",
                     "--out", str(tmp_path / "g0.png")]) == 0
    ref = diffusers_pipeline(path, refs)(["a red circle"], num_inference_steps=3, guidance_scale=0.0, height=32,
                                         width=32, output_type="pt", generator=[torch.Generator().manual_seed(2)]).images
    picture, params = png(tmp_path / "g0.png")
    assert np.abs(picture.astype(int) - np.asarray(images.to_pil(ref * 2 - 1)[0]).astype(int)).max() <= 1
    assert "CFG scale: 0.0" in params


def test_cli_says_which_default_prompt_it_samples(tiny_model, tmp_path, capsys):
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--out", str(tmp_path / "d.png")]) == 0
    assert "no --prompt given: sampling the default prompt 'a red circle'" in capsys.readouterr().err
    assert png(tmp_path / "d.png")[1].startswith("a red circle\n")
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--prompt", "a blue square",
                     "--out", str(tmp_path / "e.png")]) == 0
    assert "default prompt" not in capsys.readouterr().err


def a1111_settings(line):
    """The `Key: value` pairs of an A1111 settings line, read as A1111's parse_generation_parameters reads them (a
    value may be quoted, with commas inside)."""
    pairs = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def test_cli_sweep_grid_records_every_cell(tiny_model, offsets, tmp_path):
    """An α × β grid's `parameters` give every cell's settings, in A1111's X/Y/Z plot convention: the first cell's
    settings line, then X (columns, β) and Y (rows, α) with their values."""
    assert npo.main(["sample", "--model", tiny_model[0], "--steps", "1", "--height", "16", "--width", "16", "--lora",
                     offsets["eta"], "--npo", offsets["delta"], "--sweep-alpha", "0,0.5,1", "--sweep-beta", "0.25,1",
                     "--seed", "3", "--out", str(tmp_path / "sw")]) == 0
    text = Image.open(tmp_path / "sw" / "sweep-0000.png").text["parameters"]
    prompt, negative, line = text.split("\n")
    settings = a1111_settings(line)
    assert settings["Script"] == "X/Y/Z plot" and settings["Seed"] == "3"
    assert (settings["X Type"], settings["Y Type"]) == ("NPO beta", "NPO alpha")
    assert (settings["NPO alpha"], settings["NPO beta"]) == ("0.0", "0.25")  # the first cell
    cells = [(float(a), float(b)) for a in settings["Y Values"].split(",") for b in settings["X Values"].split(",")]
    assert cells == [(a, b) for a in (0.0, 0.5, 1.0) for b in (0.25, 1.0)]
# ---- the samplers users name, and the hashes civitai reads, in the PNG ----------------------------------------

@pytest.mark.parametrize("name, a1111", [("dpmpp-2m-karras", "DPM++ 2M Karras"), ("euler-a", "Euler a"),
                                         ("euler", "Euler")])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_cli_k_samplers(tiny_model, tmp_path, name, a1111):
    """--sampler dpmpp-2m-karras / euler-a / euler: the PNG is generate's picture and says the sampler as A1111 writes
    it (generate itself is checked against diffusers' pipeline in test_sample.py)."""
    path, _ = tiny_model
    assert npo.main(["sample", "--model", path, *SMALL, "--sampler", name, "--seed", "4", "--n", "2", "--batch-size",
                     "2", "--out", str(tmp_path)]) == 0
    pixels, params = png(tmp_path / "00001-seed5.png")
    assert f", Sampler: {a1111}, " in params and "DDIM eta" not in params
    out = guided.generate(pipeline.load_pipeline(path), ["a red circle"] * 2, [4, 5], steps=3, height=32, width=32,
                            sampler=name)
    assert np.array_equal(pixels, np.asarray(images.to_pil(out)[1]))


def test_cli_unknown_sampler_lists_the_known(tiny_model, capsys):
    with pytest.raises(SystemExit) as e:
        npo.main(["sample", "--model", tiny_model[0], "--sampler", "dpm++ 2m karras"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one sentence
    assert e.value.code == 2 and "Traceback" not in err and "invalid choice: 'dpm++ 2m karras'" in last
    assert "(choose from ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a)" in last.replace("'", "")


def test_sha256_file_against_hashlib(tmp_path):
    """The whole file's SHA-256 (A1111's model hash) and that of the safetensors tensor data after the header
    (kohya's addnet hash, A1111's LoRA hash), each against hashlib on bytes the test splits itself; the second
    does not change when only the metadata does. Chunked reading gives the same digests."""
    import hashlib
    import struct
    from npo import checkpoint
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    digests = []
    for k, meta in enumerate([{"ss_note": "one"}, {"ss_note": "another, longer text"}]):
        f = tmp_path / f"{k}.safetensors"
        save_file(tensors, str(f), metadata=meta)
        raw = f.read_bytes()
        n, = struct.unpack("<Q", raw[:8])
        whole, data = hashlib.sha256(raw).hexdigest(), hashlib.sha256(raw[8 + n:]).hexdigest()
        assert checkpoint.sha256_file(str(f)) == whole and checkpoint.sha256_file(str(f), chunk=7) == whole
        assert checkpoint.sha256_file(str(f), tensor_data_only=True) == data
        assert checkpoint.sha256_file(str(f), tensor_data_only=True, chunk=5) == data
        digests.append((whole, data))
    assert digests[0][0] != digests[1][0] and digests[0][1] == digests[1][1]  # other metadata, same tensor data


def test_png_hashes_once_per_run(tmp_path, offsets, monkeypatch):
    """`Model hash` = the first 10 hex digits of the model file's SHA-256, `Lora hashes` = "name: the first 12 of
    its tensor data's SHA-256" for η and δ, quoted as A1111 quotes a value with ':' or ','; each file read once for
    three pictures. Computed independently here with hashlib."""
    import hashlib
    import struct
    from npo import checkpoint
    import ldm
    folder = str(tmp_path / "sd1")
    model = ldm.save_ldm(ldm.to_ldm(ldm.make_family_dir(folder, "sd1"), "sd1"), str(tmp_path / "my,model.safetensors"))
    (tmp_path / "loras").mkdir()
    files = random_lora_files(folder, str(tmp_path / "loras"), [("eta", {}), ("delta", {})], seed=3)

    def data_hash(path):
        raw = open(path, "rb").read()
        return hashlib.sha256(raw[8 + struct.unpack("<Q", raw[:8])[0]:]).hexdigest()[:12]
    calls = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path, *a, **kw: calls.append(path) or real(path, *a, **kw))
    assert npo.main(["sample", "--model", model, "--lora", f"{files['eta']}:0.5", "--npo", files["delta"], "--steps",
                     "1", "--height", "16", "--width", "16", "--n", "3", "--out", str(tmp_path / "o")]) == 0
    assert sorted(calls) == sorted([model, files["eta"], files["delta"]])  # once each, for three pictures
    model_hash = hashlib.sha256(open(model, "rb").read()).hexdigest()[:10]
    for k in range(3):
        params = png(tmp_path / "o" / f"{k:05d}-seed{k}.png")[1]
        assert f"Model hash: {model_hash}, Model: \"my,model.safetensors\"," in params
        assert f'Lora hashes: "eta: {data_hash(files["eta"])}, delta: {data_hash(files["delta"])}"' in params


def test_png_of_a_folder_model_has_no_model_hash(tiny_model, tmp_path, offsets):
    """A diffusers folder is no single file (civitai lists none): no Model hash; the LoRA's hash is still written."""
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--lora", offsets["eta"], "--out",
                     str(tmp_path / "x.png")]) == 0
    params = png(tmp_path / "x.png")[1]
    assert "Model hash" not in params and 'Lora hashes: "eta: ' in params
    assert npo.main(["sample", "--model", tiny_model[0], *SMALL, "--out", str(tmp_path / "y.png")]) == 0
    assert "hash" not in png(tmp_path / "y.png")[1]
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
