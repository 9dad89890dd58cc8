"""The full SD1.5 shapes, once each, at a small latent size (about a minute; `-m "not full_size"` skips them)."""
import gc

import pytest
import torch

from npo import clip
from npo import unet
from conftest import randomize

pytestmark = pytest.mark.full_size

RTOL = 1e-4  # see test_unet.py

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # otherwise diffusers' defaults are SD1.5's
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, hidden_act="quick_gelu")


def assert_close(ours, ref):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= RTOL * scale, f"max |ours - ref| = {err:.3g} > {RTOL} * {scale:.3g}"


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_sd15_unet(tmp_path):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**SD15_UNET), seed=0).eval()
    ref.save_pretrained(tmp_path)
    ours = unet.load_unet(str(tmp_path))
    assert count(ours) == count(ref) == 859_520_964
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    with torch.no_grad():
        expected = ref(x, 500, c).sample
        del ref
        gc.collect()
        assert_close(ours(x, 500, c), expected)


def test_sd15_vae(tmp_path):
    from diffusers import AutoencoderKL
    ref = randomize(AutoencoderKL(**SD15_VAE), seed=1).eval()
    ref.save_pretrained(tmp_path)
    ours = unet.load_vae(str(tmp_path))
    assert count(ours) == count(ref) == 83_653_863
    z, images = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample)
        assert_close(ours.encode(images).mean, ref.encode(images).latent_dist.mean)


def test_sd15_text_encoder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    ref = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    ref.save_pretrained(tmp_path)
    ours = clip.load_text_encoder(str(tmp_path))
    assert count(ours) == count(ref) == 123_060_480
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).last_hidden_state)
