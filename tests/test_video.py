"""video.py against diffusers' UNet3DConditionModel on identical random weights, the batch-major LoRA fold against
separate calls, and ModelScope-layout folders (written by diffusers' TextToVideoSDPipeline) through load_pipeline."""
import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from npo import lora
from npo import pipeline
from npo import unet
from npo import video
from npo.checkpoint import UserError
from conftest import TINY_UNET, TINY_VIDEO_UNET, randomize, randomize_offset

# fp32 reordering noise between two implementations of the same network is ~1e-7 of the output's magnitude; a wrong
# fold, norm, eps or head count moves it by O(1e-2) or more.
RTOL = 1e-5


def assert_close(ours, ref, rtol=RTOL):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale, f"max |ours - ref| = {err:.3g} > {rtol} * {scale:.3g}"


def reference_unet(seed=1, **kwargs):
    from diffusers import UNet3DConditionModel
    torch.manual_seed(0)
    return randomize(UNet3DConditionModel(**dict(TINY_VIDEO_UNET, **kwargs)), seed).eval()


def ours_from(ref):
    cfg = video.unet3d_config(dict(ref.config), "the reference's config")
    return video.build_unet3d(cfg, {k: v.clone() for k, v in ref.state_dict().items()}, "the reference's weights")


def inputs(batch=2, frames=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, size, size, generator=g), torch.tensor([10, 700, 400][:batch]),
            torch.randn(batch, 7, 32, generator=g))


@pytest.fixture(scope="module")
def pair():
    ref = reference_unet()
    return ref, ours_from(ref)


def test_unet3d_matches_diffusers(pair):
    ref, ours = pair
    x, t, c = inputs()
    with torch.no_grad():
        assert_close(ours(x, t, c), ref(x, t, c).sample)
        assert_close(ours(x[:1], 999, c[:1]), ref(x[:1], 999, c[:1]).sample)  # a scalar timestep, one sample


def test_unet3d_matches_diffusers_at_odd_sizes():
    """Four frames, 6 x 10 latents (an odd side on the way down: the upsampler takes the skip's size), and three
    levels with a DownBlock3D in the middle and ModelScope's mid_block_scale_factor / norm_eps fields exercised."""
    kw = dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"),
              up_block_types=("CrossAttnUpBlock3D", "UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=2,
              mid_block_scale_factor=1.5, norm_eps=1e-6)
    ref = reference_unet(seed=5, **kw)
    ours = ours_from(ref)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 4, 6, 10, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        assert_close(ours(x, torch.tensor([3, 900]), c), ref(x, torch.tensor([3, 900]), c).sample)


def test_state_dict_keys_are_diffusers(pair):
    ref, ours = pair
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert any(".temp_convs.0.conv2.3.weight" in k for k in theirs)  # the Dropout slot is kept
    missing = dict(ref.state_dict())
    missing.pop("transformer_in.proj_in.weight")
    with pytest.raises(UserError, match="1 missing keys .*transformer_in.proj_in.weight"):
        ours_from_state(ref, missing)


def test_modelscope_shapes_have_diffusers_keys():
    """At ModelScope's own shapes (UNet3DConditionModel's defaults: text-to-video-ms, 1.4B parameters), built on the
    meta device so nothing is allocated: every key and shape is diffusers'."""
    from diffusers import UNet3DConditionModel
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in UNet3DConditionModel().state_dict().items()}
        ours = video.UNet3DCondition(video.UNet3DConfig())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert ours.transformer_in.proj_in.weight.shape == (512, 320)  # 8 heads of 64 on 320 channels


def ours_from_state(ref, state):
    return video.build_unet3d(video.unet3d_config(dict(ref.config), "cfg"), state, "weights")


def test_unsupported_config_is_refused():
    base = dict(reference_unet().config)
    for change, word in ((dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock3D"]), "down_block_types"),
                         (dict(attention_head_dim=[8, 8]), "attention_head_dim"),
                         (dict(time_cond_proj_dim=16), "time_cond_proj_dim"),
                         (dict(num_attention_heads=4), "num_attention_heads"),
                         (dict(attention_head_dim=12), "divisible")):
        with pytest.raises(UserError, match=word):
            video.unet3d_config(dict(base, **change), "unet/config.json")


def test_frames_are_folded_batch_major(pair):
    """Each sample of a batch is denoised on its own: the batched output of [x1; x2] is the two single outputs
    (a frame-major fold would mix frames of different samples in the temporal layers)."""
    _, ours = pair
    x, t, c = inputs()
    with torch.no_grad():
        both = ours(x, t, c)
        assert_close(both[:1], ours(x[:1], t[:1], c[:1]))
        assert_close(both[1:], ours(x[1:], t[1:], c[1:]))


def test_decode_frames_is_the_vae_frame_by_frame(tiny_video_dir):
    from diffusers import AutoencoderKL
    ref = AutoencoderKL.from_pretrained(os.path.join(tiny_video_dir, "vae")).eval()
    vae = unet.load_vae(os.path.join(tiny_video_dir, "vae"))
    z = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frames = video.decode_frames(vae, z, chunk=3)  # 10 frames in chunks of 3, 3, 3, 1
    assert frames.shape == (2, 5, 3, 16, 16)
    with torch.no_grad():
        for b in range(2):
            assert_close(frames[b], ref.decode(z[b].transpose(0, 1) / vae.scaling_factor).sample)


# ----------------------------------------------------------------------------------------------------------
# LoRA on the video UNet: the default targets reach the temporal attentions, and per-sample multipliers act per sample.


def test_default_targets_reach_temporal_attention(pair):
    model = copy.deepcopy(pair[1])
    lora.add_offset(model, "eta", rank=2)
    layers = lora.offsets(model, "eta")
    assert any(n.startswith("transformer_in.transformer_blocks.0.attn1.") for n in layers)
    assert any(".temp_attentions.0.transformer_blocks.0.attn2.to_v" in n for n in layers)
    assert any(n.startswith("mid_block.temp_attentions.") for n in layers)
    assert any(".attentions.0.transformer_blocks.0.attn2.to_k" in n for n in layers)  # the spatial ones too


def test_per_sample_multipliers_on_a_video_batch(pair):
    """Eq. 10's one batched call on [x; x] with η at [α, 1] and δ at [β, 0] equals the two calls it replaces,
    through every fold of the video UNet (B·F rows in the spatial layers, B·h·w in the temporal ones)."""
    model = copy.deepcopy(pair[1])
    lora.add_offset(model, "eta", rank=2)
    lora.add_offset(model, "delta", rank=3, targets="to_q,to_v,proj_in")
    randomize_offset(model, "eta", 1)
    randomize_offset(model, "delta", 2)
    x, t, c = inputs(batch=1)
    alpha, beta = 0.3, 0.7
    with torch.no_grad():
        with lora.multipliers(model, eta=[alpha, 1.0], delta=[beta, 0.0]):
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c]))
        with lora.multipliers(model, eta=alpha, delta=beta):
            neg = model(x, t, c)
        with lora.multipliers(model, eta=1.0, delta=0.0):
            pos = model(x, t, c)
        base = pair[1](x, t, c)
    assert (neg - pos).abs().max() > 1e-2 * pos.abs().max() and (pos - base).abs().max() > 1e-2 * base.abs().max()
    assert_close(both[:1], neg)
    assert_close(both[1:], pos)


def test_a_multiplier_that_fits_no_fold_is_refused(pair):
    model = copy.deepcopy(pair[1])
    lora.add_offset(model, "eta", rank=2, targets="time_embedding.linear_1")  # (B, ·) rows: B = 2, 2 % 3 != 0
    x, t, c = inputs()
    with lora.multipliers(model, eta=[1.0, 0.0, 1.0]), pytest.raises(ValueError, match="3 values for a batch of 2"):
        model(x, t, c)


def image_lora(path):
    """An η file written for the tiny image UNet (spatial attention only)."""
    model = unet.UNet2DCondition(unet.unet_config(dict(TINY_UNET), "TINY_UNET"))
    lora.add_offset(model, "eta", rank=2)
    lora.save_lora(model, "eta", path, role="eta")


def test_an_image_lora_on_a_video_unet_is_refused(pair, tmp_path):
    path = str(tmp_path / "image.safetensors")
    image_lora(path)
    model = copy.deepcopy(pair[1])
    with pytest.raises(UserError, match="no temporal-layer keys .*train η/δ on the video model"):
        lora.load_lora(model, path, "eta")
    assert not lora.offset_names(model)


def test_a_text_encoder_lora_is_not_asked_for_temporal_keys(tiny_video_dir, tmp_path):
    """The temporal-key rule is about UNet keys: a file of text-encoder offsets alone loads beside a video UNet."""
    pipe = pipeline.load_pipeline(tiny_video_dir)
    g = torch.Generator().manual_seed(0)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = str(tmp_path / "te.safetensors")
    save_file({f"{key}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 2, generator=g)}, path)
    lora.load_loras({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, [(path, 1.0)], "eta")
    assert lora.offset_names(pipe.text_encoder) == ["eta"] and not lora.offset_names(pipe.unet)


def test_a_video_lora_round_trips(pair, tmp_path):
    """An offset written as a kohya file by save_lora loads back onto a fresh video UNet with the same output. Its
    metadata names no kohya base model (kohya has none for video; this tiny UNet's linear projections would read as
    SD2's "sd_v2") but says it is a UNet3D's."""
    model = copy.deepcopy(pair[1])
    lora.add_offset(model, "delta", rank=2)
    randomize_offset(model, "delta", 4)
    path = str(tmp_path / "video.safetensors")
    lora.save_lora(model, "delta", path, role="delta")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["npo_architecture"] == "unet3d" and meta["npo_role"] == "delta"
    assert "ss_base_model_version" not in meta and "ss_v2" not in meta
    loaded = copy.deepcopy(pair[1])
    lora.load_lora(loaded, path, "delta")
    x, t, c = inputs()
    with torch.no_grad():
        assert_close(loaded(x, t, c), model(x, t, c))


def test_a_peft_lora_on_diffusers_unet3d_loads_into_ours(pair, tmp_path):
    """A peft adapter injected into diffusers' UNet3DConditionModel (every attention, spatial and temporal, random
    non-zero weights, alpha = rank), saved in diffusers' `unet.<layer>.lora_A.weight` names, loads into ours with the
    reference's output."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                             init_lora_weights=False), copy.deepcopy(pair[0]), adapter_name="npo")
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 / p[0].numel() ** 0.5)
    path = str(tmp_path / "peft.safetensors")
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref, adapter_name="npo").items()}, path)
    model = copy.deepcopy(pair[1])
    lora.load_lora(model, path, "eta")
    assert any(n.startswith("transformer_in.") for n in lora.offsets(model, "eta"))
    x, t, c = inputs()
    with torch.no_grad():
        expected = ref(x, t, c).sample
        assert (expected - pair[0](x, t, c).sample).abs().max() > 1e-2 * expected.abs().max()  # the LoRA matters
        assert_close(model(x, t, c), expected)


# ----------------------------------------------------------------------------------------------------------
# Folders: ModelScope's text-to-video-ms layout, as diffusers writes it.

def test_load_pipeline_reads_a_text_to_video_folder(tiny_video_dir):
    from diffusers import TextToVideoSDPipeline
    ref = TextToVideoSDPipeline.from_pretrained(tiny_video_dir)
    pipe = pipeline.load_pipeline(tiny_video_dir)
    assert pipe.is_video and video.is_video(pipe.unet) and not pipe.is_sdxl
    x, t, _ = inputs()
    with torch.no_grad():
        context = pipe.conditioning(["a red square moving left", ""])["encoder_hidden_states"]
        ref_context = ref.encode_prompt(["a red square moving left", ""], "cpu", 1, False)[0]
        assert_close(context, ref_context)
        assert_close(pipe.unet(x, t, context), ref.unet(x, t, ref_context).sample)
    assert pipe.ddim_config().steps_offset == 1 and pipe.default_guidance == 9.0  # TextToVideoSDPipeline's


def test_load_unet_of_a_video_folder(tiny_video_dir):
    assert video.is_video(pipeline.load_unet(tiny_video_dir))
    assert not video.is_video(unet.UNet2DCondition(unet.unet_config(dict(TINY_UNET), "TINY_UNET")))


def test_a_video_folder_with_a_wrong_weight_is_refused(tiny_video_dir, tmp_path):
    """A unet/ whose weights lack a temporal layer: one sentence naming the key, through the CLI (exit 2)."""
    import shutil
    from safetensors.torch import load_file
    import npo
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_video_dir, folder)
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state.pop("down_blocks.0.temp_convs.0.conv1.2.weight")
    save_file(state, weights)
    with pytest.raises(UserError, match="missing keys .*temp_convs.0.conv1.2.weight"):
        pipeline.load_pipeline(folder)
    assert npo.main(["info", "--model", folder]) == 2


def test_eq10_batched_on_video_latents_equals_two_merged_unets(pair):
    """guided.npo_denoiser (one batched forward, η at [α, 1] and δ at [β, 0]) on 5-D latents equals the authors' way,
    two merged weight sets and two passes (guided.merged_denoiser), unchanged code for videos."""
    from npo import guided
    model = copy.deepcopy(pair[1])
    lora.add_offset(model, "eta", rank=2)
    lora.add_offset(model, "delta", rank=2, targets="to_k,to_out.0,conv2")
    randomize_offset(model, "eta", 6)
    randomize_offset(model, "delta", 7)
    x, t, c = inputs(batch=1)
    neg = torch.randn_like(c)
    with torch.no_grad():
        batched = guided.npo_denoiser(model, neg, c, 7.5, 0.4, 0.8)(x, t)
        reference = guided.merged_denoiser(*guided.merged_unets(model, 0.4, 0.8), neg, c, 7.5)(x, t)
    assert batched.shape == x.shape
    assert_close(batched, reference)
