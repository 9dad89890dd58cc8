"""Our UNet and VAE against diffusers' on identical random weights (saved by diffusers, loaded by us)."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from npo import checkpoint
from npo import unet
from npo.checkpoint import UserError
from conftest import randomize

# fp32 on CPU: the two implementations order some reductions differently (attention, GroupNorm, conv
# algorithms), which moves results by ~1e-7 relative. A real bug (a wrong key, scale, order or activation)
# moves them by O(1) relative, so 1e-4 of the output's magnitude separates the two by three decades.
RTOL = 1e-4


def assert_close(ours, ref):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= RTOL * scale, f"max |ours - ref| = {err:.3g} > {RTOL} * {scale:.3g}"


UNET_CONFIGS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=8),
    # SD2.x: linear projections, per-block heads, 1024-dim text, upcast attention, and a plain block first
    "sd2": dict(block_out_channels=(16, 32, 64), layers_per_block=1, cross_attention_dim=1024,
                attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8),
    # per-block lists everywhere, two transformer layers, no freq flip, a shift, mish, dropout slots
    "lists": dict(block_out_channels=(16, 32, 32), layers_per_block=[1, 2, 1], cross_attention_dim=[24, 24, 24],
                  attention_head_dim=[1, 2, 4], transformer_layers_per_block=[2, 1, 2], flip_sin_to_cos=False,
                  freq_shift=1, act_fn="mish", norm_num_groups=4, norm_eps=1e-6, mid_block_scale_factor=1.5,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_unet_matches_diffusers(name, tmp_path):
    torch.manual_seed(0)
    kwargs = UNET_CONFIGS[name]
    ref = randomize(UNet2DConditionModel(sample_size=8, **kwargs), seed=1).eval()
    ref.save_pretrained(tmp_path)
    ours = unet.load_unet(str(tmp_path))
    ctx_dim = kwargs["cross_attention_dim"]
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, list) else ctx_dim  # a list form must repeat one dim: one text
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 7, ctx_dim)
    with torch.no_grad():
        for t in (1, 999, torch.tensor([10, 500])):
            assert_close(ours(x, t, c), ref(x, t, c).sample)


def test_unet_odd_latent_size(tmp_path):
    """Sides that are not multiples of 2**downsamples: the up path resizes to the skip connection."""
    ref = randomize(UNet2DConditionModel(sample_size=8, **UNET_CONFIGS["sd2"]), seed=3).eval()
    ref.save_pretrained(tmp_path)
    ours = unet.load_unet(str(tmp_path))
    x, c = torch.randn(1, 4, 10, 14), torch.randn(1, 3, 1024)
    with torch.no_grad():
        assert_close(ours(x, 50, c), ref(x, 50, c).sample)


VAE_CONFIGS = {
    "sd": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=2),
    "plain": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=3,
                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.5),
}


@pytest.mark.parametrize("name", VAE_CONFIGS)
def test_vae_matches_diffusers(name, tmp_path):
    kwargs = VAE_CONFIGS[name]
    n = len(kwargs["block_out_channels"])
    ref = randomize(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  **kwargs), seed=4).eval()
    ref.save_pretrained(tmp_path)
    ours = unet.load_vae(str(tmp_path))
    assert ours.scaling_factor == ref.config.scaling_factor
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_post, our_post = ref.encode(images).latent_dist, ours.encode(images)
        assert_close(our_post.mean, ref_post.mean)
        assert_close(our_post.std, ref_post.std)
        # a seeded posterior sample draws the same noise as diffusers
        sample_ref = ref_post.sample(torch.Generator().manual_seed(7))
        assert_close(our_post.sample(torch.Generator().manual_seed(7)), sample_ref)
        z = torch.randn(2, kwargs.get("latent_channels", 4), 8, 8)
        assert_close(ours.decode(z), ref.decode(z).sample)


def test_vae_legacy_attention_names(tmp_path):
    """Old checkpoints call the VAE attention query/key/value/proj_attn, with 1x1-conv weights."""
    from safetensors.torch import load_file, save_file
    kwargs = VAE_CONFIGS["sd"]
    ref = randomize(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                  **kwargs), seed=5).eval()
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in sd.items():
        for a, b in new.items():
            if f"attentions.0.{a}." in k:
                k, v = k.replace(f".{a}.", f".{b}."), (v[:, :, None, None] if v.ndim == 2 else v)
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    save_file(legacy, path)
    ours = unet.load_vae(str(tmp_path))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample)


def test_unsupported_unet_field_is_refused(tmp_path):
    ref = UNet2DConditionModel(sample_size=8, class_embed_type="timestep", **UNET_CONFIGS["sd1"])
    ref.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="class_embed_type"):
        unet.load_unet(str(tmp_path))


def test_unknown_unet_field_is_refused(tmp_path):
    import json
    ref = UNet2DConditionModel(sample_size=8, **UNET_CONFIGS["sd1"])
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["some_new_feature"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="some_new_feature"):
        unet.load_unet(str(tmp_path))


def test_unsupported_block_type_is_refused(tmp_path):
    import json
    ref = UNet2DConditionModel(sample_size=8, **UNET_CONFIGS["sd1"])
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="SimpleCrossAttnDownBlock2D"):
        unet.load_unet(str(tmp_path))


# The published unet/config.json of SD1.5 (diffusers 0.6 export) and SD2.1 (0.10 export), and a config as a recent
# diffusers writes it (every __init__ argument; DreamShaper 8's is SD1.5's values in this form).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = dict(SD15_CONFIG, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20],
                   cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                   only_cross_attention=False, sample_size=96, upcast_attention=True, use_linear_projection=True)


def recent_export(config):
    """`config` as today's diffusers writes it: every __init__ argument, defaults included."""
    import inspect
    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
    return {**full, **config, "_diffusers_version": "0.42.1"}


@pytest.mark.parametrize("config", [SD15_CONFIG, SD21_CONFIG, "recent"], ids=["sd15", "sd21", "dreamshaper_like"])
def test_real_unet_configs_build_diffusers_keys_and_shapes(config):
    """Each config builds (on the meta device, no memory) exactly the parameters diffusers builds from it."""
    config = recent_export(SD15_CONFIG) if config == "recent" else config
    cfg = checkpoint.config_from_dict(unet.UNetConfig, config, "config.json", unet.UNET_NOOP_FIELDS)
    ours = checkpoint.build_on_meta(lambda: unet.UNet2DCondition(cfg))
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
