"""Community LoRAs as η: text-encoder keys (kohya `lora_te_`, diffusers `text_encoder.`), several files summed with
weights, and the LyCORIS types we refuse. References: diffusers' `load_lora_weights` / `set_adapters` on the same
files, and the two-pipeline reference of eq. 10 (test_sample.py) with the text encoder inside it."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from npo import guided
from npo import images
from npo import lora
import npo
from npo import sample
from npo import pipeline
from npo.checkpoint import UserError
from conftest import diffusers_pipeline
from test_sample import ATOL, to01, two_unet_reference

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # attention and LoCon's 3x3 convs
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # every Linear of CLIP's layers


def lora_tensors(model, targets, rank, seed, size=0.3):
    """{module name: (down, up)}: random LoRA factors, in kohya/peft shapes, for the Linear / Conv2d modules of a
    reference model whose names end with a target (a conv's down has the conv's kernel, its up is 1x1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Conv2d):
            down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            down, up = (rank, m.in_features), (m.out_features, rank)
        out[name] = (torch.randn(down, generator=g) * size / np.prod(down[1:]) ** 0.5,
                     torch.randn(up, generator=g) * size / rank ** 0.5)
    return out


def write_kohya(path, refs, seed, rank=4, alpha=2.0):
    """A kohya LoRA with UNet and text-encoder keys, named by kohya's rule from the reference modules' names:
    `lora_unet_<name with _>` and `lora_te_text_model_<name with _>` (kohya's CLIP names carry `text_model.`,
    which transformers 5 dropped from its modules)."""
    sd = {}
    for prefix, model, targets in (("lora_unet_", refs["unet"], UNET_TARGETS),
                                   ("lora_te_text_model_", refs["text_encoder"], TEXT_TARGETS)):
        for name, (down, up) in lora_tensors(model, targets, rank, seed).items():
            key = prefix + name.replace(".", "_")
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    save_file(sd, path)
    return path


def write_diffusers(path, refs, seed, rank=4, alpha=8.0):
    """The same kind of file in diffusers' format: `unet.<name>.lora_A.weight`, `text_encoder.<name>.lora_B.weight`,
    the LoraConfig in the `lora_adapter_metadata` string, as `save_lora_weights` writes it."""
    import json
    sd, meta = {}, {}
    for part, model, targets in (("unet", refs["unet"], UNET_TARGETS), ("text_encoder", refs["text_encoder"], TEXT_TARGETS)):
        for name, (down, up) in lora_tensors(model, targets, rank, seed).items():
            sd.update({f"{part}.{name}.lora_A.weight": down, f"{part}.{name}.lora_B.weight": up})
        meta.update({f"{part}.r": rank, f"{part}.lora_alpha": alpha, f"{part}.target_modules": list(targets)})
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    return path


@pytest.fixture(scope="module")
def community(tiny_model, tmp_path_factory):
    """Two kohya files and one diffusers file, each with UNet (attention + LoCon convs) and text-encoder offsets."""
    path, refs = tiny_model
    folder = tmp_path_factory.mktemp("community")
    return dict(a=write_kohya(str(folder / "a.safetensors"), refs, seed=1),
                b=write_kohya(str(folder / "b.safetensors"), refs, seed=2, rank=2, alpha=1.0),
                d=write_diffusers(str(folder / "d.safetensors"), refs, seed=3))


def reference_images(tiny_model, files, weights, prompts, seeds, steps=5, guidance=6.0, negative="ugly"):
    """diffusers' StableDiffusionPipeline with the files loaded by `load_lora_weights`, weighted by `set_adapters`."""
    path, refs = tiny_model
    ref_pipe = diffusers_pipeline(path, refs)
    for k, f in enumerate(files):
        ref_pipe.load_lora_weights(f, adapter_name=f"l{k}")
    ref_pipe.set_adapters([f"l{k}" for k in range(len(files))], adapter_weights=list(weights))
    return ref_pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                    negative_prompt=[negative] * len(prompts), output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def ours(tiny_model, files, weights, prompts, seeds, steps=5, guidance=6.0, negative="ugly", **kw):
    pipe = pipeline.load_pipeline(tiny_model[0])
    guided.load_offset(pipe, list(zip(files, weights)), "eta")
    return pipe, guided.generate(pipe, prompts, seeds, negative, steps=steps, guidance=guidance, height=32, width=32,
                                   **kw)


@pytest.mark.parametrize("which", ["a", "d"], ids=["kohya", "diffusers"])
def test_text_encoder_lora_matches_load_lora_weights(tiny_model, community, which):
    prompts, seeds = ["a red circle", "a blue square"], [1, 2]
    ref = reference_images(tiny_model, [community[which]], [1.0], prompts, seeds)
    pipe, out = ours(tiny_model, [community[which]], [1.0], prompts, seeds)
    assert (to01(out) - ref).abs().max() <= ATOL
    # both parts were applied: 12 text-encoder layers (6 per CLIP layer, 2 layers) and the UNet's, LoCon convs included
    assert len(lora.offsets(pipe.text_encoder, "eta")) == 12
    assert any(name.endswith("resnets.0.conv1") for name in lora.offsets(pipe.unet, "eta"))
    # and the text-encoder part matters: without it the images differ visibly
    lora.remove(pipe.text_encoder, "eta")
    without = guided.generate(pipe, prompts, seeds, "ugly", steps=5, guidance=6.0, height=32, width=32)
    assert (to01(without) - ref).abs().max() > 100 * ATOL


def test_two_loras_with_weights_match_set_adapters(tiny_model, community):
    prompts, seeds = ["a green triangle"], [4]
    files, weights = [community["a"], community["b"]], [0.8, -0.5]
    ref = reference_images(tiny_model, files, weights, prompts, seeds)
    _, out = ours(tiny_model, files, weights, prompts, seeds)
    assert (to01(out) - ref).abs().max() <= ATOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_npo_alpha_weighs_the_text_encoder_part(tiny_model, community, offsets, sampler):  # noqa: F811
    """Eq. 10 with a text-encoder η: c' is encoded with α·η_te, c with η_te. The reference's negative pipeline holds
    η at α and δ at β on its UNet and its text encoder (set_adapters), the positive one η fused at 1."""
    from test_sample import SD15_SCHEDULER, dpm_scheduler
    path, refs = tiny_model
    files = {"eta": community["a"], "delta": offsets["delta"]}
    prompts, seeds = ["a red circle", "a yellow square"], [5, 9]
    scheduler = dpm_scheduler(SD15_SCHEDULER) if sampler == "dpmpp-2m" else None
    ref = two_unet_reference(path, refs, files, prompts, seeds, "ugly", 6, 6.0, 0.4, 0.7, scheduler=scheduler)
    pipe = pipeline.load_pipeline(path)
    if scheduler is not None:
        pipe.scheduler_config = SD15_SCHEDULER
    guided.load_offset(pipe, [(files["eta"], 1.0)], "eta")
    guided.load_offset(pipe, [(files["delta"], 1.0)], "delta")
    for mode in ("batched", "merged"):
        out = guided.generate(pipe, prompts, seeds, "ugly", steps=6, guidance=6.0, alpha=0.4, beta=0.7, height=32,
                                width=32, mode=mode, sampler=sampler)
        assert (to01(out) - ref).abs().max() <= ATOL, mode


def test_weighted_sum_is_the_sum_of_the_offsets():
    """ΔW of the side-by-side LoRA equals Σ_k w_k (alpha_k / r_k) up_k down_k, for Linear and conv factors."""
    g = torch.Generator().manual_seed(0)
    a = {"lin": (torch.randn(3, 10, generator=g), torch.randn(6, 3, generator=g), 1.5),
         "conv": (torch.randn(2, 4, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g), 2.0)}
    b = {"lin": (torch.randn(2, 10, generator=g), torch.randn(6, 2, generator=g), 4.0)}
    total = lora.weighted_sum([a, b], [0.7, -1.3])
    assert list(total) == ["lin", "conv"]

    def delta(down, up, alpha):
        return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    assert torch.allclose(delta(*total["lin"]), 0.7 * delta(*a["lin"]) - 1.3 * delta(*b["lin"]), atol=1e-5)
    assert torch.allclose(delta(*total["conv"]), 0.7 * delta(*a["conv"]), atol=1e-5)
    assert lora.weighted_sum([a], [1.0]) is a


def test_parse_lora_rule(tmp_path):
    assert sample.parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert sample.parse_lora("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert sample.parse_lora("dir/a.safetensors:-1e-1") == ("dir/a.safetensors", -0.1)
    assert sample.parse_lora(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert sample.parse_lora(r"C:\loras\a.safetensors:0.5") == (r"C:\loras\a.safetensors", 0.5)
    assert sample.parse_lora("my:lora.safetensors") == ("my:lora.safetensors", 1.0)
    odd = tmp_path / "b:2"  # an existing file whose name ends like a weight is a path
    odd.write_bytes(b"")
    assert sample.parse_lora(str(odd)) == (str(odd), 1.0)


def test_cli_several_loras(tiny_model, community, tmp_path):
    path, _ = tiny_model
    assert npo.main(["sample", "--model", path, "--prompt", "a red circle", "--lora", f"{community['a']}:0.8",
                     "--lora", f"{community['b']}:-0.5", "--steps", "3", "--height", "32", "--width", "32",
                     "--seed", "2", "--out", str(tmp_path / "x.png")]) == 0
    picture = Image.open(tmp_path / "x.png")
    assert 'Lora: "a.safetensors:0.8; b.safetensors:-0.5"' in picture.text["parameters"]  # quoted as A1111 quotes
    _, expected = ours(tiny_model, [community["a"], community["b"]], [0.8, -0.5], ["a red circle"], [2], steps=3,
                       guidance=7.5, negative="")
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(images.to_pil(expected)[0]))


# ---- refused files ----------------------------------------------------------------------------------------

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
OTHER_KINDS = {
    "LoHa": {f"{Q}.hada_w1_a": (4, 32), f"{Q}.hada_w1_b": (4, 32), f"{Q}.hada_w2_a": (32, 4), f"{Q}.hada_w2_b": (4, 32)},
    "LoKr": {f"{Q}.lokr_w1": (4, 4), f"{Q}.lokr_w2": (8, 8)},
    "OFT": {f"{Q}.oft_blocks": (4, 8, 8)},
    "DoRA": {f"{Q}.lora_down.weight": (4, 32), f"{Q}.lora_up.weight": (32, 4), f"{Q}.dora_scale": (32, 1)},
    "LoCon with a Tucker core": {f"{Q}.lora_down.weight": (4, 32), f"{Q}.lora_mid.weight": (4, 4, 3, 3),
                                 f"{Q}.lora_up.weight": (32, 4)},
    "SDXL": {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 32)},
}


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_lycoris_and_sdxl_files_are_refused_by_name(tiny_model, tmp_path, kind):
    f = str(tmp_path / "x.safetensors")
    save_file({k: torch.zeros(shape) for k, shape in OTHER_KINDS[kind].items()}, f)
    pipe = pipeline.load_pipeline(tiny_model[0])
    with pytest.raises(UserError, match=kind):
        guided.load_offset(pipe, [(f, 1.0)], "eta")
    assert not lora.lora_layers(pipe.unet) and not lora.lora_layers(pipe.text_encoder)  # nothing half-loaded
    if kind == "LoHa":  # and on the command line: exit 2, one sentence
        assert npo.main(["sample", "--model", tiny_model[0], "--lora", f, "--steps", "1", "--height", "32",
                         "--width", "32", "--out", str(tmp_path / "o.png")]) == 2
        assert not (tmp_path / "o.png").exists()


def test_second_file_bad_leaves_nothing(tiny_model, community, tmp_path):
    """Every file is read and checked before any offset is attached."""
    bad = str(tmp_path / "bad.safetensors")
    save_file({f"{Q}.hada_w1_a": torch.zeros(4, 32)}, bad)
    pipe = pipeline.load_pipeline(tiny_model[0])
    with pytest.raises(UserError, match="LoHa"):
        guided.load_offset(pipe, [(community["a"], 1.0), (bad, 1.0)], "eta")
    assert not lora.lora_layers(pipe.unet) and not lora.lora_layers(pipe.text_encoder)


def test_text_encoder_keys_refused_where_only_the_unet_takes_offsets(tiny_model, community):
    pipe = pipeline.load_pipeline(tiny_model[0])
    with pytest.raises(UserError, match="text-encoder LoRA keys"):
        lora.load_lora(pipe.unet, community["a"], "eta")


def test_older_diffusers_text_encoder_names(tiny_model, community, tmp_path):
    """diffusers' 2023 files name CLIP's projections `self_attn.to_q_lora.down` and its MLP `mlp.fc1.lora_linear_layer
    .down`, under `text_encoder.text_model.`: they read as the same offsets as today's `q_proj.lora_A` names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    def older(key):
        if not key.startswith("text_encoder."):
            return key
        key = "text_encoder.text_model." + key.removeprefix("text_encoder.")
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        key = re.sub(r"\.self_attn\.(q|k|v|out)_proj\.lora\.", r".self_attn.to_\1_lora.", key)
        return re.sub(r"\.mlp\.(fc[12])\.lora\.", r".mlp.\1.lora_linear_layer.", key)
    with safe_open(community["d"], framework="pt") as f:
        metadata = f.metadata()
    renamed = {older(k): v for k, v in load_file(community["d"]).items()}
    assert any(".self_attn.to_out_lora.up.weight" in k for k in renamed)
    assert any(".mlp.fc2.lora_linear_layer.down.weight" in k for k in renamed)
    save_file(renamed, str(tmp_path / "older.safetensors"), metadata)
    pipes = [pipeline.load_pipeline(tiny_model[0]) for _ in range(2)]
    for pipe, f in zip(pipes, (community["d"], str(tmp_path / "older.safetensors"))):
        guided.load_offset(pipe, [(f, 1.0)], "eta")
    new, old = (lora.offset_state_dict(p.text_encoder, "eta") for p in pipes)
    assert new.keys() == old.keys() and len(new) == 36 and all(torch.equal(new[k], old[k]) for k in new)
