"""Single-file checkpoints (the LDM layout of SD1.x / SD2.x, SDXL base's) against the diffusers folder they were
written from.

A tiny random model of each family is saved as a diffusers folder and converted to one file by tests/ldm.py, a
converter of ours that diffusers' own `from_single_file` (pointed offline at the folder for its configs) reads back
to the folder's exact weights. Then the file, loaded by singlefile.py, must give the folder's images.
"""
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from npo import guided
import ldm
import npo
from npo import pipeline
from npo import singlefile
from npo.checkpoint import UserError
from conftest import ROOT
from test_train import pairs  # noqa: F401 (a fixture: six preference pairs)

KW = dict(steps=2, guidance=6.0, height=16, width=16)  # latents 8x8 (the tiny VAE halves once)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request, tmp_path_factory):
    """(family, folder, the diffusers pipeline, its single file)."""
    folder = str(tmp_path_factory.mktemp(request.param))
    pipe = ldm.make_family_dir(folder, request.param)
    path = ldm.save_ldm(ldm.to_ldm(pipe, request.param), os.path.join(folder, "model.safetensors"))
    return request.param, folder, pipe, path


def without_size(config):
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "sample_size"}


def images(model, **kw):
    pipe = model if isinstance(model, pipeline.Pipeline) else pipeline.load_pipeline(model, **kw)
    return guided.generate(pipe, ["a red circle", "a cat"], [1, 2], "ugly", **KW)


def test_converter_matches_diffusers_from_single_file(family):
    """diffusers reads our LDM file (configs from the folder, no network) back into the folder's exact weights."""
    from diffusers import StableDiffusionPipeline
    name, folder, ref, path = family
    theirs = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(ref, part).state_dict(), getattr(theirs, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_folders_images(family, tmp_path, suffix):
    name, folder, ref, path = family
    if suffix == ".ckpt":
        path = ldm.save_ldm(ldm.to_ldm(ref, name), str(tmp_path / "model.ckpt"))
    ours, expected = pipeline.load_pipeline(path), pipeline.load_pipeline(folder)
    assert ours.origin.startswith(f"single file model{suffix}: {name.upper()}, epsilon")
    assert ours.origin.endswith("(SD1 family)") if name == "sd1" else "(A1111's probe: " in ours.origin
    for part in ("unet", "vae", "text_encoder"):  # the same configs, but for the family's image size
        assert without_size(getattr(ours, part).config) == without_size(getattr(expected, part).config), part
    assert torch.equal(ours.tokenizer(["wow!! a cat"]), expected.tokenizer(["wow!! a cat"]))  # SD2 pads with "!"
    assert torch.equal(images(ours), images(expected))


def test_v_prediction_from_the_marker_key(tmp_path):
    """A `v_pred` key makes an SD2 file a 768-px v-model: the folder saved with prediction_type v_prediction."""
    folder = str(tmp_path / "v")
    ref = ldm.make_family_dir(folder, "sd2", seed=3, prediction_type="v_prediction")
    path = ldm.save_ldm(ldm.to_ldm(ref, "sd2", v_pred_marker=True), str(tmp_path / "v.safetensors"))
    pipe = pipeline.load_pipeline(path)
    assert "v_prediction (the file's v_pred key)" in pipe.origin and pipe.unet.config.sample_size == 96
    assert torch.equal(images(path), images(folder))
    # --prediction-type overrides the file, and says so
    pipe = pipeline.load_pipeline(path, prediction_type="epsilon")
    assert pipe.scheduler_config["prediction_type"] == "epsilon" and "epsilon (--prediction-type)" in pipe.origin


@pytest.mark.parametrize("bias, expected", [(-2.0, "v_prediction"), (0.0, "epsilon")])
def test_probe_is_a1111s_rule(tmp_path, bias, expected):
    """A1111's rule: v when mean(ε(x = 0.5, t = 999) − x) < −1. A UNet whose conv_out is zero except its bias
    outputs exactly that bias, so mean(output − x) = bias − 0.5: −2.5 is v, −0.5 is ε."""
    ref = ldm.make_family_dir(str(tmp_path / "m"), "sd2", seed=4)
    with torch.no_grad():
        ref.unet.conv_out.weight.zero_()
        ref.unet.conv_out.bias.fill_(bias)
    path = ldm.save_ldm(ldm.to_ldm(ref, "sd2"), str(tmp_path / "p.safetensors"))
    pipe = pipeline.load_pipeline(path)
    assert pipe.scheduler_config["prediction_type"] == expected
    assert f"A1111's probe: mean(ε(x=0.5, t=999) − x) = {bias - 0.5:.2f}" in pipe.origin


def test_ema_weights(tmp_path):
    """With --ema the UNet comes from model_ema.* (keys without dots), else from model.diffusion_model.*."""
    folder = str(tmp_path / "m")
    ref = ldm.make_family_dir(folder, "sd1", seed=5)
    other = ldm.make_family_dir(str(tmp_path / "other"), "sd1", seed=6)
    path = ldm.save_ldm(ldm.to_ldm(other, "sd1", ema_unet=ref.unet), str(tmp_path / "ema.safetensors"))
    ema = pipeline.load_pipeline(path, ema=True)
    assert "EMA UNet" in ema.origin
    assert all(torch.equal(v, ref.unet.state_dict()[k]) for k, v in ema.unet.state_dict().items())
    plain = pipeline.load_pipeline(path)
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in plain.unet.state_dict().items())
    no_ema = ldm.save_ldm(ldm.to_ldm(ref, "sd1"), str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="no EMA weights"):
        pipeline.load_pipeline(no_ema, ema=True)
    with pytest.raises(UserError, match="drop --ema"):
        pipeline.load_pipeline(folder, ema=True)


def test_unet_only_file_and_folders_for_the_rest(family, tmp_path):
    name, folder, ref, path = family
    unet_only = ldm.save_ldm(ldm.to_ldm(ref, name, parts=("unet",)), str(tmp_path / "unet.safetensors"))
    with pytest.raises(UserError) as e:
        pipeline.load_pipeline(unet_only)
    assert "holds no VAE (first_stage_model.*) and no text encoder" in str(e.value)
    assert "--vae FOLDER and --text-encoder FOLDER" in str(e.value)
    with pytest.raises(UserError, match="--text-encoder FOLDER"):
        pipeline.load_pipeline(unet_only, vae=os.path.join(folder, "vae"))
    kw = dict(vae=os.path.join(folder, "vae"), text_encoder=folder)  # a part's folder, or a model folder with it
    assert torch.equal(images(unet_only, **kw), images(folder))


def test_full_size_configs_are_the_published_ones():
    """At SD1.5 and SD2.1 shapes (meta tensors: no memory) the family, UNet, VAE and text configs read from an LDM
    file are the published ones: 8 heads vs 64-dim heads, conv vs Linear projections, CLIP-L vs OpenCLIP-H."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from test_unet import SD15_CONFIG, SD21_CONFIG
    vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = {"SD1": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
            "SD2": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23)}
    for fam, config in (("SD1", SD15_CONFIG), ("SD2", SD21_CONFIG)):
        with torch.device("meta"):
            ref = SimpleNamespace(unet=UNet2DConditionModel.from_config(config), vae=AutoencoderKL(**vae_kw),
                                  text_encoder=CLIPTextModel(CLIPTextConfig(**text[fam])))
        sd = ldm.to_ldm(ref, fam.lower())
        unet_sd = singlefile.rename_unet({k[len(singlefile.UNET):]: v for k, v in sd.items() if k.startswith(singlefile.UNET)})
        assert singlefile.family(unet_sd, "x") == fam
        got = singlefile.unet_config(unet_sd, fam)
        assert {k: v for k, v in got.items() if k != "sample_size"} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in ref.unet.config.items() if k in got and k != "sample_size"}
        got = singlefile.vae_config(singlefile.rename_vae({k[len(singlefile.VAE):]: v for k, v in sd.items()
                                                            if k.startswith(singlefile.VAE)}))
        assert got["block_out_channels"] == [128, 256, 512, 512] and got["layers_per_block"] == 2
        config, _ = singlefile.text_encoder({k: v for k, v in sd.items() if k.startswith("cond_stage_model.")
                                             and ".resblocks.23." not in k and not k.endswith(("projection", "scale"))})
        assert config == dict(text[fam], vocab_size=49408, max_position_embeddings=77,
                              hidden_act="quick_gelu" if fam == "SD1" else "gelu")


def test_sd2_drops_only_the_unused_last_layer():
    """SD2 files hold OpenCLIP ViT-H's 24 layers and use 23; files converted back from diffusers hold the 23 only."""
    keys = lambda n: {f"cond_stage_model.model.transformer.resblocks.{i}.ln_1.weight" for i in range(n)}  # noqa: E731
    assert singlefile.unused_resblock(keys(24)) == "cond_stage_model.model.transformer.resblocks.23."
    assert singlefile.unused_resblock(keys(23)) is None
    assert singlefile.unused_resblock(keys(3)) == "cond_stage_model.model.transformer.resblocks.2."
    assert singlefile.unused_resblock(set()) is None


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(family, tmp_path, suffix):
    name, folder, ref, path = family
    whole = ldm.save_ldm(ldm.to_ldm(ref, name), str(tmp_path / f"whole{suffix}"))
    data = open(whole, "rb").read()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        pipeline.load_pipeline(str(cut))


def test_foreign_files(tmp_path):
    lora_like = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora_like)
    with pytest.raises(UserError, match="holds no Stable Diffusion UNet"):
        pipeline.load_pipeline(lora_like)
    no_attention = str(tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.conv.weight": torch.zeros(1),
               "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, no_attention)
    with pytest.raises(UserError, match="UNet without cross-attention; it is not an SD1.x / SD2.x / SDXL"):
        pipeline.load_pipeline(no_attention)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="neither .safetensors nor .ckpt"):
        pipeline.load_pipeline(str(tmp_path / "notes.txt"))


def test_pickled_objects_are_not_unpickled(tmp_path):
    """A .ckpt that pickles anything but tensors and containers is refused by torch.load(weights_only=True)."""
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "obj": SimpleNamespace(a=1)}, path)
    with pytest.raises(UserError, match=r"pickled objects other than tensors \(types.SimpleNamespace\)"):
        pipeline.load_pipeline(path)


def test_text_encoder_of_another_width(family, tiny_model, tmp_path):
    name, folder, ref, path = family
    with pytest.raises(UserError, match="the text encoder is 32 wide but the UNet attends to 128-wide text"):
        pipeline.load_pipeline(path, text_encoder=tiny_model[0])
    with pytest.raises(UserError, match="neither a text_encoder/ folder"):
        pipeline.load_pipeline(path, text_encoder=str(tmp_path))


def test_wrong_prediction_type(family):
    name, folder, ref, path = family
    with pytest.raises(UserError, match="prediction type 'v' is not one of epsilon, v_prediction"):
        pipeline.load_pipeline(path, prediction_type="v")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "npo.py"), "info", "--model", path, "--prediction-type", "v"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'v'" in r.stderr


# ---- the command line ---------------------------------------------------------------------------------------

def test_cli_sample_and_info_take_a_file(family, tmp_path, capsys):
    name, folder, ref, path = family
    assert npo.main(["info", "--model", path]) == 0
    assert f"single file model.safetensors: {name.upper()}" in capsys.readouterr().out
    assert npo.main(["sample", "--model", path, "--steps", "1", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "a.png")]) == 0
    assert "single file model.safetensors" in capsys.readouterr().err
    assert npo.main(["sample", "--model", path, "--ema", "--out", str(tmp_path / "b.png")]) == 2
    assert "no EMA weights" in capsys.readouterr().err and not (tmp_path / "b.png").exists()


def test_cli_train_takes_a_file(family, pairs, tmp_path):
    """One DPO step from the single file trains the offset the same step from the folder trains."""
    name, folder, ref, path = family
    for model, out in ((folder, "from_folder"), (path, "from_file")):
        assert npo.main(["train", "--model", model, "--data", pairs, "--out", str(tmp_path / out), "--steps", "1",
                         "--resolution", "16", "--device", "cpu"]) == 0
    a, b = (load_file(str(tmp_path / out / "lora.safetensors")) for out in ("from_folder", "from_file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- SDXL base (Stability's layout: conditioner.embedders.0 / .1 for the two text encoders, label_emb) ---------

ATOL = 1e-4  # images in [0, 1], as test_sdxl.py: fp32 reordering noise is ~1e-6, a visible change 4e-3


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """(folder, its reference modules, the single file written from them) of the tiny SDXL family (tests/ldm.py):
    64-dim heads, transformer depths [1, 2, 1] per level, bigG's projection 192 -> 96."""
    folder = str(tmp_path_factory.mktemp("sdxl"))
    ref = ldm.make_sdxl_family_dir(folder)
    return folder, ref, ldm.save_ldm(ldm.to_ldm(ref, "sdxl"), os.path.join(folder, "model.safetensors"))


def test_sdxl_converter_matches_diffusers_from_single_file(sdxl_file):
    from diffusers import StableDiffusionXLPipeline
    folder, ref, path = sdxl_file
    theirs = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(ref, part).state_dict(), getattr(theirs, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part


def test_sdxl_file_loads_as_its_folder(sdxl_file):
    """The same configs (but the image size: the file's is SDXL base's 1024 px), the same weights, tokenizers and
    scheduler: a missed transpose of bigG's projection or a wrong depth per level cannot load at these shapes."""
    folder, ref, path = sdxl_file
    ours, expected = pipeline.load_pipeline(path), pipeline.load_pipeline(folder)
    assert ours.origin == "single file model.safetensors: SDXL, epsilon (SDXL family)"
    assert ours.is_sdxl and ours.force_zeros_for_empty_prompt and ours.unet.config.sample_size == 128
    assert ours.unet.config.transformer_layers_per_block == [1, 2, 1]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, part), getattr(expected, part)
        assert without_size(a.config) == without_size(b.config), part
        want = b.state_dict()
        assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in a.state_dict().items()), part
    assert ours.vae.scaling_factor == 0.13025 and ours.ddim_config() == expected.ddim_config()
    for tok in ("tokenizer", "tokenizer_2"):  # tokenizer 1 pads with EOS, tokenizer 2 with "!"
        assert torch.equal(getattr(ours, tok)(["wow!! a cat"]), getattr(expected, tok)(["wow!! a cat"]))
    half = pipeline.load_pipeline(path, dtype=torch.bfloat16)  # the force_upcast VAE stays in float32
    assert next(half.vae.parameters()).dtype == torch.float32 and next(half.unet.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("negative", [None, "ugly"])
def test_sdxl_file_gives_the_folders_and_diffusers_images(sdxl_file, negative):
    """DDIM from SDXL's scheduler config; no negative prompt is zeros (force_zeros_for_empty_prompt). The file's
    images equal the folder's up to fp32 noise (the weights are equal, but memory-mapped at other offsets, which
    changes the summation order of some CPU kernels) and StableDiffusionXLPipeline's on the reference modules."""
    from conftest import diffusers_sdxl_pipeline
    folder, ref, path = sdxl_file
    kw = dict(steps=2, guidance=5.0, height=16, width=16)
    ours = guided.generate(pipeline.load_pipeline(path), ["a red circle", "a cat"], [1, 2], negative, **kw)
    folders = guided.generate(pipeline.load_pipeline(folder), ["a red circle", "a cat"], [1, 2], negative, **kw)
    assert (ours - folders).abs().max() / 2 <= ATOL
    theirs = diffusers_sdxl_pipeline(folder, vars(ref))(
        "a cat", negative_prompt=negative, num_inference_steps=2, guidance_scale=5.0, height=16, width=16,
        output_type="pt", generator=torch.Generator().manual_seed(2)).images
    assert (ours[1:] / 2 + 0.5).clamp(0, 1).sub(theirs).abs().max() <= ATOL


def test_sdxl_published_configs(tmp_path):
    """At SDXL base's shapes (meta tensors: no memory) the family and the UNet, VAE and text encoder configs read from
    a single file are the published ones (stabilityai/stable-diffusion-xl-base-1.0), and every part loads strictly
    into our modules: transformer depths [1, 2, 10], 2816 = 1280 + 6 x 256, bigG's 1280 x 1280 projection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from npo import clip
    from npo import unet
    from test_sdxl import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET
    vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = lambda cfg: CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})  # noqa: E731
    with torch.device("meta"):
        ref = SimpleNamespace(unet=UNet2DConditionModel.from_config(SDXL_UNET), vae=AutoencoderKL(**vae_kw),
                              text_encoder=CLIPTextModel(text(SDXL_TEXT)),
                              text_encoder_2=CLIPTextModelWithProjection(text(SDXL_TEXT_2)))
    sd = ldm.to_ldm(ref, "sdxl")
    chosen = singlefile.choose_keys(set(sd), singlefile.PARTS, False, "xl")
    sf = singlefile.unpack("xl", {part: {k: sd[k] for k in names} for part, names in chosen.items()})
    assert sf.family == singlefile.SDXL
    config, state = sf.parts["unet"]
    published = dict(SDXL_UNET, upcast_attention=False)  # diffusers reads null as false
    assert config == {k: published[k] for k in config}
    unet.build_unet(unet.unet_config(config, "xl"), state, "xl")
    config, state = sf.parts["vae"]
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["scaling_factor"] == 0.13025
    unet.build_vae(unet.vae_config(config, "xl"), state, "xl")
    for part, published, projection in (("text_encoder", SDXL_TEXT, False), ("text_encoder_2", SDXL_TEXT_2, True)):
        config, state = sf.parts[part]
        assert config == {k: published[k] for k in config}
        clip.build_text_encoder(clip.text_config(config, "xl"), state, "xl", projection=projection)


def test_sdxl_bad_files(sdxl_file, tmp_path):
    folder, ref, path = sdxl_file
    sd = load_file(path)
    no_big_g = str(tmp_path / "half.safetensors")  # as the SDXL refiner, which has bigG alone (as embedders.0)
    save_file({k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.1.")}, no_big_g)
    with pytest.raises(UserError, match="without SDXL base's second text encoder"):
        pipeline.load_pipeline(no_big_g)
    with pytest.raises(UserError, match="no EMA weights"):
        pipeline.load_pipeline(path, ema=True)
    unet_only = str(tmp_path / "unet.safetensors")  # the UNet alone serves --eta-model / extract-lora
    save_file({k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, unet_only)
    want = ref.unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipeline.load_unet(unet_only).state_dict().items())


def test_cli_samples_an_sdxl_file(sdxl_file, tmp_path, capsys):
    folder, ref, path = sdxl_file
    assert npo.main(["info", "--model", path]) == 0
    assert "single file model.safetensors: SDXL, epsilon" in capsys.readouterr().out
    assert npo.main(["sample", "--model", path, "--steps", "1", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "a.png")]) == 0
    assert "CFG scale: 5.0" in Image.open(tmp_path / "a.png").text["parameters"]  # SDXL's default guidance
