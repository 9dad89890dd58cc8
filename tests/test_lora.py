"""lora.py against its invariants (multiplier 0 is the base, per-sample rows, merge/unmerge) and against diffusers:
a file we write loads into diffusers with the same output, and diffusers/peft files load into ours likewise."""
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from npo import lora
from npo import unet
from npo.checkpoint import UserError
from conftest import TINY_TEXT, TINY_UNET, TINY_VAE, TOKENIZER_DIR, randomize, randomize_offset

# Same reasoning as test_unet.py: fp32 reordering noise (batched vs single rows, fused vs unfused weights, ours vs
# diffusers) is ~1e-7 relative; a wrong scale, alpha, key or multiplier row moves the output by O(1e-2) or more
# (the offsets below change the output by ~10-20%), so 1e-4 of the output's magnitude separates them.
RTOL = 1e-4
ALL_KINDS = "to_q,to_k,to_v,to_out.0,conv1,proj_in,time_emb_proj,ff.net.2"  # attention, 3x3 and 1x1 convs, (B, C) input


def assert_close(ours, ref, rtol=RTOL):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale, f"max |ours - ref| = {err:.3g} > {rtol} * {scale:.3g}"




@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    path = str(tmp_path_factory.mktemp("lora_unet"))
    torch.manual_seed(0)
    randomize(UNet2DConditionModel(**TINY_UNET), seed=11).save_pretrained(path)
    return path


def reference_unet(unet_dir):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(unet_dir).eval()


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]), torch.randn(batch, 7, 32, generator=g)


# ----------------------------------------------------------------------------------------------------------
# Invariants of our own layers.

def hand_merged_reference(unet_dir, model, name, m=1.0):
    """diffusers' UNet with W + m · (alpha / r) · up @ down written into each targeted layer by hand."""
    ref = reference_unet(unet_dir)
    with torch.no_grad():
        for layer, offset in lora.offsets(model, name).items():
            down, up = offset.lora_down.weight, offset.lora_up.weight
            w = ref.get_submodule(layer).weight
            delta = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])  # a conv's 1x1 up folds in
            w += m * float(offset.alpha) / offset.rank * delta.view_as(w)
    return ref


def test_multiplier_zero_is_the_base_model(unet_dir):
    model = unet.load_unet(unet_dir)
    x, t, c = inputs()
    with torch.no_grad():
        base = model(x, t, c)
        lora.add_offset(model, "eta", rank=4, alpha=2, targets=ALL_KINDS)
        randomize_offset(model, "eta", seed=1)
        for m in (1.0, 0.5):  # the offset is what the LoRA formula says it is
            with lora.multipliers(model, eta=m):
                assert_close(model(x, t, c), hand_merged_reference(unet_dir, model, "eta", m)(x, t, c).sample)
        with lora.multipliers(model, eta=0.0):
            assert torch.equal(model(x, t, c), base)
        with lora.multipliers(model, eta=[0.0, 0.0]):  # the per-sample path at zero adds exact zeros
            assert torch.equal(model(x, t, c), base)


def test_per_sample_multipliers_equal_separate_runs(unet_dir):
    """[a, b] on a batch of 2 gives each row what it gets alone at a and at b: the batched CFG forward of NPO."""
    model = unet.load_unet(unet_dir)
    lora.add_offset(model, "eta", rank=4, targets=ALL_KINDS)
    lora.add_offset(model, "delta", rank=2, alpha=1, targets="to_k,to_v,conv1")
    randomize_offset(model, "eta", seed=1)
    randomize_offset(model, "delta", seed=2)
    x, t, c = inputs()
    alpha, beta = 0.3, 0.8
    with torch.no_grad():
        with lora.multipliers(model, eta=torch.tensor([alpha, 1.0]), delta=[beta, 0.0]):
            both = model(x, t, c)
        with lora.multipliers(model, eta=alpha, delta=beta):
            neg = model(x[:1], t[:1], c[:1])
        with lora.multipliers(model, eta=1.0, delta=0.0):
            pos = model(x[1:], t[1:], c[1:])
    assert_close(both[:1], neg)
    assert_close(both[1:], pos)
    assert all(o.multiplier == 1.0 for o in lora.offsets(model, "eta").values())  # restored after the block


def test_per_sample_multiplier_of_wrong_length(unet_dir):
    model = unet.load_unet(unet_dir)
    lora.add_offset(model, "eta", rank=2)
    x, t, c = inputs()
    with lora.multipliers(model, eta=[1.0, 0.0, 1.0]), pytest.raises(ValueError, match="3 values for a batch of 2"):
        model(x, t, c)


def test_offsets_add_and_merge(unet_dir):
    """Two runtime offsets equal one weight set θ + a·η + b·δ (merged in place, or as a merged copy); unmerge
    restores θ bit for bit. Merged vs unmerged differ only by fp32 rounding of W + ΔW (≈1e-7 relative)."""
    model = unet.load_unet(unet_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_offset(model, "eta", rank=4, targets=ALL_KINDS)
    lora.add_offset(model, "delta", rank=3, alpha=6, targets="to_q,to_out.0,proj_in")
    randomize_offset(model, "eta", seed=1)
    randomize_offset(model, "delta", seed=2)
    x, t, c = inputs()
    a, b = 0.6, 1.3
    with torch.no_grad():
        with lora.multipliers(model, eta=a, delta=b):
            runtime = model(x, t, c)

        # a second UNet from the merged copy: the authors' way (two weight sets)
        copy = unet.UNet2DCondition(model.config)
        copy.load_state_dict(lora.merged_state_dict(model, {"eta": a, "delta": b}), strict=True)
        assert_close(copy(x, t, c), runtime)

        lora.merge(model, {"eta": a, "delta": b})
        assert_close(model(x, t, c), runtime)  # runtime multipliers are ignored while merged
        lora.unmerge(model)
        for k, v in base_state.items():
            assert torch.equal(model.state_dict()[k], v), k
        with lora.multipliers(model, eta=a, delta=b):
            assert torch.equal(model(x, t, c), runtime)


def test_layer_sums_its_offsets():
    """y = base(x) + Σ_k m_k (alpha_k / r_k) up_k(down_k(x)), for a Linear and a 3x3 strided Conv2d."""
    torch.manual_seed(0)
    for base, x in ((nn.Linear(6, 5), torch.randn(2, 3, 6)), (nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 8, 8))):
        model = nn.Sequential(base)
        lora.add_offset(model, "eta", rank=2, alpha=1, targets="0")
        lora.add_offset(model, "delta", rank=3, alpha=6, targets="0")
        randomize_offset(model, "eta", 1)
        randomize_offset(model, "delta", 2)
        layer = model[0]
        assert isinstance(layer, type(base)) and layer.weight is base.weight
        lora.set_multipliers(model, eta=[0.5, 2.0], delta=-1.0)
        eta, delta = layer.offsets["eta"], layer.offsets["delta"]
        m = torch.tensor([0.5, 2.0]).view(-1, *[1] * (x.ndim - 1))
        expected = base(x) + m * 0.5 * eta.lora_up(eta.lora_down(x)) - 2.0 * delta.lora_up(delta.lora_down(x))
        assert_close(model(x), expected, rtol=1e-6)
        # ΔW as a weight: the conv's 1x1 up folds into its down kernel
        fused = base.weight + 0.5 * eta.delta_weight()
        lora.set_multipliers(model, eta=0.5, delta=0.0)
        ref = nn.functional.linear(x, fused, base.bias) if isinstance(base, nn.Linear) else \
            nn.functional.conv2d(x, fused, base.bias, stride=2, padding=1)
        assert_close(model(x), ref, rtol=1e-6)


def test_bf16_base_keeps_fp32_lora(unet_dir):
    model = unet.load_unet(unet_dir, dtype=torch.bfloat16)
    params = lora.add_offset(model, "eta", rank=4)
    assert {p.dtype for p in params} == {torch.float32} and all(p.requires_grad for p in params)
    randomize_offset(model, "eta", seed=1)
    x, t, c = (v.bfloat16() if v.is_floating_point() else v for v in inputs())
    with torch.no_grad():
        y = model(x, t, c)
        assert y.dtype == torch.bfloat16
        with lora.multipliers(model, eta=0):
            assert not torch.equal(model(x, t, c), y)


def test_keys_unchanged_and_remove(unet_dir):
    model = unet.load_unet(unet_dir)
    keys = set(model.state_dict())
    lora.add_offset(model, "eta", rank=2, targets=ALL_KINDS)
    lora.add_offset(model, "delta", rank=2)
    assert keys < set(model.state_dict())  # frozen weights keep their keys; offsets add `<layer>.offsets.<name>.*`
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in model.state_dict()
    assert lora.offset_names(model) == ["delta", "eta"]
    lora.remove(model, "eta")
    assert lora.offset_names(model) == ["delta"]
    assert type(model.down_blocks[0].resnets[0].conv1) is nn.Conv2d  # eta-only layers are plain again
    lora.remove(model)
    assert set(model.state_dict()) == keys and not lora.lora_layers(model)
    with pytest.raises(UserError, match="no_such"):
        lora.add_offset(model, "eta", targets="to_q,no_such")
    lora.add_offset(model, "eta", rank=2)
    with pytest.raises(UserError, match="already has"):
        lora.add_offset(model, "eta", rank=2)


# ----------------------------------------------------------------------------------------------------------
# Files we write, read by diffusers.

def make_pipeline(unet_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=reference_unet(unet_dir),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("rank,alpha", [(4, 2.0), (3, 3.0)])
def test_written_kohya_file_loads_into_diffusers(unet_dir, tmp_path, rank, alpha):
    model = unet.load_unet(unet_dir)
    lora.add_offset(model, "delta", rank=rank, alpha=alpha, targets=ALL_KINDS)
    randomize_offset(model, "delta", seed=3)
    path = str(tmp_path / "delta.safetensors")
    lora.save_lora(model, "delta", path, role="delta", base_model="tiny-sd", metadata={"npo_beta": 1.0})
    assert os.listdir(tmp_path) == ["delta.safetensors"]  # the temporary file was renamed, none left behind

    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["npo_role"] == "delta" and meta["npo_base_model"] == "tiny-sd" and meta["npo_beta"] == "1.0"
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == alpha
    assert meta["npo_targets"] == ("attn1.to_k,attn1.to_out.0,attn1.to_q,attn1.to_v,attn2.to_k,attn2.to_out.0,attn2.to_q,"
                                   "attn2.to_v,conv1,ff.net.2,proj_in,time_emb_proj")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in keys

    pipe = make_pipeline(unet_dir)
    pipe.load_lora_weights(path, adapter_name="delta")
    x, t, c = inputs()
    with torch.no_grad():
        assert_close(model(x, t, c), pipe.unet(x, t, c).sample)
        with lora.multipliers(model, delta=0.4):
            ours = model(x, t, c)
        assert_close(ours, pipe.unet(x, t, c, cross_attention_kwargs={"scale": 0.4}).sample)
        pipe.set_adapters(["delta"], adapter_weights=[1.7])
        with lora.multipliers(model, delta=1.7):
            assert_close(model(x, t, c), pipe.unet(x, t, c).sample)

    # and back into ours, as a second copy of the same offset
    other = unet.load_unet(unet_dir)
    assert lora.load_lora(other, path, "delta")["npo_role"] == "delta"
    with torch.no_grad():
        assert torch.equal(other(x, t, c), model(x, t, c))


# ----------------------------------------------------------------------------------------------------------
# Files written by diffusers / peft, read by us.

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


@pytest.fixture(scope="module")
def peft_file(unet_dir, tmp_path_factory):
    """A diffusers UNet with a peft adapter (mixed ranks and alphas, random non-zero lora_B), saved by diffusers."""
    from peft import LoraConfig
    ref = reference_unet(unet_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False,
                        rank_pattern={"proj_in": 2}, alpha_pattern={"attn2.to_k": 1})
    ref.add_adapter(config, adapter_name="npo")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 / p[0].numel() ** 0.5)
    folder = tmp_path_factory.mktemp("peft")
    ref.save_lora_adapter(str(folder), adapter_name="npo")
    x, t, c = inputs()
    with torch.no_grad():
        outputs = {s: ref(x, t, c, cross_attention_kwargs={"scale": s}).sample for s in (1.0, 0.5)}
    return str(folder / "pytorch_lora_weights.safetensors"), outputs


def older_names(key):
    """diffusers' training scripts' `unet.<layer>.lora.down.weight` (convert_state_dict_to_diffusers)."""
    return "unet." + key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")


def attn_procs_names(key):
    """save_attn_procs (2023): `attn1.processor.to_q_lora.down.weight` for attention layers."""
    key = older_names(key)
    return re.sub(r"\.(attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?\.lora\.", r".\1.processor.\2_lora.", key)


@pytest.mark.parametrize("rename", [None, older_names, attn_procs_names])
def test_peft_file_loads_into_ours(unet_dir, peft_file, tmp_path, rename):
    path, outputs = peft_file
    if rename is not None:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        renamed = {rename(k): v for k, v in load_file(path).items()}
        assert any(".lora.down.weight" in k for k in renamed)
        assert rename is older_names or any("processor.to_out_lora.up.weight" in k for k in renamed)
        path = str(tmp_path / "renamed.safetensors")
        save_file(renamed, path, metadata)
    model = unet.load_unet(unet_dir)
    lora.load_lora(model, path, "eta")
    scales = {n.split(".")[-1] if not n.endswith(".0") else "to_out.0": o.scale for n, o in lora.offsets(model, "eta").items()}
    assert set(scales) == set(PEFT_TARGETS)
    assert lora.offsets(model, "eta")["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].scale == 1 / 4
    assert lora.offsets(model, "eta")["down_blocks.0.attentions.0.proj_in"].scale == 8 / 2
    x, t, c = inputs()
    with torch.no_grad():
        assert_close(model(x, t, c), outputs[1.0])
        with lora.multipliers(model, eta=0.5):
            assert_close(model(x, t, c), outputs[0.5])


def test_peft_save_pretrained_folder(unet_dir, peft_file, tmp_path):
    """peft's own save_pretrained: `base_model.model.<layer>.lora_A.weight`, alphas in adapter_config.json beside."""
    import json
    path, outputs = peft_file
    with safe_open(path, framework="pt") as f:
        config = f.metadata()["lora_adapter_metadata"]
    save_file({"base_model.model." + k: v for k, v in load_file(path).items()}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(json.loads(config)))
    model = unet.load_unet(unet_dir)
    lora.load_lora(model, str(tmp_path / "adapter_model.safetensors"), "eta")
    x, t, c = inputs()
    with torch.no_grad():
        assert_close(model(x, t, c), outputs[1.0])


def test_peft_file_without_alpha_has_scale_one(unet_dir, peft_file, tmp_path):
    """No metadata and no alpha keys: diffusers' convention (the training scripts save lora_alpha = r)."""
    path, _ = peft_file
    bare = str(tmp_path / "bare.safetensors")
    save_file({"unet." + k: v for k, v in load_file(path).items()}, bare)
    model = unet.load_unet(unet_dir)
    lora.load_lora(model, bare, "eta")
    assert {o.scale for o in lora.offsets(model, "eta").values()} == {1.0}


# ----------------------------------------------------------------------------------------------------------
# Bad files.

@pytest.fixture(scope="module")
def kohya_file(unet_dir, tmp_path_factory):
    model = unet.load_unet(unet_dir)
    lora.add_offset(model, "eta", rank=2, targets="to_q,conv1")
    path = str(tmp_path_factory.mktemp("kohya") / "eta.safetensors")
    lora.save_lora(model, "eta", path, role="eta")
    return path


def broken_copy(kohya_file, tmp_path, edit):
    tensors = load_file(kohya_file)
    edit(tensors)
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
BAD_EDITS = {
    "unknown key": (lambda sd: sd.update({"lora_unet_down_blocks_0_nonsense.lora_down.weight": torch.zeros(2, 4)}),
                    "lora_unet_down_blocks_0_nonsense.lora_down.weight"),
    "not a LoRA weight": (lambda sd: sd.update({f"{Q}.hada_w1_a": torch.zeros(2, 4)}), f"{Q}.hada_w1_a"),
    "misshaped": (lambda sd: sd.update({f"{Q}.lora_down.weight": torch.zeros(2, 48)}), f"{Q}.lora_down.weight (2, 48)"),
    "missing up": (lambda sd: sd.pop(f"{Q}.lora_up.weight"), f"{Q}.lora_down.weight"),
    "text encoder": (lambda sd: sd.update({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                                           torch.zeros(2, 32)}), "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    "peft text encoder": (lambda sd: sd.update({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                                torch.zeros(2, 32)}), "text_encoder.text_model.encoder.layers.0"),
    "SGM name of no layer": (lambda sd: sd.update({"lora_unet_input_blocks_9_1_proj_in.lora_down.weight":
                                                   torch.zeros(2, 32)}), "lora_unet_input_blocks_9_1_proj_in"),
}


@pytest.mark.parametrize("case", BAD_EDITS)
def test_bad_lora_files_are_refused(unet_dir, kohya_file, tmp_path, case):
    edit, expected = BAD_EDITS[case]
    path = broken_copy(kohya_file, tmp_path, edit)
    model = unet.load_unet(unet_dir)
    with pytest.raises(UserError, match=re.escape(expected)):
        lora.load_lora(model, path, "eta")
    assert not lora.lora_layers(model)  # nothing half-loaded


def test_unknown_keys_are_counted(unet_dir, kohya_file, tmp_path):
    path = broken_copy(kohya_file, tmp_path, lambda sd: sd.update(
        {f"unet.mid_block.nowhere_{i}.lora_A.weight": torch.zeros(1) for i in range(7)}))
    with pytest.raises(UserError, match=r"7 of \d+ keys .* and 4 more"):
        lora.load_lora(unet.load_unet(unet_dir), path, "eta")


def test_not_a_safetensors_file(unet_dir, tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a pickle-in-zip .ckpt renamed")
    with pytest.raises(UserError, match="not a readable safetensors"):
        lora.load_lora(unet.load_unet(unet_dir), str(path), "eta")


@pytest.mark.parametrize("changes, prediction_type, version, v2", [
    (dict(cross_attention_dim=768), None, "sd_v1", "False"),  # SD1.x: CLIP ViT-L's 768-wide text
    (dict(cross_attention_dim=1024, use_linear_projection=True), None, "sd_v2", "True"),  # SD2.x: OpenCLIP ViT-H's
    (dict(cross_attention_dim=1024, use_linear_projection=True), "v_prediction", "sd_v2_v", "True"),  # SD2.x-768
    (dict(), None, "sd_v1", "False"),  # a small width: SD1's 1x1-conv projections
    (dict(use_linear_projection=True), None, "sd_v2", "True"),  # a small width: SD2's Linear projections
])
def test_sd1_and_sd2_files_name_their_base_model_as_kohya_does(tmp_path, changes, prediction_type, version, v2):
    """kohya sd-scripts' ss_base_model_version for SD1/2 LoRAs (model_util.get_model_version_str_for_sd1_sd2: "sd",
    then "_v1" or "_v2", then "_v" for v-parameterization) and ss_v2, which A1111 reads to tell SD2 LoRAs apart."""
    model = unet.UNet2DCondition(unet.unet_config(dict(TINY_UNET, **changes), "test"))
    lora.add_offset(model, "eta", rank=2)
    path = str(tmp_path / "eta.safetensors")
    lora.save_lora(model, "eta", path, role="eta", prediction_type=prediction_type)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == v2
