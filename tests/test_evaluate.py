"""`npo.py evaluate` on synthetic folders: PNGs with A1111 `parameters`, scored by a reward of known values
(`rewards:brightness` of flat grey images is grey / 255), so every mean, interval, win rate and pairing is known."""
import json
import math
import os
import random

import pytest
from PIL import Image

from npo import evaluate
from npo import images
import npo
from npo import sample
from npo import rewards
from npo.checkpoint import UserError
from conftest import make_clip_dir

PROMPTS = ["a red circle", "a blue square", "a red circle", "two cats, one dog\nand a newline"]
SEEDS = [0, 1, 5, 2]  # "a red circle" twice, at two seeds: a pair is (prompt, seed), not the prompt


def parameters(prompt, seed):
    """The text `npo.py sample` writes (its own function, with the settings of a plain run from the real parser)."""
    args = npo.build_parser().parse_args(["sample", "--prompt", prompt, "--negative-prompt", "blurry"])
    job = dict(prompt=prompt, negative="blurry", seed=seed, alpha=1.0, beta=1.0)
    return sample.a1111_parameters(args, job, (32, 32))


def write_folder(folder, greys, shuffle_names=None):
    """One flat grey PNG per (prompt, seed), grey level greys[i]; file names in another order when `shuffle_names`
    (a seed), so that pairing can only work through the parameters."""
    os.makedirs(folder, exist_ok=True)
    order = list(range(len(greys)))
    if shuffle_names is not None:
        random.Random(shuffle_names).shuffle(order)
    for name_index, i in zip(order, range(len(greys))):
        picture = Image.new("RGB", (16, 16), (greys[i],) * 3)
        images.save_png(picture, os.path.join(folder, f"{name_index:05d}.png"), parameters(PROMPTS[i], SEEDS[i]))
    return str(folder)


def expected_interval(values):
    n, mean = len(values), sum(values) / len(values)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * s / math.sqrt(n)


def test_means_win_rates_and_pairing(tmp_path):
    a = write_folder(tmp_path / "a", [10, 20, 30, 40])
    b = write_folder(tmp_path / "b", [20, 10, 30, 50], shuffle_names=1)
    c = write_folder(tmp_path / "c", [0, 0, 0, 255], shuffle_names=2)
    results = evaluate.evaluate([a, b, c], ["rewards:brightness"], str(tmp_path / "report"), batch_size=3)
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved == results and saved["pairs"] == 4 and list(saved["scorers"]) == ["rewards:brightness"]
    r = saved["scorers"]["rewards:brightness"]
    assert set(r) == {"mean", "ci95", "win_rate", "win_rate_ci95"} and list(r["mean"]) == [a, b, c]
    for folder, greys in ((a, [10, 20, 30, 40]), (b, [20, 10, 30, 50]), (c, [0, 0, 0, 255])):
        mean, half = expected_interval([g / 255 for g in greys])
        assert r["mean"][folder] == pytest.approx(mean, rel=1e-6) and r["ci95"][folder] == pytest.approx(half, rel=1e-5)
    # a vs b, pair by pair: 10<20, 20>10, 30=30, 40<50 -> (0 + 1 + 0.5 + 0) / 4
    assert r["win_rate"][a][b] == 0.375 and r["win_rate"][b][a] == 0.625
    assert r["win_rate_ci95"][a][b] == pytest.approx(expected_interval([0, 1, 0.5, 0])[1])
    assert r["win_rate"][a][c] == 0.75 and r["win_rate"][c][b] == 0.25 and a not in r["win_rate"][a]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| row beats column |" in md and f"| `{a}` | — | 37.5 ± " in md
    assert f"| `{b}` | {27.5 / 255:.4g} ± " in md


def test_prompt_and_seed_from_parameters():
    assert evaluate.prompt_and_seed(parameters("a cat\non two lines", 42), "x") == ("a cat\non two lines", 42)
    a1111 = "masterpiece, a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: -3, Size: 512x512"
    assert evaluate.prompt_and_seed(a1111, "x") == ("masterpiece, a cat", -3)
    assert evaluate.prompt_and_seed("a cat\nSteps: 20, Seed: 7", "x") == ("a cat", 7)  # no negative prompt line
    with pytest.raises(UserError, match="no 'Seed: N'"):
        evaluate.prompt_and_seed("a cat\nSteps: 20, Subseed: 7", "x")


def test_missing_partner_is_an_error_naming_it(tmp_path):
    a = write_folder(tmp_path / "a", [10, 20, 30, 40])
    b = write_folder(tmp_path / "b", [20, 10, 30, 50])
    os.remove(os.path.join(b, "00001.png"))  # the partner of a/00001.png (a blue square, seed 1)
    with pytest.raises(UserError, match=r"a/00001.png \(prompt 'a blue square', seed 1\) has no partner in .*b;"):
        evaluate.evaluate([a, b], ["rewards:brightness"], str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()  # nothing written, nor even the folder
    c = write_folder(tmp_path / "c", [1, 2, 3, 4])
    images.save_png(Image.new("RGB", (16, 16)), os.path.join(c, "extra.png"), parameters("a green star", 9))
    with pytest.raises(UserError, match=r"c/extra.png .*has no partner in .*a;"):  # the other direction too
        evaluate.evaluate([a, c], ["rewards:brightness"], str(tmp_path / "report"))


def test_bad_folders_and_specs(tmp_path):
    a = write_folder(tmp_path / "a", [10, 20, 30, 40])
    b = write_folder(tmp_path / "b", [10, 20, 30, 40])
    report = str(tmp_path / "report")
    for folders, specs, words in (([a], ["rewards:brightness"], "two or more different folders"),
                                  ([a, a], ["rewards:brightness"], "two or more different folders"),
                                  ([a, str(tmp_path / "nope")], ["rewards:brightness"], "is not a folder"),
                                  ([a, b], [], "at least one --scorer"),
                                  ([a, b], ["no_such_module_x:f"], "cannot import"),
                                  ([a, b], ["pickscore:" + str(tmp_path / "none")], "does not exist"),
                                  ([a, b], ["rewards:brightness", "aesthetic:" + str(tmp_path / "clip")], "CLIP_PATH,MLP"),
                                  ([a, b], ["rewards:brightness", "hpsv2:"], r"\(no path\) does not exist")):
        with pytest.raises(UserError, match=words):
            evaluate.evaluate(folders, specs, report)
    assert not os.path.exists(report)  # every spec was checked before anything was scored or written
    Image.new("RGB", (8, 8)).save(os.path.join(b, "plain.png"))  # no parameters text
    with pytest.raises(UserError, match="plain.png has no 'parameters'"):
        evaluate.evaluate([a, b], ["rewards:brightness"], report)
    os.remove(os.path.join(b, "plain.png"))
    images.save_png(Image.new("RGB", (8, 8)), os.path.join(b, "again.png"), parameters(PROMPTS[1], SEEDS[1]))
    with pytest.raises(UserError, match="00001.png and .*again.png have the same prompt and seed"):
        evaluate.evaluate([a, b], ["rewards:brightness"], report)


def test_cli(tmp_path, capsys):
    a = write_folder(tmp_path / "a", [10, 20, 30, 40])
    b = write_folder(tmp_path / "b", [11, 20, 29, 41])
    report = str(tmp_path / "report")
    assert npo.main(["evaluate", a, b, "--scorer", "rewards:brightness", "--scorer", "rewards:saturation",
                     "--out", report]) == 0
    results = json.loads(open(os.path.join(report, "results.json")).read())
    assert list(results["scorers"]) == ["rewards:brightness", "rewards:saturation"]
    assert results["scorers"]["rewards:saturation"]["win_rate"][a][b] == 0.5  # grey: saturation 0 everywhere, ties
    assert "scoring [" in capsys.readouterr().err  # the progress bar
    os.remove(os.path.join(b, "00002.png"))
    assert npo.main(["evaluate", a, b, "--scorer", "rewards:brightness", "--out", report]) == 2
    err = capsys.readouterr().err
    assert "00002.png" in err and "Traceback" not in err


def test_cli_misspelt_scorer(tmp_path, capsys):
    a, b = write_folder(tmp_path / "a", [10, 20, 30, 40]), write_folder(tmp_path / "b", [11, 20, 29, 41])
    assert npo.main(["evaluate", a, b, "--scorer", "hps:/nope", "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --scorer 'hps:/nope'") and err.count("\n") == 1
    assert "pickscore, hpsv2, aesthetic, clipscore" in err and "hpsv2:/nope." in err and "pickscore:hps" not in err
    assert not os.path.exists(tmp_path / "report")


def test_learned_scorer_scores_the_pil_images(tmp_path):
    folder = tmp_path / "clip"
    make_clip_dir(folder, seed=3)
    a = write_folder(tmp_path / "a", [10, 20, 30, 40])
    b = write_folder(tmp_path / "b", [40, 30, 20, 10])
    spec = f"pickscore:{folder}"
    results = evaluate.evaluate([a, b], [spec], str(tmp_path / "report"), batch_size=2)
    scorer = rewards.load(spec)
    keys, paths = evaluate.pair([a, b])
    direct = scorer.score_pil([Image.open(p) for p in paths[a]], [prompt for prompt, _ in keys]).double()
    assert results["scorers"][spec]["mean"][a] == pytest.approx(direct.mean().item(), rel=1e-5)


def test_pairs_what_sample_numbered_on(tiny_model, tmp_path):
    """Folders that several `sample` runs wrote into, numbered on (NNNNN-seedS.png), pair by prompt and seed
    whatever their numbers; a second run at the same seeds into one folder is refused in one sentence."""
    def sample(out, *flags):
        assert npo.main(["sample", "--model", tiny_model[0], "--steps", "2", "--height", "32", "--width", "32",
                         *flags, "--out", str(out)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    sample(a, "--seed", "1")
    sample(a, "--seed", "0")
    sample(b, "--n", "2")
    assert sorted(os.listdir(a)) == ["00000-seed1.png", "00001-seed0.png"]
    keys, paths = evaluate.pair([str(a), str(b)])
    assert keys == [("a red circle", 0), ("a red circle", 1)]
    assert [os.path.basename(p) for p in paths[str(a)]] == ["00001-seed0.png", "00000-seed1.png"]
    assert evaluate.evaluate([str(a), str(b)], ["rewards:brightness"], str(tmp_path / "report"))["pairs"] == 2
    sample(a, "--seed", "0")  # the same prompt and seed again: 00002-seed0.png beside 00001-seed0.png
    with pytest.raises(UserError, match="00001-seed0.png and .*00002-seed0.png have the same prompt and seed, so "
                                        "neither pairs uniquely .two sample runs with the same seeds"):
        evaluate.pair([str(a), str(b)])
