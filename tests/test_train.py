"""`npo.py train`: one DPO step against a diffusers + peft recipe on the same weights, the NPO swap, resuming after
Ctrl-C or SIGKILL bit for bit, two data-parallel processes against one, and the bad-input contract."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from npo import checkpoint
from npo import data
from npo import logplot
from npo import lora
from npo import losses
from npo import machinery
import npo
from npo import pipeline
from npo import runs
from npo import train
from npo import trainflags
from conftest import ROOT, diffusers_pipeline, make_model_dir, record_calls, write_random_pairs

# tiny model: the VAE downsamples by 2, so 16 px images are 8x8 latents, the UNet's sample size
FAST = ["--resolution", "16", "--log-every", "1", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A JSONL dataset of 6 pairs of random images (24x20, so the resize and crop do something)."""
    return write_random_pairs(tmp_path_factory.mktemp("pairs"), 6, seed=0)


def run(model, pairs, out, *flags):
    """`npo.py train` in this process; returns its exit code."""
    return npo.main(["train", "--model", model, "--data", pairs, "--out", str(out), *FAST, *flags])


def command(model, pairs, out, *flags):
    return [sys.executable, os.path.join(ROOT, "npo.py"), "train", "--model", model, "--data", pairs, "--out", str(out),
            *FAST, *flags]


def read_lora(path):
    return checkpoint.read_safetensors(str(path))


def logged(out):
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [line for line in lines if "step" in line and "loss" in line]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def random_lora(model, path, seed=1):
    pipe = pipeline.load_pipeline(model)
    lora.add_offset(pipe.unet, "eta", rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters(pipe.unet, "eta"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_lora(pipe.unet, "eta", str(path), role="eta")
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# The step against a reference.

@pytest.mark.parametrize("swap", [False, True])
def test_first_step_matches_diffusers_dpo_recipe(tiny_model, pairs, tmp_path, swap):
    """The losses our loop logs for its first step equal a Diffusion-DPO step written with diffusers' UNet, VAE and
    scheduler and peft's LoRA (reference = adapters disabled), on the same example, noise and timestep."""
    model, refs = tiny_model
    init = random_lora(model, tmp_path / "init.safetensors")  # a nonzero offset, so θ+η differs from θ
    flags = ["--init-lora", init, "--steps", "1", "--beta-dpo", "20"] + ["--npo"] * swap
    assert run(model, pairs, tmp_path / "run", *flags) == 0
    ours = logged(tmp_path / "run")[0]

    from diffusers import DDPMScheduler
    pipe = diffusers_pipeline(model, refs)
    pipe.load_lora_weights(init)
    scheduler = DDPMScheduler.from_pretrained(os.path.join(model, "scheduler"))
    prompts, x_w, x_l = next(data.batches(data.open_pairs(pairs), 1, seed=0, resolution=16))
    g = machinery.example_generator(0, 0)  # example 0's draws, in the documented order: t, ε, posterior noises
    t = torch.randint(0, 1000, (1,), generator=g)
    eps = torch.randn((1, 4, 8, 8), generator=g)
    n = torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        posterior = pipe.vae.encode(torch.cat([x_w, x_l])).latent_dist
        z = (posterior.mean + posterior.std * n) * pipe.vae.config.scaling_factor
        if swap:
            z = z.flip(0)  # eq. 8: the loser's latent is trained as the winner's
        z_t = scheduler.add_noise(z, eps.repeat(2, 1, 1, 1), t.repeat(2))
        context, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        model_pred = pipe.unet(z_t, t.repeat(2), context.repeat(2, 1, 1)).sample
        pipe.unet.disable_lora()
        ref_pred = pipe.unet(z_t, t.repeat(2), context.repeat(2, 1, 1)).sample
    mse = ((model_pred - eps) ** 2).mean(dim=(1, 2, 3))
    ref_mse = ((ref_pred - eps) ** 2).mean(dim=(1, 2, 3))
    loss = -F.logsigmoid(-20 * ((mse[0] - mse[1]) - (ref_mse[0] - ref_mse[1])))
    expected = dict(loss=loss, mse_w=mse[0], mse_l=mse[1], ref_mse_w=ref_mse[0], ref_mse_l=ref_mse[1])
    for k, v in expected.items():
        assert ours[k] == pytest.approx(v.item(), rel=1e-4), k
    assert 0.05 < ours["loss"] < 5  # the example is in the sensitive range of the loss, not saturated


def test_zero_offset_starts_at_log_2_and_the_swap_mirrors_the_first_update(tiny_model, pairs, tmp_path):
    """With lora_up = 0 the model equals the reference (loss log 2). Swapping the pairs negates ∂L/∂θ there, so the
    first AdamW update of the NPO run is the DPO run's update mirrored (lora_down gets no gradient at step 1)."""
    model, _ = tiny_model
    assert run(model, pairs, tmp_path / "dpo", "--steps", "1") == 0
    assert run(model, pairs, tmp_path / "npo", "--steps", "1", "--npo") == 0
    for out in ("dpo", "npo"):
        first = logged(tmp_path / out)[0]
        assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
        assert first["implicit_acc"] == 0.5 and first["reward_margin"] == 0
    eta, delta = read_lora(tmp_path / "dpo" / "lora.safetensors"), read_lora(tmp_path / "npo" / "lora.safetensors")
    lr = 1e-3
    for k in eta:
        if "lora_up" in k:  # Adam's first step: lr · g / (|g| + ε), odd in g
            assert eta[k].abs().max() > 0.5 * lr, k
            torch.testing.assert_close(delta[k], -eta[k], rtol=0, atol=0.05 * lr)
        else:
            assert torch.equal(delta[k], eta[k]), k


def test_result_loads_in_diffusers_and_in_npo_sample(tiny_model, pairs, tmp_path):
    model, refs = tiny_model
    assert run(model, pairs, tmp_path / "run", "--steps", "2", "--npo") == 0
    path = str(tmp_path / "run" / "lora.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_beta_dpo"] == "500" and meta["npo_steps"] == "2"
    assert meta["npo_pairs_swapped"] == "true"

    # diffusers' loader and ours give the same UNet output with the trained offset
    pipe = diffusers_pipeline(model, refs)
    pipe.load_lora_weights(path)
    ours = pipeline.load_pipeline(model)
    lora.load_lora(ours.unet, path, "delta")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, t, ctx), pipe.unet(x, t, ctx).sample, rtol=1e-4, atol=1e-5)
    assert npo.main(["sample", "--model", model, "--npo", path, "--steps", "2", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "image.png")]) == 0


def test_sft_and_gradient_checkpointing(tiny_model, pairs, tmp_path):
    """Gradient checkpointing recomputes the same activations: the same training, to float noise."""
    model, _ = tiny_model
    assert run(model, pairs, tmp_path / "plain", "--steps", "2", "--method", "sft") == 0
    assert run(model, pairs, tmp_path / "ckpt", "--steps", "2", "--method", "sft", "--gradient-checkpointing") == 0
    plain, ckpt = read_lora(tmp_path / "plain" / "lora.safetensors"), read_lora(tmp_path / "ckpt" / "lora.safetensors")
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-5)
    sft = logged(tmp_path / "plain")[1]
    assert sft["loss"] == pytest.approx(sft["mse_w"], rel=1e-5)  # SFT is the denoising loss of the preferred image


def test_cache_latents_encodes_each_image_once_per_flip(tiny_model, pairs, tmp_path, monkeypatch):
    model, _ = tiny_model
    counts = []

    def counted(x):
        counts[-1] += len(x)
    record_calls(monkeypatch, "vae", "encode", counted)
    results = {}
    for name, extra in (("plain", []), ("cached", ["--cache-latents"])):
        counts.append(0)
        train.train(trainflags.parse_args(["--model", model, "--data", pairs, "--out", str(tmp_path / name),
                                     *FAST, "--steps", "18", *extra]))
        results[name] = read_lora(tmp_path / name / "lora.safetensors")
    assert counts[0] == 18 * 2  # three epochs of six pairs, two images each
    assert counts[1] <= 6 * 2 * 2  # at most both flips of each image
    for k in results["plain"]:  # encoding one image or two at a time differs only by float rounding
        torch.testing.assert_close(results["cached"][k], results["plain"][k], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Nothing is lost: resume, SIGKILL, Ctrl-C, a non-finite loss.

def test_resumed_run_ends_with_the_same_lora(tiny_model, pairs, tmp_path):
    model, _ = tiny_model
    flags = ["--checkpoint-every", "2", "--grad-accum", "2", "--caption-dropout", "0.3", "--random-crop"]
    assert run(model, pairs, tmp_path / "whole", "--steps", "5", *flags) == 0
    assert run(model, pairs, tmp_path / "split", "--steps", "3", *flags) == 0
    assert run(model, pairs, tmp_path / "split", "--steps", "5", "--resume", "latest", *flags) == 0
    assert_same(read_lora(tmp_path / "split" / "lora.safetensors"), read_lora(tmp_path / "whole" / "lora.safetensors"))
    assert [line["loss"] for line in logged(tmp_path / "split")] == [line["loss"] for line in logged(tmp_path / "whole")]
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["step-000004", "step-000005"]  # the last 2 kept


def test_resume_needs_only_the_run_folder(tiny_model, pairs, tmp_path, monkeypatch, capsys):
    """A run saves its settings (OUT/settings.json, paths absolute): `npo.py train --resume OUT` alone, from another
    folder, continues it bit for bit; a flag that would make it another run is refused in one sentence."""
    model, _ = tiny_model
    flags = ["--steps", "5", "--checkpoint-every", "1", "--grad-accum", "2", "--caption-dropout", "0.3", "--random-crop"]
    assert run(model, pairs, tmp_path / "whole", *flags) == 0
    calls, dpo_loss = [], losses.dpo_loss

    def failing(*args):  # step 4 (its 7th micro-step) fails, after the checkpoint of step 3
        calls.append(1)
        loss, metrics = dpo_loss(*args)
        return (loss * float("nan") if len(calls) == 7 else loss), metrics
    monkeypatch.setattr(losses, "dpo_loss", failing)
    out = tmp_path / "split"
    assert run(model, pairs, out, *flags) == 2
    monkeypatch.setattr(losses, "dpo_loss", dpo_loss)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["steps"] == 5 and settings["random_crop"] and settings["data"] == os.path.abspath(pairs)
    monkeypatch.chdir(tmp_path)
    assert npo.main(["train", "--resume", str(out)]) == 0
    assert_same(read_lora(out / "lora.safetensors"), read_lora(tmp_path / "whole" / "lora.safetensors"))
    assert [line["loss"] for line in logged(out)] == [line["loss"] for line in logged(tmp_path / "whole")]
    capsys.readouterr()
    assert npo.main(["train", "--resume", str(out / "checkpoints" / "step-000005"), "--npo"]) == 2
    err = capsys.readouterr().err
    assert "not --method dpo --npo" in err and err.count("\n") == 1
    assert npo.main(["train", "--resume", "latest"]) == 2
    assert "pass --out" in capsys.readouterr().err


def test_help_shows_every_default(capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    trainflags.add_arguments(parser)
    hidden = [a.option_strings[0] for a in parser._actions if a.dest != "help" and "default" not in a.help
              and "required" not in a.help]
    assert hidden == []
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    with pytest.raises(SystemExit):
        npo.main(["train", "--help"])
    text = capsys.readouterr().out
    assert ("AdamW learning rate, constant after the warmup (default: 5e-06; --method ddpo: 0.0003; --method spo: 6e-05; "
            "--method spo on SDXL: 1e-05)") in text
    assert "DDIM steps of each training sample (default: 20; --method ddpo: 50)" in text
    assert "CFG scale of the training samples (default: 7.5; --method ddpo: 5; --method spo: 5)" in text
    assert "(default: 500)" in text and "(default: to_q,to_k,to_v,to_out.0)" in text and "(default: 2000)" in text


def test_the_log_is_drawn_beside_it(tiny_model, pairs, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "run"
    assert run(model, pairs, out, "--steps", "3", "--lr", "1e-2") == 0
    with Image.open(out / "log.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (logplot.WIDTH, 3 * logplot.PANEL_HEIGHT)  # loss, implicit accuracy, reward margin
        colors = {c for _, c in picture.convert("RGB").getcolors(1 << 20)}
    assert set(logplot.COLORS[:3]) <= colors  # each panel's line


def wait_for(path, process, timeout=120):
    start = time.time()
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1]
        assert time.time() - start < timeout
        time.sleep(0.01)


def test_sigkill_in_the_middle_then_resume(tiny_model, pairs, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "killed"
    flags = ["--checkpoint-every", "1", "--keep-checkpoints", "0"]
    process = subprocess.Popen(command(model, pairs, out, "--steps", "100000", *flags), stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step-000003", process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    saved = runs.list_checkpoints(str(out / "checkpoints"))
    steps = int(saved[-1][-6:]) + 2
    assert run(model, pairs, out, "--steps", str(steps), "--resume", "latest", *flags) == 0
    assert run(model, pairs, tmp_path / "whole", "--steps", str(steps)) == 0
    assert_same(read_lora(out / "lora.safetensors"), read_lora(tmp_path / "whole" / "lora.safetensors"))


def test_ctrl_c_saves_a_checkpoint_and_exits(tiny_model, pairs, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "interrupted"
    process = subprocess.Popen(command(model, pairs, out, "--steps", "100000", "--checkpoint-every", "1000"),
                               stderr=subprocess.PIPE, text=True)
    wait_for(out / "log.jsonl", process)
    while not logged(out):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume latest" in err and "Traceback" not in err
    saved = runs.list_checkpoints(str(out / "checkpoints"))
    assert len(saved) == 1 and os.path.isfile(os.path.join(saved[0], "lora.safetensors"))
    assert not os.path.exists(out / "lora.safetensors")  # the run did not finish, so no result yet


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, pairs, tmp_path, monkeypatch, capsys):
    model, _ = tiny_model
    calls = []
    dpo_loss = losses.dpo_loss

    def diverging(*args):
        calls.append(1)
        loss, metrics = dpo_loss(*args)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics
    monkeypatch.setattr(losses, "dpo_loss", diverging)
    out = tmp_path / "run"
    assert run(model, pairs, out, "--steps", "5", "--checkpoint-every", "1") == 2
    err = capsys.readouterr().err
    assert "at step 3" in err and "step-000002" in err and "--resume latest" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001", "step-000002"]
    assert not os.path.exists(out / "lora.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Data parallel: two processes with batch 1 compute what one process computes with batch 2.

def test_two_gloo_processes_equal_one_with_the_combined_batch(tiny_model, pairs, tmp_path):
    model, _ = tiny_model
    # β = 5: at β = 500 the loss amplifies the float rounding of the MSEs (~1e-7) five-hundredfold
    flags = ["--steps", "3", "--lr", "1e-4", "--beta-dpo", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *command(model, pairs, tmp_path / "ddp", "--batch-size", "1", *flags)[1:]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert run(model, pairs, tmp_path / "one", "--batch-size", "2", *flags) == 0
    for a, b in zip(logged(tmp_path / "ddp"), logged(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["mse_w"] == pytest.approx(b["mse_w"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ddp, one = read_lora(tmp_path / "ddp" / "lora.safetensors"), read_lora(tmp_path / "one" / "lora.safetensors")
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=5e-6)  # 5% of one Adam step of lr 1e-4


# ----------------------------------------------------------------------------------------------------------
# Bad input: a sentence, exit 2, nothing written.

def test_bad_data_paths_and_rows(tiny_model, pairs, tmp_path, capsys):
    model, _ = tiny_model
    out = tmp_path / "out"
    assert run(model, str(tmp_path / "missing.jsonl"), out) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()

    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in open(pairs)]
    rows[2]["chosen"] = "nowhere.png"
    folder = os.path.dirname(pairs)
    bad.write_text("\n".join(json.dumps(dict(r, chosen=os.path.join(folder, r["chosen"]),
                                             rejected=os.path.join(folder, r["rejected"]))) for r in rows))
    assert run(model, str(bad), out) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "--skip-bad-rows" in err and "Traceback" not in err and not out.exists()
    assert run(model, str(bad), out, "--steps", "1", "--skip-bad-rows") == 0
    assert "skipped 1 bad rows" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run(model, str(empty), tmp_path / "out2") == 2
    assert not (tmp_path / "out2").exists()


def test_a_run_that_fails_leaves_nothing_behind(tiny_model, tmp_path, capsys):
    """A truncated image (its header reads, its pixels do not) stops the run in the middle of its steps, after log
    lines were written: a fresh run leaves no folder, a resumed one leaves its folder as it found it, log included."""
    model, _ = tiny_model
    folder = tmp_path / "data"
    folder.mkdir()
    pairs = write_random_pairs(folder, 6, seed=3)
    out = tmp_path / "resumed"
    assert run(model, pairs, out, "--steps", "2") == 0
    found = {name: (out / name).read_bytes() for name in ("log.jsonl", "lora.safetensors")}
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    image = (folder / "4l.png").read_bytes()
    (folder / "4l.png").write_bytes(image[:len(image) // 2])
    capsys.readouterr()
    assert run(model, pairs, tmp_path / "fresh", "--steps", "12", "--checkpoint-every", "100") == 2
    assert "line 5 of" in capsys.readouterr().err and not (tmp_path / "fresh").exists()
    assert run(model, pairs, out, "--steps", "14", "--checkpoint-every", "100", "--resume", "latest") == 2
    assert "line 5 of" in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    assert {name: (out / name).read_bytes() for name in found} == found


def test_parquet_without_the_columns(tiny_model, tmp_path, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    model, _ = tiny_model
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"caption": ["a"], "image": [b"x"]}), path)
    assert npo.main(["train", "--model", model, "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "column" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bad_output_folders_and_resumes(tiny_model, pairs, tmp_path, capsys):
    model, _ = tiny_model
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert run(model, pairs, blocker / "out") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err

    out = tmp_path / "run"
    assert run(model, pairs, out, "--steps", "1") == 0
    capsys.readouterr()
    assert run(model, pairs, out, "--steps", "2") == 2  # an existing run is never overwritten
    assert "--resume latest" in capsys.readouterr().err
    assert run(model, pairs, out, "--steps", "2", "--resume", str(tmp_path)) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert run(model, pairs, out, "--steps", "2", "--resume", "latest", "--rank", "4") == 2
    assert "rank 8" in capsys.readouterr().err
    assert run(model, pairs, out, "--steps", "2", "--resume", "latest", "--npo") == 2
    assert "--npo" in capsys.readouterr().err

    other = str(tmp_path / "other-model")
    make_model_dir(other, seed=5)
    assert run(other, pairs, out, "--steps", "2", "--resume", "latest") == 2
    assert "other weights" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001"]  # the refused resumes changed nothing

    for flags in (["--resolution", "12"], ["--lr", "0"], ["--caption-dropout", "2"], ["--steps", "0"]):
        assert run(model, pairs, tmp_path / "never", *flags) == 2
        assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("method, flags, words", [
    ("reward", ["--data", "x.jsonl"], "--data does nothing with --method reward"),
    ("reward", ["--cache-latents"], "--cache-latents does nothing with --method reward"),
    ("reward", ["--beta-dpo", "100"], "--beta-dpo does nothing with --method reward"),
    ("reward", ["--random-crop"], "--random-crop does nothing"),
    ("dpo", ["--reward", "rewards:brightness"], "--reward does nothing with --method dpo"),
    ("dpo", ["--sample-steps", "4"], "--sample-steps does nothing"),
    ("dpo", ["--guidance", "5"], "--guidance does nothing"),
    ("sft", ["--beta-dpo", "100"], "--beta-dpo does nothing with --method sft"),
    ("reward", ["--alpha", "0.5"], "this run has no η there"),
    ("reward", ["--beta", "0.5"], "only --joint trains"),
    ("ddpo", ["--grad-steps", "2"], "--grad-steps does nothing with --method ddpo"),
])
def test_flags_that_would_do_nothing_are_refused(tiny_model, pairs, tmp_path, capsys, method, flags, words):
    model, _ = tiny_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    needed = ["--data", pairs] if method in ("dpo", "sft") else ["--reward", "rewards:brightness", "--prompts-file",
                                                                 str(prompts)]
    argv = ["train", "--model", model, "--method", method, "--out", str(tmp_path / "o"), *needed, *flags]
    assert npo.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_device_that_does_not_exist_is_named(tiny_model, pairs, tmp_path, capsys, monkeypatch):
    model, _ = tiny_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, as CI sees it
    assert run(model, pairs, tmp_path / "o", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "needs CUDA, and this machine has none" in err and "--device cpu" in err and "safetensors" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run(model, pairs, tmp_path / "o", "--device", "cuda:5") == 2
    assert "has 2 CUDA device(s), cuda:0 to cuda:1" in capsys.readouterr().err
    assert run(model, pairs, tmp_path / "o", "--device", "gpu") == 2
    assert "is not a device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_running_out_of_memory_while_loading_is_not_a_damaged_file(tiny_model, pairs, tmp_path, capsys, monkeypatch):
    model, _ = tiny_model

    def no_memory(path, device="cpu"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(checkpoint, "load_file", no_memory)
    assert run(model, pairs, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "ran out of CPU memory while loading" in err and "--dtype bfloat16" in err and "safetensors" not in err
    assert not (tmp_path / "o").exists()


def test_dataloader_workers_are_shut_down(tiny_model, pairs, tmp_path):
    import multiprocessing
    model, _ = tiny_model
    assert run(model, pairs, tmp_path / "o", "--steps", "2", "--num-workers", "2") == 0
    assert multiprocessing.active_children() == []


def test_bf16_autocast_first_step_matches_fp32(tiny_model, pairs, tmp_path):
    """--mixed-precision bf16 runs the base in bfloat16: the first step's MSEs equal float32's within bfloat16's
    precision (measured here: at most 0.07% relative; bound 0.5%), from a non-zero offset so that d_θ ≠ d_ref. The
    DPO loss multiplies the MSE differences by β = 500, so it is compared in absolute terms (bound 0.02)."""
    model, _ = tiny_model
    init = random_lora(model, tmp_path / "init.safetensors")
    for mode in ("no", "bf16"):
        assert run(model, pairs, tmp_path / mode, "--steps", "1", "--init-lora", init, "--mixed-precision", mode) == 0
    fp32, bf16 = logged(tmp_path / "no")[0], logged(tmp_path / "bf16")[0]
    for key in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
        assert bf16[key] == pytest.approx(fp32[key], rel=5e-3), key
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=2e-2)
    assert fp32["mse_w"] != bf16["mse_w"]  # autocast did run the base in bfloat16


def test_fp16_overflow_skips_the_step_and_keeps_lora_and_optimizer(tiny_model, pairs, tmp_path, monkeypatch):
    model, _ = tiny_model
    init = random_lora(model, tmp_path / "init.safetensors")
    dpo_loss = losses.dpo_loss

    def overflowing(*args, **kwargs):  # the scaled loss (× 2^16) overflows float32: every gradient is inf
        loss, metrics = dpo_loss(*args, **kwargs)
        return loss * 1e36, metrics
    monkeypatch.setattr(losses, "dpo_loss", overflowing)
    assert run(model, pairs, tmp_path / "o", "--steps", "1", "--init-lora", init, "--mixed-precision", "fp16") == 0
    assert logged(tmp_path / "o")[0]["skipped"] == 1.0
    before, after = read_lora(init), read_lora(tmp_path / "o" / "lora.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    state = torch.load(tmp_path / "o" / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert state["optimizer"]["state"] == {}  # AdamW never stepped: no moments were formed from inf gradients
    monkeypatch.setattr(losses, "dpo_loss", dpo_loss)
    scale = state["scaler"]["scale"]
    assert scale == 2.0 ** 15  # GradScaler starts at 2^16 and halves at an overflow; the checkpoint keeps it
    assert run(model, pairs, tmp_path / "o", "--steps", "6", "--init-lora", init, "--mixed-precision", "fp16",
               "--resume", "latest") == 0
    assert any(line["skipped"] == 0.0 for line in logged(tmp_path / "o")[1:])  # once the scale fits, steps apply
    assert not all(torch.equal(before[k], v) for k, v in read_lora(tmp_path / "o" / "lora.safetensors").items())
