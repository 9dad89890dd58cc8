"""A whole NPO-tuned UNet as δ (--npo-model): eq. 10 with a dense δ = θ_δ − θ, against a reference of two diffusers
UNets whose weights are merged here by hand (θ + α·η + β·(θ_δ − θ) and θ + η, η a LoRA loaded by diffusers'
load_lora_weights, or θ_ft for a fine-tuned η) and DDIMScheduler."""
import copy
import gc
import os
import shutil
import weakref
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
from npo import sampler
from npo.checkpoint import UserError
from test_eta_model import perturbed, to01

ATOL = 1e-4  # images in [0, 1]; as tests/test_sample.py
KW = dict(steps=4, guidance=6.0, height=16, width=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base θ (a tiny SD1 folder); θ_δ as a model folder, a unet/ folder and a single file; θ_ft (a unet/ folder);
    a random UNet LoRA η."""
    root = tmp_path_factory.mktemp("npo_model")
    base = ldm.make_family_dir(str(root / "base"), "sd1", seed=21)
    npo_unet, tuned = perturbed(base.unet, seed=22), perturbed(base.unet, seed=23)
    npo_unet.save_pretrained(str(root / "npo" / "unet"))
    tuned.save_pretrained(str(root / "ft" / "unet"))
    whole = SimpleNamespace(unet=npo_unet, vae=base.vae, text_encoder=base.text_encoder)
    paths = {"folder": str(root / "npo"), "unet_folder": str(root / "npo" / "unet"),
             "single_file": ldm.save_ldm(ldm.to_ldm(whole, "sd1"), str(root / "npo.safetensors"))}
    pipe = pipeline.load_pipeline(str(root / "base"))
    lora.add_offset(pipe.unet, "eta", rank=2, targets=("to_q", "to_v", "conv1"))
    g = torch.Generator().manual_seed(24)
    with torch.no_grad():
        for p in lora.parameters(pipe.unet, "eta"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_lora(pipe.unet, "eta", str(root / "eta.safetensors"), role="eta")
    return dict(base=base, base_path=str(root / "base"), npo_unet=npo_unet, tuned=tuned, ft=str(root / "ft"),
                eta=str(root / "eta.safetensors"), **paths)


def reference(m, eta, alpha, beta, prompts, seeds, steps, guidance, height, width):
    """ε_neg from a diffusers UNet holding θ + α·η + β·(θ_δ − θ), ε_pos from one holding θ + η, both merged here:
    η = θ_ft − θ for eta "model"; for eta "lora" the UNets hold θ + β·(θ_δ − θ) and θ, and η is diffusers' LoRA at α
    and at 1; no η for eta None. DDIMScheduler, CFG, two passes per step."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    base = m["base"]
    theta, npo_w, ft = base.unet.state_dict(), m["npo_unet"].state_dict(), m["tuned"].state_dict()
    if eta == "model":
        neg_state = {k: theta[k] + alpha * (ft[k] - theta[k]) + beta * (npo_w[k] - theta[k]) for k in theta}
        pos_state = ft
    else:
        neg_state, pos_state = {k: theta[k] + beta * (npo_w[k] - theta[k]) for k in theta}, theta

    def unet_with(state, eta_scale):
        model = copy.deepcopy(base.unet)
        model.load_state_dict(state)
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=model, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        if eta == "lora":
            pipe.load_lora_weights(m["eta"], adapter_name="eta")
            pipe.set_adapters(["eta"], adapter_weights=[eta_scale])
        return pipe
    neg, pos = unet_with(neg_state, alpha), unet_with(pos_state, 1.0)
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        pos_embeds, _ = pos.encode_prompt(prompts, "cpu", 1, False)
        neg_embeds, _ = neg.encode_prompt(["ugly"] * len(prompts), "cpu", 1, False)
        x = torch.cat([torch.randn((1, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
        for t in scheduler.timesteps:
            eps_neg, eps_pos = neg.unet(x, t, neg_embeds).sample, pos.unet(x, t, pos_embeds).sample
            x = scheduler.step(eps_neg + guidance * (eps_pos - eps_neg), t, x).prev_sample
        return to01(base.vae.decode(x / base.vae.config.scaling_factor).sample)


def ours(m, eta, form, alpha, beta):
    """Our pipeline with η (a LoRA, --eta-model, or none) and θ_δ at `form` attached."""
    pipe = pipeline.load_pipeline(m["base_path"])
    if eta == "lora":
        lora.load_lora(pipe.unet, m["eta"], "eta")
    guided.attach_npo_model(pipe, m[form], beta, m["ft"] if eta == "model" else None, alpha)
    return pipe


@pytest.mark.parametrize("eta, alpha, beta, form", [("lora", 0.6, 1.0, "folder"), (None, 1.0, 0.5, "unet_folder"),
                                                    ("model", 0.3, 0.7, "single_file"), ("model", 1.0, 1.0, "folder"),
                                                    ("lora", 1.0, 0.4, "single_file")])
def test_npo_model_matches_two_unet_reference(models, eta, alpha, beta, form):
    prompts, seeds = ["a red circle", "a cat"], [3, 4]
    ref = reference(models, eta, alpha, beta, prompts, seeds, **KW)
    images = guided.generate(ours(models, eta, form, alpha, beta), prompts, seeds, "ugly", alpha=alpha, beta=beta,
                               **KW)
    assert (to01(images) - ref).abs().max() <= ATOL
    # δ does something: the same run without it is visibly different
    without = reference(models, eta, alpha, 0.0, prompts, seeds, **KW)
    assert (without - ref).abs().max() > 10 / 255


def test_sweep_alpha_rows_with_a_lora_eta(models):
    """η as a LoRA runs at α per row on the dense δ's weight set: a batch of two α equals two single runs."""
    pipe = ours(models, "lora", "unet_folder", 1.0, 0.8)
    both = guided.generate(pipe, ["a cat"] * 2, [5, 5], "ugly", alpha=[0.2, 0.9], beta=0.8, **KW)
    for row, alpha in enumerate((0.2, 0.9)):
        single = guided.generate(pipe, ["a cat"], [5], "ugly", alpha=alpha, beta=0.8, **KW)
        assert (both[row] - single[0]).abs().max() <= 1e-5
    with pytest.raises(UserError, match=r"θ \+ β·δ for β = 0.8"):
        guided.generate(pipe, ["a cat"], [5], alpha=1.0, beta=0.5, **KW)


def storages(*models):
    """The distinct storages of the models' weights, LoRA offsets aside."""
    return {w.untyped_storage().data_ptr() for m in models for w in lora.merged_state_dict(m, {}).values()}


def test_one_extra_weight_set(models, monkeypatch):
    """Memory: θ's weights plus one more UNet's, at every moment. With a LoRA η: θ stays as it was and the negative
    set is the one loaded (η's LoRA shared by both, not copied). With --eta-model: the negative set is built in θ's
    own tensors, and θ_δ is let go before θ_ft is read."""
    n = len(storages(pipeline.load_unet(models["base_path"])))
    loaded = []

    def load_unet(*args, **kwargs):
        gc.collect()
        alive = [r for r in loaded if r() is not None]
        assert not alive, "a UNet loaded earlier is still held when the next one is read"
        model = real(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model
    real = pipeline.load_unet
    monkeypatch.setattr(pipeline, "load_unet", load_unet)

    pipe = pipeline.load_pipeline(models["base_path"])
    lora.load_lora(pipe.unet, models["eta"], "eta")
    before = storages(pipe.unet)
    guided.attach_npo_model(pipe, models["unet_folder"], 0.5)
    assert storages(pipe.unet) == before and len(storages(pipe.unet, pipe.npo_unet)) == 2 * n
    assert lora.offsets(pipe.npo_unet, "eta").keys() == lora.offsets(pipe.unet, "eta").keys()
    assert all(a is b for a, b in zip(lora.offsets(pipe.npo_unet, "eta").values(),
                                      lora.offsets(pipe.unet, "eta").values()))

    loaded.clear()
    pipe = pipeline.load_pipeline(models["base_path"])
    before = storages(pipe.unet)
    guided.attach_npo_model(pipe, models["single_file"], 0.5, models["ft"], 0.5)
    assert len(loaded) == 2 and pipe.npo_unet is None
    assert storages(pipe.unet) == before and len(storages(pipe.unet, pipe.eta_unet)) == 2 * n


def test_beta_zero_reads_no_file(models, monkeypatch):
    """β = 0: δ weighs nothing, so the NPO model is not read (the run is the one without δ)."""
    monkeypatch.setattr(pipeline, "load_unet", lambda *a, **k: pytest.fail("read a UNet"))
    pipe = pipeline.load_pipeline(models["base_path"])
    guided.attach_npo_model(pipe, models["folder"], 0.0)
    assert pipe.npo_unet is None and pipe.npo_beta == 0.0


def run_cli(models, tmp_path, name, *flags):
    out = str(tmp_path / name)
    assert npo.main(["sample", "--model", models["base_path"], "--seed", "3", "--steps", "4", "--guidance", "6",
                     "--height", "16", "--width", "16", "--negative-prompt", "ugly", "--out", out, *flags]) == 0
    return Image.open(out)


@pytest.mark.parametrize("eta", ["lora", "model"])
def test_cli_beta_zero_is_the_run_without_delta(models, tmp_path, eta):
    """--beta 0 gives the same pixels as no δ at all."""
    flags = ["--lora", models["eta"]] if eta == "lora" else ["--eta-model", models["ft"]]
    flags += ["--alpha", "0.5"]
    with_delta = run_cli(models, tmp_path, "a.png", *flags, "--npo-model", models["folder"], "--beta", "0")
    without = run_cli(models, tmp_path, "b.png", *flags)
    assert np.array_equal(np.asarray(with_delta), np.asarray(without))


def test_cli(models, tmp_path):
    picture = run_cli(models, tmp_path, "a.png", "--lora", models["eta"], "--npo-model", models["single_file"],
                      "--alpha", "0.6", "--beta", "0.7")
    ref = reference(models, "lora", 0.6, 0.7, ["a red circle"], [3], **KW)[0]
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert np.abs(pixels - (ref.permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    parameters = picture.text["parameters"]
    digest = npo.checkpoint.sha256_file(models["single_file"])[:10]
    for words in (f"NPO model hash: {digest}, NPO model: npo.safetensors", "NPO alpha: 0.6, NPO beta: 0.7",
                  "NPO mode: dense delta"):
        assert words in parameters


@pytest.mark.parametrize("flags, words", [
    (["--npo", "{eta}"], "--npo and --npo-model both give δ"),
    (["--mode", "merged"], "drop --mode"),
    (["--sweep-beta", "0,1"], "--sweep-beta samples several β"),
    (["--compare"], "--compare samples several β"),
    (["--npo-model", "/nonexistent"], "--npo-model /nonexistent does not exist"),
    (["--npo-model", "{other}"], "is not a fine-tune of the base model"),
    (["--eta-model", "{ft}", "--npo-model", "{other}"], "is not a fine-tune of the base model"),
])
def test_cli_bad_input(models, tiny_model, tmp_path, capsys, flags, words):
    flags = [f.format(eta=models["eta"], other=tiny_model[0], ft=models["ft"]) for f in flags]
    if "--npo-model" not in flags:
        flags = ["--npo-model", models["unet_folder"], *flags]
    assert npo.main(["sample", "--model", models["base_path"], "--steps", "1", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_sdxl_dense_delta_equals_its_lora(tiny_sdxl, tmp_path):
    """SDXL (each branch's conditioning a dict with pooled text and time ids): a dense δ made of a LoRA δ's merged
    weights, θ_δ = θ + ΔW, samples as that LoRA at the same β (eq. 10 is linear in δ: θ + β·(θ_δ − θ) = θ + β·ΔW)."""
    from safetensors.torch import save_file
    path = tiny_sdxl[0]
    pipe = pipeline.load_pipeline(path)
    lora.add_offset(pipe.unet, "delta", rank=2, targets=("to_q", "to_v", "conv1"))
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for p in lora.parameters(pipe.unet, "delta"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_lora(pipe.unet, "delta", str(tmp_path / "delta.safetensors"), role="delta")
    os.makedirs(tmp_path / "npo_unet")
    shutil.copy(os.path.join(path, "unet", "config.json"), tmp_path / "npo_unet")
    merged = {k: v.contiguous() for k, v in lora.merged_state_dict(pipe.unet, {"delta": 1.0}).items()}
    save_file(merged, str(tmp_path / "npo_unet" / "diffusion_pytorch_model.safetensors"))
    kw = dict(steps=3, guidance=5.0, height=16, width=16, beta=0.6)
    with_lora = pipeline.load_pipeline(path)
    lora.load_lora(with_lora.unet, str(tmp_path / "delta.safetensors"), "delta")
    dense = pipeline.load_pipeline(path)
    guided.attach_npo_model(dense, str(tmp_path / "npo_unet"), 0.6)
    a = guided.generate(with_lora, ["a cat", "a dog"], [1, 2], **kw)
    b = guided.generate(dense, ["a cat", "a dog"], [1, 2], **kw)
    assert (to01(a) - to01(b)).abs().max() <= ATOL
    plain = guided.generate(pipeline.load_pipeline(path), ["a cat", "a dog"], [1, 2], **kw)
    assert (to01(plain) - to01(b)).abs().max() > 10 / 255  # δ does something


def test_branch_weights_come_from_npo_weights(models, monkeypatch):
    """sampler.npo_weights is the one statement of eq. 10: the dense δ's sets run η at its multipliers (here the
    branches swapped after the weights were built: the picture changes), and a rule that put δ on the positive
    branch, which a dense δ's weight sets cannot hold, is refused rather than ignored."""
    pipe = ours(models, "lora", "unet_folder", 0.5, 0.8)
    kw = dict(KW, alpha=0.5, beta=0.8)
    before = guided.generate(pipe, ["a cat"], [1], **kw)
    rule = sampler.npo_weights
    monkeypatch.setattr(sampler, "npo_weights", lambda alpha=1.0, beta=1.0: {
        name: (cond, uncond) for name, (uncond, cond) in rule(alpha, beta).items()})
    assert (guided.generate(pipe, ["a cat"], [1], **kw) - before).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match="positive branch of δ at 0"):
        guided.attach_npo_model(pipeline.load_pipeline(models["base_path"]), models["unet_folder"], 0.8)
