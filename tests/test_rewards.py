"""Rewards, NPO's 1 − R (eq. 7), and `npo.py train --method reward` (DRaFT-K) on the tiny model."""
import io
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import npo
import rewards
import train
from checkpoint import UserError


# ----------------------------------------------------------------------------------------------------------
# The rewards and their maps, against hand values.

def test_negate_and_bounding_maps_by_hand():
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    assert rewards.brightness(images, None).tolist() == [0.25, 0.75]
    assert rewards.negate(rewards.brightness)(images, None).tolist() == [0.75, 0.25]

    @rewards.reward(differentiable=True, bounded=False)
    def raw(images, prompts):
        return torch.tensor([-10.0, 5.0, 30.0, 50.0])
    mapped = rewards.affine(raw, 0, 40)
    assert mapped(None, None).tolist() == [0.0, 0.125, 0.75, 1.0]
    assert rewards.negate(mapped)(None, None).tolist() == [1.0, 0.875, 0.25, 0.0]
    squashed = rewards.sigmoid(raw, scale=10.0)
    torch.testing.assert_close(squashed(None, None), torch.tensor([0.268941, 0.622459, 0.952574, 0.993307]))
    with pytest.raises(UserError, match="not bounded"):
        rewards.negate(raw)
    with pytest.raises(UserError, match="LOW < HIGH"):
        rewards.affine(raw, 3, 3)
    with pytest.raises(UserError, match="positive"):
        rewards.sigmoid(raw, 0)


def test_saturation_by_hand():
    gray, red = torch.full((3, 2, 2), 0.5), torch.tensor([0.9, 0.1, 0.3]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(rewards.saturation(torch.stack([gray, red]), None), torch.tensor([0.0, 0.8]))


def test_jpeg_rewards_are_kilobytes_at_quality_95():
    g = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand((3, 32, 32), generator=g)])
    expected = []
    for image in images:
        buffer = io.BytesIO()
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    assert rewards.jpeg_incompressibility(images, None).tolist() == pytest.approx(expected)
    assert rewards.jpeg_compressibility(images, None).tolist() == pytest.approx([-e for e in expected])
    assert not rewards.is_differentiable(rewards.jpeg_compressibility)
    assert not rewards.is_bounded(rewards.jpeg_compressibility)


def test_aesthetic_head_loads_a_file_and_scores_as_its_mlp(tmp_path):
    embed = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 32))
    g = torch.Generator().manual_seed(0)
    shapes = {"0": (1024, 32), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}
    state = {}
    for i, (o, n) in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    save_file(state, str(tmp_path / "head.safetensors"))
    head = rewards.AestheticHead.from_file(str(tmp_path / "head.safetensors"), embed, dim=32)
    images = torch.rand(2, 3, 64, 48, generator=g)
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(head.MEAN).view(1, 3, 1, 1)) / torch.tensor(head.STD).view(1, 3, 1, 1)
    e = embed(x)
    h = e / e.norm(dim=-1, keepdim=True)
    for i in ("0", "2", "4", "6", "7"):  # no nonlinearity, as in the improved-aesthetic-predictor
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(head(images), h[:, 0])
    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="not an aesthetic MLP"):
        rewards.AestheticHead.from_file(str(tmp_path / "bad.safetensors"), embed, dim=32)


def test_load_by_name(tmp_path, monkeypatch):
    assert rewards.load("rewards:brightness") is rewards.brightness
    (tmp_path / "my_reward_module.py").write_text(
        "import torch\ndef redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n")
    monkeypatch.chdir(tmp_path)
    assert rewards.load("my_reward_module:redness")(torch.ones(2, 3, 2, 2), None).tolist() == [1.0, 1.0]
    for spec, message in (("brightness", "module:function"), ("no_such_module_x:f", "cannot import"),
                          ("rewards:no_such_reward", "no function")):
        with pytest.raises(UserError, match=message):
            rewards.load(spec)


# ----------------------------------------------------------------------------------------------------------
# Reward training on the tiny model.

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return str(path)


FAST = ["--method", "reward", "--resolution", "16", "--sample-steps", "4", "--grad-steps", "2", "--log-every", "1",
        "--device", "cpu", "--guidance", "3"]


def run(model, prompts_file, out, *flags):
    return npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(out), *FAST, *flags])


def mean_brightness(model, path=None, name="eta"):
    """Mean brightness of 4 fixed-seed samples, the offset (if any) on both CFG branches."""
    pipe = npo.load_pipeline(model)
    if path:
        lora.load_lora(pipe.unet, path, "eta")  # as the fine-tuned model: θ + offset for both branches
    images = npo.generate(pipe, ["a red circle", "a blue square"] * 2, [100, 101, 102, 103], steps=4, guidance=3,
                          height=16, width=16)
    return rewards.brightness((images / 2 + 0.5).clamp(0, 1), None).mean().item()


def test_reward_training_raises_r_and_npo_lowers_it(tiny_model, prompts_file, tmp_path):
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--steps", "6", "--lr", "3e-3"]
    assert run(model, prompts_file, tmp_path / "eta", *flags) == 0
    assert run(model, prompts_file, tmp_path / "delta", *flags, "--npo") == 0
    base = mean_brightness(model)
    up = mean_brightness(model, str(tmp_path / "eta" / "lora.safetensors"))
    down = mean_brightness(model, str(tmp_path / "delta" / "lora.safetensors"))
    assert up > base + 0.01 and down < base - 0.01, (base, up, down)
    with safe_open(str(tmp_path / "delta" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_objective"] == "1 - R" and meta["npo_grad_steps"] == "2"


def test_gradients_flow_through_the_last_k_steps_only(tiny_model, prompts_file, tmp_path):
    model, _ = tiny_model
    calls = []

    def recording_pipeline(path, dtype, device):
        pipe = npo.load_pipeline(path, dtype, device)
        forward = pipe.unet.forward

        def recorded(x, t, context):
            calls.append((int(t), torch.is_grad_enabled()))
            return forward(x, t, context)
        pipe.unet.forward = recorded
        return pipe

    args = npo.build_parser().parse_args(["train", "--model", model, "--prompts-file", prompts_file, "--out",
                                          str(tmp_path / "run"), *FAST, "--reward", "rewards:brightness",
                                          "--steps", "1", "--sample-steps", "5", "--grad-steps", "2"])
    train.main(args, recording_pipeline)
    # 5 sampling calls, of which only the last 2 build a graph (the first 3 run under no_grad), then the backward
    # recomputes those 2 (checkpointing), the last one first
    assert [g for _, g in calls] == [False, False, False, True, True, True, True]
    assert [t for t, _ in calls][5:] == [t for t, _ in calls][3:5][::-1]


def test_joint_training_writes_eta_and_delta(tiny_model, prompts_file, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "joint"
    assert run(model, prompts_file, out, "--reward", "rewards:saturation", "--steps", "2", "--joint") == 0
    for role in ("eta", "delta"):
        with safe_open(str(out / f"{role}.safetensors"), "pt") as f:
            assert f.metadata()["npo_role"] == role
    assert not (out / "lora.safetensors").exists()
    assert npo.main(["sample", "--model", model, "--lora", str(out / "eta.safetensors"), "--npo",
                     str(out / "delta.safetensors"), "--steps", "2", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "image.png")]) == 0


def test_reward_run_resumes_bit_for_bit(tiny_model, prompts_file, tmp_path):
    model, _ = tiny_model
    flags = ["--reward", "rewards:brightness", "--lr", "1e-3", "--batch-size", "2"]
    assert run(model, prompts_file, tmp_path / "whole", *flags, "--steps", "3") == 0
    assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", "2") == 0
    assert run(model, prompts_file, tmp_path / "split", *flags, "--steps", "3", "--resume", "latest") == 0
    from checkpoint import read_safetensors
    a, b = (read_safetensors(str(tmp_path / r / "lora.safetensors")) for r in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_bad_inputs(tiny_model, prompts_file, tmp_path, capsys, monkeypatch):
    model, _ = tiny_model
    out = tmp_path / "never"
    assert run(model, prompts_file, out, "--reward", "rewards:jpeg_compressibility") == 2
    assert "not differentiable" in capsys.readouterr().err
    (tmp_path / "unbounded_reward.py").write_text(
        "def score(images, prompts):\n    return images.sum(dim=(1, 2, 3))\nscore.differentiable = True\n")
    monkeypatch.chdir(tmp_path)
    assert run(model, prompts_file, out, "--reward", "unbounded_reward:score", "--npo") == 2
    assert "--reward-range" in capsys.readouterr().err
    assert npo.main(["train", "--model", model, "--out", str(out), *FAST, "--reward", "rewards:brightness"]) == 2
    assert "--prompts-file" in capsys.readouterr().err
    assert run(model, prompts_file, out, "--reward", "rewards:brightness", "--grad-steps", "9") == 2
    assert "exceeds --sample-steps" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert run(model, str(empty), out, "--reward", "rewards:brightness") == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert not out.exists()
    # the same unbounded reward, mapped to [0, 1], is accepted for NPO
    assert run(model, prompts_file, tmp_path / "ok", "--reward", "unbounded_reward:score", "--npo",
               "--reward-range", "0,200", "--steps", "1") == 0
    line = [json.loads(x) for x in open(tmp_path / "ok" / "log.jsonl")][0]
    assert 0 <= line["reward"] <= 1 and os.path.exists(tmp_path / "ok" / "lora.safetensors")
