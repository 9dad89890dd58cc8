"""Tiny reference models: diffusers / transformers modules with random weights, saved as a diffusers folder.

Nothing is downloaded: the configs are written here and the tokenizer is the CLIP vocabulary in weights/.
"""
import copy
import os
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "weights", "tokenizer")

TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)


def randomize(model, seed):
    """diffusers zero-initialises some layers (conv_out, proj_out); give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            # weights at ~1.5x unit gain so attention maps are far from uniform and every path matters
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5 if p.ndim > 1 else 0.5))
    return model


def make_model_dir(path, unet_kwargs=TINY_UNET, vae_kwargs=TINY_VAE, text_kwargs=TINY_TEXT, seed=0):
    """Write a diffusers model folder with random weights into `path`; return the reference modules."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    ref_unet = randomize(UNet2DConditionModel(**unet_kwargs), seed + 1).eval()
    ref_vae = randomize(AutoencoderKL(**vae_kwargs), seed + 2).eval()
    ref_text = CLIPTextModel(CLIPTextConfig(**text_kwargs)).eval()
    ref_unet.save_pretrained(os.path.join(path, "unet"))
    ref_vae.save_pretrained(os.path.join(path, "vae"))
    ref_text.save_pretrained(os.path.join(path, "text_encoder"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(path, "tokenizer"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(path, "scheduler"))
    return dict(unet=ref_unet, vae=ref_vae, text_encoder=ref_text)


def diffusers_pipeline(path, refs):
    """StableDiffusionPipeline on the reference modules (private copies of the UNet and the text encoder, which tests
    load LoRAs into)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=copy.deepcopy(refs["text_encoder"]),
                                   unet=copy.deepcopy(refs["unet"]),
                                   tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
                                   scheduler=DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(folder, reference modules) of a tiny SD1-shaped model with random weights."""
    path = str(tmp_path_factory.mktemp("tiny_model"))
    refs = make_model_dir(path)
    return path, refs
