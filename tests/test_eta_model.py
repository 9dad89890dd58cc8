"""A fully fine-tuned model as η (--eta-model): eq. 10 with a dense η = θ_ft − θ, against a reference built from two
diffusers UNets (θ_ft, and θ + α·(θ_ft − θ) with δ loaded by diffusers' load_lora_weights) and DDIMScheduler."""
import copy
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from npo import guided
import ldm
from npo import lora
import npo
from npo import pipeline
from npo.checkpoint import UserError

ATOL = 1e-4  # images in [0, 1]; as tests/test_sample.py
KW = dict(steps=4, guidance=6.0, height=16, width=16)


def to01(images):
    return (images / 2 + 0.5).clamp(0, 1)


def perturbed(unet, seed, scale=0.3):
    """A "fine-tune": every weight moved by `scale` times its own typical size."""
    tuned = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(0.5))
    return tuned


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base θ (a tiny SD1 folder), θ_ft as a model folder, a unet/ folder and a single file, and a random δ."""
    root = tmp_path_factory.mktemp("eta")
    base = ldm.make_family_dir(str(root / "base"), "sd1", seed=11)
    tuned = perturbed(base.unet, seed=12)
    ft = SimpleNamespace(unet=tuned, vae=base.vae, text_encoder=base.text_encoder)
    tuned.save_pretrained(str(root / "ft" / "unet"))
    paths = {"folder": str(root / "ft"), "unet_folder": str(root / "ft" / "unet"),
             "single_file": ldm.save_ldm(ldm.to_ldm(ft, "sd1"), str(root / "ft.safetensors"))}
    pipe = pipeline.load_pipeline(str(root / "base"))
    lora.add_offset(pipe.unet, "delta", rank=2, targets=("to_q", "to_v", "conv1"))
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for p in lora.parameters(pipe.unet, "delta"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_lora(pipe.unet, "delta", str(root / "delta.safetensors"), role="delta")
    return dict(base=base, base_path=str(root / "base"), tuned=tuned, delta=str(root / "delta.safetensors"), **paths)


def two_unet_reference(m, prompts, seeds, alpha, beta, steps, guidance, height, width):
    """ε_pos from θ_ft, ε_neg from θ + α·(θ_ft − θ) with δ at β (diffusers' LoRA loader), DDIMScheduler, CFG."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    base, theta, theta_ft = m["base"], m["base"].unet.state_dict(), m["tuned"].state_dict()
    neg_unet = copy.deepcopy(base.unet)
    neg_unet.load_state_dict({k: theta[k] + alpha * (theta_ft[k] - theta[k]) for k in theta})
    neg = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=neg_unet,
                                  scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    if beta:
        neg.load_lora_weights(m["delta"], adapter_name="delta")
        neg.set_adapters(["delta"], adapter_weights=[beta])
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        pos_embeds, _ = neg.encode_prompt(prompts, "cpu", 1, False)
        neg_embeds, _ = neg.encode_prompt(["ugly"] * len(prompts), "cpu", 1, False)
        x = torch.cat([torch.randn((1, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
        for t in scheduler.timesteps:
            eps_neg = neg.unet(x, t, neg_embeds).sample
            eps_pos = m["tuned"](x, t, pos_embeds).sample
            x = scheduler.step(eps_neg + guidance * (eps_pos - eps_neg), t, x).prev_sample
        return to01(base.vae.decode(x / base.vae.config.scaling_factor).sample)


@pytest.mark.parametrize("alpha, beta, form", [(0.6, 0.0, "folder"), (1.0, 1.0, "unet_folder"),
                                               (0.3, 0.7, "single_file")])
def test_eta_model_matches_two_unet_reference(models, alpha, beta, form):
    prompts, seeds = ["a red circle", "a cat"], [3, 4]
    ref = two_unet_reference(models, prompts, seeds, alpha, beta, **KW)
    pipe = pipeline.load_pipeline(models["base_path"])
    lora.load_lora(pipe.unet, models["delta"], "delta")
    before = {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()}
    guided.attach_eta_model(pipe, models[form], alpha)
    # θ + α·η is written over θ: the same tensors, so the two branches hold two weight sets, not three
    assert {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()} == before
    ours = guided.generate(pipe, prompts, seeds, "ugly", alpha=alpha, beta=beta, **KW)
    assert (to01(ours) - ref).abs().max() <= ATOL
    if beta == 0.0:  # eq. 4 against θ_ft differs from plain CFG with θ_ft (α = 1): α does something
        plain = two_unet_reference(models, prompts, seeds, 1.0, 0.0, **KW)
        assert (plain - ref).abs().max() > 10 / 255


def test_positive_branch_alone_is_the_tuned_model(models):
    """guidance 1 runs ε_pos only: θ_ft, whatever α and δ."""
    pipe = pipeline.load_pipeline(models["base_path"])
    guided.attach_eta_model(pipe, models["unet_folder"], 0.2)
    tuned = pipeline.load_pipeline(models["base_path"])
    tuned.unet = pipeline.load_unet(models["unet_folder"])
    kw = dict(KW, guidance=1.0)
    assert torch.equal(guided.generate(pipe, ["a cat"], [0], **kw), guided.generate(tuned, ["a cat"], [0], **kw))
    with pytest.raises(UserError, match=r"θ \+ α·η for α = 0.2"):
        guided.generate(pipe, ["a cat"], [0], alpha=0.5, **KW)


def test_cli(models, tmp_path):
    out = str(tmp_path / "a.png")
    assert npo.main(["sample", "--model", models["base_path"], "--eta-model", models["single_file"], "--npo",
                     models["delta"], "--alpha", "0.3", "--beta", "0.7", "--seed", "3", "--steps", "4",
                     "--guidance", "6", "--height", "16", "--width", "16", "--negative-prompt", "ugly", "--out", out]) == 0
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ref = two_unet_reference(models, ["a red circle"], [3], 0.3, 0.7, **KW)[0]
    assert np.abs(picture - (ref.permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert "NPO eta model: ft.safetensors" in Image.open(out).text["parameters"]


@pytest.mark.parametrize("flags, words", [
    (["--lora", "{delta}"], "--lora and --eta-model both give η"),
    (["--mode", "merged"], "drop --mode"),
    (["--sweep-alpha", "0,1"], "every image must share one α"),
    (["--eta-model", "/nonexistent"], "does not exist"),
    (["--eta-model", "{other}"], "is not a fine-tune of the base model"),
])
def test_cli_bad_input(models, tiny_model, tmp_path, capsys, flags, words):
    flags = [f.format(delta=models["delta"], other=tiny_model[0]) for f in flags]
    if "--eta-model" not in flags:
        flags = ["--eta-model", models["unet_folder"], *flags]
    assert npo.main(["sample", "--model", models["base_path"], "--steps", "1", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_heads_are_part_of_the_architecture(models, tiny_model):
    """Another network is refused: other shapes, or the same shapes with other heads (which would run the
    tuned weights with the wrong attention)."""
    other = pipeline.load_unet(tiny_model[0])  # 4 heads, context 32
    base = pipeline.load_unet(models["base_path"])
    with pytest.raises(UserError, match="not a fine-tune"):
        guided.check_same_architecture(base, other, "--eta-model x")
    same_shapes = copy.deepcopy(base)
    same_shapes.config.attention_head_dim = 4
    with pytest.raises(UserError, match="attention heads"):
        guided.check_same_architecture(base, same_shapes, "--eta-model x")
