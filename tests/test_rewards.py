"""Rewards, NPO's 1 − R (eq. 7), and `npo.py train --method reward` (DRaFT-K) on the tiny model."""
import io
import json
import os
import re
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from npo import guided
from npo import lora
from npo import machinery
from npo import method_reward
import npo
from npo import pipeline
from npo import rewards
from npo import shapes
from npo import train
from npo import trainconfig
from npo import trainflags
from npo.checkpoint import UserError
from conftest import diffusers_reference, record_calls


# ----------------------------------------------------------------------------------------------------------
# The rewards and their maps, against hand values.

def test_negate_and_bounding_maps_by_hand():
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    assert rewards.brightness(images, None).tolist() == [0.25, 0.75]
    assert rewards.negate(rewards.brightness)(images, None).tolist() == [0.75, 0.25]

    @rewards.reward(differentiable=True, bounded=False)
    def raw(images, prompts):
        return torch.tensor([-10.0, 5.0, 30.0, 50.0])
    four = torch.zeros(4, 3, 2, 2)
    mapped = rewards.affine(raw, 0, 40)
    assert mapped(four, None).tolist() == [0.0, 0.125, 0.75, 1.0]
    assert rewards.negate(mapped)(four, None).tolist() == [1.0, 0.875, 0.25, 0.0]
    squashed = rewards.sigmoid(raw, scale=10.0)
    torch.testing.assert_close(squashed(four, None), torch.tensor([0.268941, 0.622459, 0.952574, 0.993307]))
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


def test_load_by_name(tmp_path, monkeypatch):
    assert rewards.load("rewards:brightness") is rewards.brightness
    (tmp_path / "my_reward_module.py").write_text(
        "import torch\ndef redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "greenness.py").write_text("def score(images, prompts):\n    return images[:, 1].mean(dim=(1, 2))\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    ones = torch.ones(2, 3, 2, 2)
    assert rewards.load("my_reward_module:redness")(ones, None).tolist() == [1.0, 1.0]  # ./my_reward_module.py
    assert rewards.load("sub/greenness.py:score")(ones * 0.5, None).tolist() == [0.5, 0.5]  # a file path
    assert rewards.load(f"{tmp_path / 'sub' / 'greenness.py'}:score")(ones, None).tolist() == [1.0, 1.0]
    assert sys.path == path_before  # the files are loaded from their paths: sys.path is never touched
    for spec, message in (("brightness", "module:function"), ("no_such_module_x:f", "cannot import"),
                          ("rewards:no_such_reward", "no function"), ("sub/missing.py:score", "no file sub/missing.py"),
                          ("sub/greenness.py:nothing", "no function nothing")):
        with pytest.raises(UserError, match=message):
            rewards.load(spec)


def test_probe_reads_differentiability_from_what_the_reward_does():
    def smooth(images, prompts):  # a plain function: no attributes
        return torch.sigmoid(images.mean(dim=(1, 2, 3)) * 4 - 2)

    def counted(images, prompts):  # detaches: its scores do not depend on the pixels through autograd
        return (images.detach() > 0.5).float().mean(dim=(1, 2, 3))

    def constant(images, prompts):
        return torch.zeros(len(images), requires_grad=True) * 1.0
    assert rewards.probe(smooth, ["a"]) is True
    assert rewards.probe(counted, ["a"]) is False
    assert rewards.probe(constant, ["a"]) is False  # it has a graph, but not one that reaches the pixels
    assert rewards.probe(rewards.jpeg_compressibility, ["a"]) is False  # stated, and true
    counted.differentiable = True  # what a reward states wins over the probe
    assert rewards.probe(counted, ["a"]) is True


@pytest.mark.parametrize("bad, words", [
    (lambda images, prompts: images.mean(dim=(2, 3)), "returned (2, 3) for a batch of 2"),  # a score per channel
    (lambda images, prompts: images.mean() * torch.ones(3), "returned (3,) for a batch of 2"),
    (lambda images, prompts: images.mean(dim=(1, 2, 3)) / 0, "non-finite"),
    (lambda images, prompts: [0.5, 0.5], "returned list"),
])
def test_malformed_scores_are_refused(bad, words):
    with pytest.raises(UserError, match=re.escape(words)):
        rewards.probe(bad, ["a"])
    with pytest.raises(UserError, match=re.escape(words)):  # and at every training step
        rewards.checked(bad)(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_npo_checks_each_score_is_in_the_unit_interval():
    def plain(images, prompts):
        return images.mean(dim=(1, 2, 3)) * 3  # in [0, 3]: no attribute says so
    r_npo = rewards.negate(plain)  # accepted up front: nothing says it is unbounded
    assert r_npo(torch.full((1, 3, 2, 2), 0.1), ["a"]).tolist() == pytest.approx([0.7])
    with pytest.raises(UserError, match=r"outside \[0, 1\].*--reward-range.*--reward-sigmoid"):
        r_npo(torch.full((1, 3, 2, 2), 0.5), ["a"])


def test_prompt_check_hook():
    rewards.check_prompts(shapes.reward, ["a red circle", "a blue square"])
    with pytest.raises(UserError, match="'a cat'"):
        rewards.check_prompts(shapes.reward, ["a red circle", "a cat"])
    with pytest.raises(UserError, match="'a cat'"):  # the hook survives the maps around a reward
        rewards.check_prompts(rewards.negate(rewards.affine(shapes.reward, 0, 1)), ["a cat"])


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
    pipe = pipeline.load_pipeline(model)
    if path:
        lora.load_lora(pipe.unet, path, "eta")  # as the fine-tuned model: θ + offset for both branches
    images = guided.generate(pipe, ["a red circle", "a blue square"] * 2, [100, 101, 102, 103], steps=4, guidance=3,
                          height=16, width=16)
    return rewards.brightness((images / 2 + 0.5).clamp(0, 1), None).mean().item()


def trains_up_and_down(model, prompts_file, tmp_path, reward):
    """6 steps on R raise the samples' brightness (R rises with it); 6 steps on 1 − R (--npo) lower it."""
    flags = ["--reward", reward, "--steps", "6", "--lr", "3e-3"]
    assert run(model, prompts_file, tmp_path / "eta", *flags) == 0
    assert run(model, prompts_file, tmp_path / "delta", *flags, "--npo") == 0
    base = mean_brightness(model)
    up = mean_brightness(model, str(tmp_path / "eta" / "lora.safetensors"))
    down = mean_brightness(model, str(tmp_path / "delta" / "lora.safetensors"))
    assert up > base + 0.01 and down < base - 0.01, (base, up, down)


def test_reward_training_raises_r_and_npo_lowers_it(tiny_model, prompts_file, tmp_path):
    model, _ = tiny_model
    trains_up_and_down(model, prompts_file, tmp_path, "rewards:brightness")
    with safe_open(str(tmp_path / "delta" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["npo_role"] == "delta" and meta["npo_objective"] == "1 - R" and meta["npo_grad_steps"] == "2"


def test_gradients_flow_through_the_last_k_steps_only(tiny_model, prompts_file, tmp_path, monkeypatch):
    model, _ = tiny_model
    calls = []
    record_calls(monkeypatch, "unet", "forward", lambda x, t, context: calls.append((int(t), torch.is_grad_enabled())))
    train.train(trainflags.parse_args(["--model", model, "--prompts-file", prompts_file, "--out", str(tmp_path / "run"),
                                 *FAST, "--reward", "rewards:brightness", "--steps", "1", "--sample-steps", "5",
                                 "--grad-steps", "2"]))
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
    from npo.checkpoint import read_safetensors
    a, b = (read_safetensors(str(tmp_path / r / "lora.safetensors")) for r in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_bad_inputs(tiny_model, prompts_file, tmp_path, capsys, monkeypatch):
    model, _ = tiny_model
    out = tmp_path / "never"
    assert run(model, prompts_file, out, "--reward", "rewards:jpeg_compressibility") == 2
    assert "not differentiable" in capsys.readouterr().err
    assert run(model, prompts_file, out, "--reward", "rewards:brightness", "--npo", "--reward-range", "0,1",
               "--reward-sigmoid", "1") == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "unbounded_reward.py").write_text(
        "def score(images, prompts):\n    return images.sum(dim=(1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    assert run(model, prompts_file, out, "--reward", "unbounded_reward:score", "--npo") == 2
    assert "--reward-range" in capsys.readouterr().err
    assert npo.main(["train", "--model", model, "--out", str(out), *FAST, "--reward", "rewards:brightness"]) == 2
    assert "--prompts-file" in capsys.readouterr().err
    assert run(model, prompts_file, out, "--reward", "no_such_dir/missing.py:score") == 2
    assert "no file no_such_dir/missing.py" in capsys.readouterr().err
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


def test_prompts_outside_the_rewards_world_stop_before_the_model_loads(tiny_model, tmp_path, capsys, monkeypatch):
    model, _ = tiny_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na cat\n")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(pipeline, "load_pipeline", never)
    assert run(model, str(prompts), tmp_path / "o", "--reward", "shapes:reward") == 2
    err = capsys.readouterr().err
    assert "'a cat'" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_a_plain_reward_function_trains_up_and_with_npo_down(tiny_model, prompts_file, tmp_path, monkeypatch):
    """A user's reward module with no attributes: differentiable (the probe says so) and bounded by what it returns."""
    model, _ = tiny_model
    (tmp_path / "plain_reward.py").write_text(
        "import torch\n\n"
        "def score(images, prompts):\n"
        "    return torch.sigmoid((images.mean(dim=(1, 2, 3)) - 0.5) * 8)\n")
    monkeypatch.chdir(tmp_path)
    trains_up_and_down(model, prompts_file, tmp_path, "plain_reward:score")


# ----------------------------------------------------------------------------------------------------------
# One reward step's LoRA gradients against plain autograd through diffusers' UNet (peft adapters), DDIMScheduler
# and VAE: DRaFT-K with one offset, and --joint's eq. 10 branches.

def our_gradients(model, files, prompts_file, tmp_path, flags):
    """One micro-step of `npo.py train --method reward` on the given offsets: {(role, layer, "down"|"up"): grad}."""
    args = trainflags.parse_args(["--model", model, "--out", str(tmp_path / "unused"), "--method", "reward",
                             "--reward", "rewards:brightness", "--prompts-file", prompts_file, "--resolution", "16",
                             "--batch-size", "2", "--device", "cpu", *flags])
    trainconfig.check(args)
    pipe = pipeline.load_pipeline(model)
    for role, path in files.items():
        lora.load_lora(pipe.unet, path, role)
        for p in lora.parameters(pipe.unet, role):
            p.requires_grad_(True)
    run = machinery.Run(args, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files=files)
    micro_step = method_reward.micro_step(run, ["a red circle", "a blue square"])
    micro_step(0, 1.0)
    return {(role, layer, part): getattr(o, f"lora_{part}").weight.grad
            for role in files for layer, o in lora.offsets(pipe.unet, role).items() for part in ("down", "up")}


def reference_gradients(model, refs, files, steps, k, guidance, neg_weights, pos_weights):
    """The same step from diffusers parts: the example's prompt and x_T drawn from its generator as training draws
    them, then DDIM with the peft adapters at `neg_weights` for ε_neg and `pos_weights` for ε_pos (two forwards),
    the first steps − k under no_grad, decode, loss = −mean brightness, plain backward."""
    ref = diffusers_reference(model, refs, files, ["a red circle", "a blue square"],
                              [machinery.example_generator(0, j) for j in range(2)], steps, lambda name: "lora_" in name)
    pipe, chosen, x, pos, neg, scheduler, names = (ref.pipe, ref.chosen, ref.x, ref.pos, ref.neg, ref.scheduler,
                                                   ref.names)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= steps - k):
            pipe.set_adapters(names, [neg_weights[n] for n in names])
            eps_neg = pipe.unet(x, t, neg).sample
            pipe.set_adapters(names, [pos_weights[n] for n in names])
            eps_pos = pipe.unet(x, t, pos).sample
            x = scheduler.step(eps_neg + guidance * (eps_pos - eps_neg), t, x).prev_sample
    images = (refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    (-rewards.brightness(images, chosen).mean()).backward()
    parts = {"down": "lora_A", "up": "lora_B"}
    return lambda role, layer, part: getattr(pipe.unet.get_submodule(layer), parts[part])[role].weight.grad


def assert_gradients_equal(ours, ref):
    for (role, layer, part), g in ours.items():
        r = ref(role, layer, part).view_as(g)
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-12, (role, layer, part)


def test_draft_k_gradient_equals_autograd_through_diffusers(tiny_model, offsets, prompts_file, tmp_path):
    model, refs = tiny_model
    files = {"eta": offsets["eta"]}
    ours = our_gradients(model, files, prompts_file, tmp_path,
                         ["--sample-steps", "4", "--grad-steps", "2", "--guidance", "3"])
    assert_gradients_equal(ours, reference_gradients(model, refs, files, 4, 2, 3.0, {"eta": 1.0}, {"eta": 1.0}))


def test_joint_gradients_equal_the_two_branch_computation(tiny_model, offsets, prompts_file, tmp_path):
    """--joint: η at α on the unconditional branch and 1 on the conditional one, δ at β and 0 (eq. 10)."""
    model, refs = tiny_model
    flags = ["--sample-steps", "3", "--grad-steps", "2", "--guidance", "3", "--joint", "--alpha", "0.5", "--beta", "0.7"]
    ours = our_gradients(model, offsets, prompts_file, tmp_path, flags)
    ref = reference_gradients(model, refs, offsets, 3, 2, 3.0, {"eta": 0.5, "delta": 0.7}, {"eta": 1.0, "delta": 0.0})
    assert_gradients_equal(ours, ref)
    # δ learns only through the unconditional rows: at guidance 1, ε = ε_pos, and δ's gradient is exactly zero
    ours = our_gradients(model, offsets, prompts_file, tmp_path, [*flags[:4], "--guidance", "1", *flags[6:]])
    assert all(g.abs().max() == 0 for (role, _, _), g in ours.items() if role == "delta")
    assert all(g.abs().max() > 0 for (role, _, _), g in ours.items() if role == "eta")


def test_uncond_branch_gradients_equal_the_two_branch_computation(tiny_model, offsets, prompts_file, tmp_path):
    """--train-branch uncond --lora ETA: η at α on the unconditional branch and 1 on the conditional one, δ at 1 and
    0 (eq. 10 with β = 1). η is frozen in a real run; here both are given gradients, to check both multipliers."""
    model, refs = tiny_model
    flags = ["--sample-steps", "3", "--grad-steps", "2", "--guidance", "3", "--train-branch", "uncond",
             "--lora", offsets["eta"], "--alpha", "0.5"]
    ours = our_gradients(model, offsets, prompts_file, tmp_path, flags)
    ref = reference_gradients(model, refs, offsets, 3, 2, 3.0, {"eta": 0.5, "delta": 1.0}, {"eta": 1.0, "delta": 0.0})
    assert_gradients_equal(ours, ref)
