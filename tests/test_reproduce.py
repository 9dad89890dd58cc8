"""`npo.py reproduce`: a recipe sampled and scored end to end on the embedded model, checked against the pipeline
and the judges called directly; an interrupted run continues to the same bytes; bad recipes and missing files are
one sentence."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from npo import guided
from npo import images
import npo
from npo import pipeline
from npo import reproduce
from npo import scorers
from npo import shapes
from npo.checkpoint import UserError
from conftest import ROOT, random_lora_files

RECIPES = os.path.join(ROOT, "recipes")
TINY = os.path.join(RECIPES, "tiny-shapes.json")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A --weights folder for the tiny recipe: random LoRA files as its η (dpo.safetensors) and δ (npo.safetensors)."""
    folder = str(tmp_path_factory.mktemp("weights"))
    files = random_lora_files(pipeline.DEFAULT_MODEL, folder, [("eta", dict()), ("delta", dict(alpha=2))], seed=3)
    os.replace(files["eta"], os.path.join(folder, "dpo.safetensors"))
    os.replace(files["delta"], os.path.join(folder, "npo.safetensors"))
    return folder


def run(recipe, weights, out, *flags):
    return npo.main(["reproduce", recipe, "--weights", weights, "--out", str(out), "--device", "cpu", *flags])


def pngs(out):
    found = {}
    for root, _, names in os.walk(os.path.join(out, "samples")):
        for name in names:
            found[os.path.relpath(os.path.join(root, name), out)] = os.path.join(root, name)
    return found


def unit(path):
    with Image.open(path) as image:
        return scorers.unit_pixels(image)


@pytest.fixture(scope="module")
def tiny_run(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "R"
    assert run(TINY, weights, out, "--max-prompts", "3") == 0
    return str(out)


def test_every_row_is_sampled_as_the_pipeline_samples_it(tiny_run, weights):
    recipe = reproduce.read_recipe(TINY)
    assert len(pngs(tiny_run)) == 4 * 3 * 2  # rows x prompts x images per prompt
    # the reference: the pipeline called directly with the row's offsets and settings (DPO + NPO, prompt 2, 2nd image)
    pipe = pipeline.load_pipeline(pipeline.DEFAULT_MODEL)
    guided.load_offset(pipe, [(os.path.join(weights, "dpo.safetensors"), 1.0)], "eta")
    guided.load_offset(pipe, [(os.path.join(weights, "npo.safetensors"), 1.0)], "delta")
    seed = recipe["seed"] + 2 * 2 + 1
    expected = guided.generate(pipe, [recipe["prompts"][2]], [seed], steps=recipe["steps"],
                                 guidance=recipe["guidance"], alpha=1.0, beta=1.0, sampler=recipe["sampler"])
    path = os.path.join(tiny_run, "samples", "DPO_NPO", f"00002-seed{seed}.png")
    with Image.open(path) as image:
        got = np.asarray(image.convert("RGB"))
    assert np.array_equal(got, pipeline_pixels(expected))
    # δ changes the picture: the row without it differs
    with Image.open(os.path.join(tiny_run, "samples", "DPO", f"00002-seed{seed}.png")) as image:
        assert not np.array_equal(np.asarray(image.convert("RGB")), got)


def pipeline_pixels(x):
    """The first image of `generate`'s output as the 8-bit pixels a PNG holds."""
    return np.asarray(images.to_pil(x)[0])


def test_the_report_holds_the_judges_own_scores(tiny_run):
    """Means and win rates against the judges applied to the PNGs by hand: mean over pairs, and the share of
    prompt-seed pairs where the row scores above its baseline, ties counting half."""
    recipe = reproduce.read_recipe(TINY)
    with open(os.path.join(tiny_run, "results.json"), encoding="utf-8") as f:
        summary = json.load(f)
    names = sorted(os.listdir(os.path.join(tiny_run, "samples", "base")))
    judges = {"reward": shapes.reward, "correct": shapes.correct, "sharpness": shapes.edge_sharpness}
    prompts = [recipe["prompts"][int(n[:5])] for n in names]
    scores = {}
    for row in recipe["rows"]:
        x = torch.stack([unit(os.path.join(tiny_run, "samples", reproduce.slug(row["name"]), n)) for n in names])
        scores[row["name"]] = {j: fn(x, prompts).double() for j, fn in judges.items()}
    assert summary["pairs"] == len(names) == 6
    for entry in summary["rows"]:
        for j in judges:
            assert entry["mean"][j] == pytest.approx(scores[entry["name"]][j].mean().item(), abs=1e-9)
        baseline = {"base": None, "DPO + NPO": "DPO"}.get(entry["name"], "base")
        assert entry["baseline"] == baseline
        for j in judges if baseline else ():
            a, b = scores[entry["name"]][j], scores[baseline][j]
            wins = ((a > b).double() + 0.5 * (a == b).double()).mean().item()
            assert entry["win_rate"][j] == pytest.approx(wins, abs=1e-9)
    table = open(os.path.join(tiny_run, "table.md"), encoding="utf-8").read()
    winrates = open(os.path.join(tiny_run, "winrates.md"), encoding="utf-8").read()
    assert all(f"| {row['name']} |" in table for row in recipe["rows"])
    assert "| DPO + NPO | DPO |" in winrates and "\n| base |" not in winrates  # the baseline has none
    with Image.open(os.path.join(tiny_run, "winrates.png")) as chart:
        assert chart.format == "PNG" and chart.width > 200


def test_an_interrupted_run_continues_to_the_same_bytes(weights, tiny_run, tmp_path, monkeypatch):
    """Interrupted twice (after two prompts, then in the middle of a row), continued, it ends as `tiny_run`, one
    uninterrupted run of the same recipe: the same PNG bytes and the same report."""
    first, whole = tmp_path / "first", tiny_run
    assert run(TINY, weights, first, "--max-prompts", "2", "--sample-only") == 0  # the interrupted run
    before = {k: os.stat(p).st_mtime_ns for k, p in pngs(first).items()}
    made, loads, stop_after = [], [], [3]
    generate, load = guided.generate, pipeline.load_pipeline

    def counted(pipe, prompts, seeds, *a, **k):
        if len(made) == stop_after[0]:
            raise KeyboardInterrupt  # killed in the middle of a row
        made.extend(seeds)
        return generate(pipe, prompts, seeds, *a, **k)
    monkeypatch.setattr(guided, "generate", counted)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: (loads.append(a[0]), load(*a, **k))[1])
    with pytest.raises(KeyboardInterrupt):  # one more prompt, interrupted after three images
        run(TINY, weights, first, "--max-prompts", "3")
    assert len(pngs(first)) == 16 + 3
    stop_after[0] = None
    assert run(TINY, weights, first, "--max-prompts", "3") == 0  # continues
    assert sorted(made) == [4] * 4 + [5] * 4  # prompt 2's two seeds, in each of the 4 rows, each once
    assert all(os.stat(pngs(first)[k]).st_mtime_ns == t for k, t in before.items())
    made.clear(), loads.clear()
    assert run(TINY, weights, first, "--max-prompts", "3") == 0  # nothing left to sample: no model loads
    assert made == [] and loads == []
    a, b = pngs(first), pngs(whole)
    assert a.keys() == b.keys() and len(a) == 24
    for k in a:
        assert open(a[k], "rb").read() == open(b[k], "rb").read(), k
    for name in ("table.md", "winrates.md", "results.json", "winrates.png"):
        assert open(first / name, "rb").read() == open(os.path.join(whole, name), "rb").read(), name


def test_missing_files_are_one_sentence_naming_each(tmp_path, capsys):
    recipe = reproduce.read_recipe(os.path.join(RECIPES, "table1-sd15.json"))
    expected = reproduce.expected_files(recipe)
    os.makedirs(tmp_path / "w" / "PickScore_v1")  # one file there: it is not named
    assert run(os.path.join(RECIPES, "table1-sd15.json"), str(tmp_path / "w"), tmp_path / "R") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {len(expected) - 1} of the files")
    assert all(p in err for p in expected if p != "PickScore_v1") and "PickScore_v1 (" not in err
    assert "mhdang/dpo-sd1.5-text2image-v1" in err  # where to get it
    assert "ImageReward/med_config.json (THUDM/ImageReward" in err  # a file in a folder, and the folder's source
    assert not os.path.exists(tmp_path / "R")


def write_recipe(tmp_path, change):
    with open(TINY, encoding="utf-8") as f:
        recipe = json.load(f)
    change(recipe)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    return str(path)


def set_row(k, **values):
    return lambda r: r["rows"][k].update(values)


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(colour=1), "unknown field colour"),
    (lambda r: r.pop("steps"), "lacks the field steps"),
    (lambda r: r.update(sampler="plms"), "sampler 'plms' is not one of"),
    (lambda r: r.update(steps=0), "steps must be a whole number of at least 1"),
    (lambda r: r.update(size=60), "not a multiple of 8"),
    (lambda r: r.update(baseline="SD"), "baseline 'SD', which is not a row"),
    (set_row(1, name="base"), "two rows of the name 'base'"),
    (set_row(2, eta_model="m"), "gives both eta and eta_model; a row has one η"),
    (set_row(1, delta_model="m"), "gives both delta and delta_model; a row has one δ"),
    (set_row(0, model=None), "row 'base' names no model"),
    (set_row(1, beta=-1), "beta must be a number of at least 0"),
    (set_row(1, lora="x"), "unknown field lora"),
    (lambda r: r.update(rows=r["rows"][:1]), "at least two rows"),
    (lambda r: r.update(scorers=["shapes:reward"]), "scorers must be an object"),
])
def test_a_bad_recipe_is_one_sentence(tmp_path, capsys, weights, change, words):
    assert run(write_recipe(tmp_path, change), weights, tmp_path / "R") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err
    assert not os.path.exists(tmp_path / "R")


def test_not_json_and_bad_flags(tmp_path, capsys, weights):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"name\": ", encoding="utf-8")
    assert run(str(bad), weights, tmp_path / "R") == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert run(TINY, weights, tmp_path / "R", "--max-prompts", "0") == 2
    assert "--max-prompts must be at least 1" in capsys.readouterr().err
    assert run(TINY, str(tmp_path / "nowhere"), tmp_path / "R") == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "R")


def test_an_image_of_other_settings_is_refused(weights, tmp_path, capsys):
    out = tmp_path / "R"
    assert run(TINY, weights, out, "--max-prompts", "1", "--sample-only") == 0
    recipe = write_recipe(tmp_path, lambda r: r.update(guidance=3.0))
    assert run(recipe, weights, out, "--max-prompts", "1", "--sample-only") == 2
    err = capsys.readouterr().err
    assert "was made with other settings" in err and "base" in err


def test_a_dense_delta_goes_through_attach_npo_model(weights, tmp_path, monkeypatch, capsys):
    """A row's δ model is handed to guided.attach_npo_model (npo.py sample --npo-model) with the row's β, its
    whole-model η and α."""
    recipe = write_recipe(tmp_path, lambda r: (set_row(1, delta=None, delta_model="(embedded)", alpha=0.5, beta=0.25)(r),
                                               set_row(3, eta=None, eta_model="(embedded)", delta=None,
                                                       delta_model="(embedded)")(r)))
    calls = []
    monkeypatch.setattr(guided, "attach_npo_model", lambda pipe, *a: calls.append(a))
    assert run(recipe, weights, tmp_path / "R", "--max-prompts", "1", "--sample-only") == 0
    m = pipeline.DEFAULT_MODEL
    assert calls == [(m, 0.25, None, 0.5), (m, 1.0, m, 1.0)]  # the whole-model η goes with δ, not attached before


def test_bars_reach_their_win_rate():
    """Bar (g, s) rises plot_height · value above the axis: 100% fills the plot, the dashed line marks 50%."""
    values = [[0.75, 0.25], [1.0, 0.5]]
    chart = np.asarray(reproduce.bar_chart(["a vs b", "c vs b"], ["x", "y"], values, "t"))
    c = reproduce.CHART
    bottom = c["top"] + c["plot_height"]
    y50 = bottom - c["plot_height"] // 2
    for g, group in enumerate(values):
        for s, value in enumerate(group):
            x = c["left"] + c["gap"] // 2 + g * (2 * c["bar"] + c["gap"]) + s * c["bar"] + c["bar"] // 2
            colored = np.nonzero((chart[:, x] == reproduce.COLORS[s]).all(axis=1))[0]
            top = bottom - round(c["plot_height"] * value)
            if top == y50 and (chart[y50, x] == 0).all():  # the top of a 50% bar lies under a dash of the line
                top += 1
            assert colored.min() == top and colored.max() == bottom - 1
    assert (chart[y50, c["left"]:c["left"] + 4] == 0).all()  # a dash of the 50% line


def test_the_shipped_recipes_are_the_papers_tables():
    """Table 1's and table 2's rows (those the paper tested with official weights) and settings (sec. 4.2; the
    authors' gen.py / gen_xl.py), and a source for every file each expects."""
    t1 = reproduce.read_recipe(os.path.join(RECIPES, "table1-sd15.json"))
    t2 = reproduce.read_recipe(os.path.join(RECIPES, "table2-sdxl.json"))
    assert [r["name"] for r in t1["rows"]] == [
        "SD-1.5", "DiffDPO", "DiffSPO", "SD-1.5 + NPO", "DiffSPO + NPO", "DiffDPO + NPO (reg = 500)",
        "DiffDPO + NPO (reg = 1000)", "DreamShaper", "DreamShaper + NPO (α = 1.0)", "DreamShaper + NPO (α = 0.6)"]
    assert [r["name"] for r in t2["rows"]] == ["SDXL", "DiffDPO", "DiffSPO", "SDXL + NPO", "DiffDPO + NPO",
                                               "DiffSPO + NPO"]
    assert (t1["sampler"], t1["steps"], t1["guidance"], t1["size"]) == ("dpmpp-2m", 25, 7.5, 512)
    assert (t2["sampler"], t2["steps"], t2["guidance"], t2["size"]) == ("dpmpp-2m", 25, 5.0, 1024)
    assert [r["alpha"] for r in t1["rows"][-2:]] == [1.0, 0.6]
    for recipe in (t1, t2):
        assert list(recipe["scorers"]) == ["PickScore", "HPSv2", "ImageReward", "Aesthetic"]
        assert all(reproduce.source(recipe, p) for p in reproduce.expected_files(recipe))
        assert recipe["prompts"] == "pickapic/test_unique.parquet"


def test_prompts_come_from_the_parquet_file(tmp_path):
    """A Pick-a-Pic parquet gives its unique captions in order (data.read_prompts), cut at max_prompts."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", "a bird"]}), tmp_path / "t.parquet")
    recipe = {"prompts": "t.parquet", "max_prompts": None}
    assert reproduce.read_prompts(recipe, str(tmp_path)) == ["a cat", "a dog", "a bird"]
    assert reproduce.read_prompts(recipe, str(tmp_path), 2) == ["a cat", "a dog"]
    with pytest.raises(UserError, match="list of prompts"):
        reproduce.read_prompts({"prompts": [], "max_prompts": None}, str(tmp_path))


def test_a_model_as_eta_samples_as_the_pipeline_does(weights, tmp_path):
    """A row with eta_model (here the embedded model itself as θ_ft) and a δ LoRA at α = 0.6: its image is the
    pipeline's with guided.attach_eta_model at that α, called directly."""
    recipe = write_recipe(tmp_path, set_row(3, eta=None, eta_model="(embedded)", alpha=0.6))
    assert run(recipe, weights, tmp_path / "R", "--max-prompts", "1", "--sample-only") == 0
    pipe = pipeline.load_pipeline(pipeline.DEFAULT_MODEL)
    guided.load_offset(pipe, [(os.path.join(weights, "npo.safetensors"), 1.0)], "delta")
    guided.attach_eta_model(pipe, pipeline.DEFAULT_MODEL, 0.6)
    r = reproduce.read_recipe(recipe)
    expected = guided.generate(pipe, [r["prompts"][0]], [1], steps=r["steps"], guidance=r["guidance"], alpha=0.6,
                                 beta=1.0, sampler=r["sampler"])
    with Image.open(tmp_path / "R" / "samples" / "DPO_NPO" / "00000-seed1.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pipeline_pixels(expected))
        assert "NPO eta model: (embedded)" in image.text["parameters"]
