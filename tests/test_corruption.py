"""The appendix's table 7 (II.3): NPO's DPO training on perturbed captions (--perturb-prompts) and on blurred
negative images (--corrupt blur:SIGMA). The blur against a numpy convolution written here; each option changes what
it should and nothing else in the batch the loss sees; a resumed run replays bit for bit; bad input is one sentence."""
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from npo import data
from npo import guided
from npo import machinery
from npo import method_dpo
import npo
from npo import pipeline
from conftest import write_random_pairs
from test_train import FAST, assert_same, logged, read_lora


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_random_pairs(tmp_path_factory.mktemp("pairs"), 6, seed=3)


def run(model, pairs, out, *flags):
    return npo.main(["train", "--model", model, "--data", pairs, "--out", str(out), *FAST, *flags])


# ----------------------------------------------------------------------------------------------------------
# The blur against an independent reference.

def numpy_blur(image, sigma):
    """A Gaussian blur written from its definition: numpy's reflect padding by r = ⌈3σ⌉, then the 2-D kernel
    G(i, j) ∝ exp(−(i² + j²) / 2σ²) summed over the window at every pixel, in float64."""
    r = math.ceil(3 * sigma)
    k = np.arange(-r, r + 1)
    kernel = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), ((0, 0), (r, r), (r, r)), mode="reflect")
    _, h, w = image.shape
    out = np.zeros(image.shape)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


@pytest.mark.parametrize("sigma, size", [(0.5, (9, 12)), (1.3, (16, 16)), (4.0, (7, 10))])  # the last: r > size
def test_gaussian_blur_equals_a_numpy_convolution(sigma, size):
    x = torch.rand((2, 3, *size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = data.gaussian_blur(x, sigma)
    for a, b in zip(ours, x):
        np.testing.assert_allclose(a.numpy(), numpy_blur(b.numpy(), sigma), rtol=0, atol=1e-6)
    assert (ours - x).abs().max() > 0.05  # it did blur
    flat = torch.full((1, 3, *size), 0.25)
    torch.testing.assert_close(data.gaussian_blur(flat, sigma), flat)  # the weights sum to 1


# ----------------------------------------------------------------------------------------------------------
# What the loss sees, with and without each option, from the same seed.

def seen(monkeypatch, model, pairs, out, *flags):
    """Train 2 steps and return what each micro-step handed the model: the captions, the pixels [x_w; x_l] given to
    the VAE, and the UNet's inputs (z_t, t) of every call."""
    record = {"prompts": [], "pixels": [], "unet": []}
    conditioning, posterior, run_unet = pipeline.Pipeline.conditioning, method_dpo.posterior, guided.run_unet

    def record_conditioning(self, prompts, *args, **kwargs):
        record["prompts"].append(list(prompts))
        return conditioning(self, prompts, *args, **kwargs)

    def record_posterior(vae, pixels, *args):
        record["pixels"].append(pixels.clone())
        return posterior(vae, pixels, *args)

    def record_unet(unet, x, t, c):
        record["unet"].append((x.detach().clone(), t.clone()))
        return run_unet(unet, x, t, c)

    monkeypatch.setattr(pipeline.Pipeline, "conditioning", record_conditioning)
    monkeypatch.setattr(method_dpo, "posterior", record_posterior)
    monkeypatch.setattr(guided, "run_unet", record_unet)
    assert run(model, pairs, out, "--steps", "2", "--batch-size", "3", *flags) == 0
    monkeypatch.undo()
    return record


def test_perturb_prompts_changes_only_the_captions(tiny_model, pairs, tmp_path, monkeypatch):
    model, _ = tiny_model
    plain = seen(monkeypatch, model, pairs, tmp_path / "plain", "--npo")
    perturbed = seen(monkeypatch, model, pairs, tmp_path / "perturbed", "--npo", "--perturb-prompts")
    for k, (a, b) in enumerate(zip(plain["prompts"], perturbed["prompts"], strict=True)):
        assert sorted(a) == sorted(b)  # the batch's own captions, each once
        # the documented draw: randperm(B) from the generator of (seed, PERTURB_STREAM, first example = k · B)
        order = torch.randperm(3, generator=machinery.stream_generator(0, method_dpo.PERTURB_STREAM, 3 * k))
        assert b == [a[j] for j in order.tolist()]
    assert plain["prompts"] != perturbed["prompts"]  # some pair did get another's caption
    for a, b in zip(plain["pixels"], perturbed["pixels"], strict=True):
        assert torch.equal(a, b)
    for (x, t), (y, s) in zip(plain["unet"], perturbed["unet"], strict=True):
        assert torch.equal(x, y) and torch.equal(t, s)


def test_corrupt_blurs_only_the_image_the_swap_makes_preferred(tiny_model, pairs, tmp_path, monkeypatch):
    model, _ = tiny_model
    plain = seen(monkeypatch, model, pairs, tmp_path / "plain", "--npo")
    blurred = seen(monkeypatch, model, pairs, tmp_path / "blurred", "--npo", "--corrupt", "blur:1.5")
    assert plain["prompts"] == blurred["prompts"]
    for a, b in zip(plain["pixels"], blurred["pixels"], strict=True):
        (w, l), (w2, l2) = a.chunk(2), b.chunk(2)  # [x_w; x_l] as the stream hands them
        assert torch.equal(w, w2)
        for ours, original in zip(l2, l):
            np.testing.assert_allclose(ours.numpy(), numpy_blur(original.numpy(), 1.5), rtol=0, atol=1e-6)
    # after the swap the batch is [x_l; x_w]: the blurred loser is the half trained as preferred
    for (x, t), (y, s) in zip(plain["unet"], blurred["unet"], strict=True):
        assert torch.equal(t, s)
        (l, w), (l2, w2) = x.chunk(2), y.chunk(2)
        assert torch.equal(w, w2) and not torch.equal(l, l2)


def test_resumed_run_with_both_options_ends_with_the_same_lora(tiny_model, pairs, tmp_path, capsys):
    model, _ = tiny_model
    flags = ["--npo", "--perturb-prompts", "--corrupt", "blur:0.8", "--batch-size", "2", "--grad-accum", "2",
             "--checkpoint-every", "2", "--random-crop"]
    assert run(model, pairs, tmp_path / "whole", "--steps", "4", *flags) == 0
    assert run(model, pairs, tmp_path / "split", "--steps", "3", *flags) == 0
    assert run(model, pairs, tmp_path / "split", "--steps", "4", "--resume", "latest", *flags) == 0
    assert_same(read_lora(tmp_path / "split" / "lora.safetensors"), read_lora(tmp_path / "whole" / "lora.safetensors"))
    assert [line["loss"] for line in logged(tmp_path / "split")] == [line["loss"] for line in logged(tmp_path / "whole")]
    with safe_open(str(tmp_path / "whole" / "lora.safetensors"), "pt") as f:  # the file says which table 7 row it is
        meta = f.metadata()
    assert meta["npo_perturb_prompts"] == "true" and meta["npo_corrupt"] == "blur:0.8"
    capsys.readouterr()
    assert run(model, pairs, tmp_path / "split", "--steps", "5", "--resume", "latest", *flags[:2], *flags[4:]) == 0
    # the run's saved settings (settings.json) keep its corruption when the flag is not repeated: nothing changes
    assert "corrupt" not in capsys.readouterr().err
    with safe_open(str(tmp_path / "split" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["npo_corrupt"] == "blur:0.8"


# ----------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 2, nothing written.

@pytest.mark.parametrize("flags, words", [
    (["--npo", "--corrupt", "blur:-1"], "SIGMA must be a positive finite number"),
    (["--npo", "--corrupt", "blur:0"], "SIGMA must be a positive finite number"),
    (["--npo", "--corrupt", "blur:nan"], "SIGMA must be a positive finite number"),
    (["--npo", "--corrupt", "blur:inf"], "SIGMA must be a positive finite number"),
    (["--npo", "--corrupt", "blur:wide"], "SIGMA must be a number of pixels"),
    (["--npo", "--corrupt", "blur"], "SIGMA must be a number of pixels"),
    (["--npo", "--corrupt", "sharpen:2"], "unknown corruption 'sharpen'"),
    (["--corrupt", "blur:1"], "add --npo"),
    (["--perturb-prompts"], "pass --batch-size 2 or more"),
    (["--method", "reward", "--corrupt", "blur:1"], "--corrupt does nothing with --method reward"),
    (["--method", "ddpo", "--perturb-prompts"], "--perturb-prompts does nothing with --method ddpo"),
])
def test_bad_options_are_one_sentence(tiny_model, pairs, tmp_path, capsys, flags, words):
    model, _ = tiny_model
    out, prompts = tmp_path / "o", tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    inputs = ["--data", pairs] if "--method" not in flags else ["--reward", "rewards:brightness", "--prompts-file",
                                                                str(prompts)]
    assert npo.main(["train", "--model", model, "--out", str(out), *FAST, *inputs, *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not out.exists()
