"""Random weights in diffusers' folder layout for the benchmarks (SD1.5, SDXL and CLIP shapes, or toy sizes of
them), and `randomize`, which the tests' tiny models use too (tests/conftest.py imports it from here).

Nothing is downloaded: the configs are written here and the tokenizer is the CLIP vocabulary in weights/."""
import json
import os
import shutil

import torch

from benchmarks.harness import ROOT

TOKENIZER_DIR = os.path.join(ROOT, "weights", "tokenizer")
WEIGHTS = os.path.abspath(os.environ.get("NPO_BENCH_DIR", "/tmp/npo-bench/sd15"))  # the SD1.5-shaped folder


def randomize(model, seed):
    """diffusers zero-initialises some layers (conv_out, proj_out); give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            # weights at ~1.5x unit gain so attention maps are far from uniform and every path matters
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5 if p.ndim > 1 else 0.5))
    return model


def make_weights(path, tiny=False):
    """SD1.5 shapes (or, `tiny`, a few channels of them), random weights, diffusers folder layout (the tokenizer is
    ours from weights/); written once (a `done` file marks it)."""
    if os.path.exists(os.path.join(path, "done")):
        return
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    widths = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=4) if tiny else {}
    width = 32 if tiny else 768
    UNet2DConditionModel(sample_size=64, cross_attention_dim=width, **widths).save_pretrained(f"{path}/unet")
    AutoencoderKL(block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512), layers_per_block=2,
                  sample_size=512, norm_num_groups=8 if tiny else 32, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(f"{path}/vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=4 if tiny else 12,
                                 num_hidden_layers=2 if tiny else 12, hidden_act="quick_gelu")).save_pretrained(f"{path}/text_encoder")
    shutil.copytree(TOKENIZER_DIR, f"{path}/tokenizer", dirs_exist_ok=True)
    open(os.path.join(path, "done"), "w").close()


SDXL_PRESETS = {  # base channels, transformer depth per level, (width, layers, heads) of each text encoder
    "full": dict(channels=320, depth=[1, 2, 10], text=(768, 12, 12), text_2=(1280, 32, 20)),  # SDXL base's shapes
    "small": dict(channels=64, depth=[1, 1, 2], text=(64, 2, 2), text_2=(128, 2, 2)),  # to check the benchmark
}


def make_sdxl_weights(path, preset):
    """SDXL-shaped random weights in a diffusers layout: unet/, text_encoder/, text_encoder_2/, the tokenizers."""
    if os.path.exists(os.path.join(path, "done")):
        return
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    p = SDXL_PRESETS[preset]
    c, (w1, l1, h1), (w2, l2, h2) = p["channels"], p["text"], p["text_2"]
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=128, block_out_channels=(c, 2 * c, 4 * c), layers_per_block=2, cross_attention_dim=w1 + w2,
        attention_head_dim=(c // 64, 2 * c // 64, 4 * c // 64), transformer_layers_per_block=p["depth"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=w2 + 6 * 256).save_pretrained(f"{path}/unet")
    ids = dict(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(hidden_size=w1, intermediate_size=4 * w1, num_hidden_layers=l1, num_attention_heads=h1,
                                 hidden_act="quick_gelu", **ids)).save_pretrained(f"{path}/text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=w2, intermediate_size=4 * w2, num_hidden_layers=l2,
                                               num_attention_heads=h2, hidden_act="gelu", projection_dim=w2, **ids)
                                ).save_pretrained(f"{path}/text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(TOKENIZER_DIR, f"{path}/{name}", dirs_exist_ok=True)
    with open(f"{path}/tokenizer_2/special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "!"}, f)  # SDXL's tokenizer_2 pads with "!"
    open(os.path.join(path, "done"), "w").close()


CLIP_SHAPES = {  # transformers configs: PickScore's CLIP-H/14, and a small one to check that the command runs
    "clip-h": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    hidden_act="gelu"),
               dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14, image_size=224, hidden_act="gelu"), 1024),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
             dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=224, hidden_act="gelu"), 32),
}


def make_clip_weights(shape):
    """A transformers CLIPModel folder of the given shape with random weights (made once), with our tokenizer."""
    path = os.path.join(os.path.dirname(WEIGHTS), f"clip-{shape}")
    if not os.path.exists(os.path.join(path, "done")):
        from transformers import CLIPConfig, CLIPModel
        torch.manual_seed(0)
        text, vision, dim = CLIP_SHAPES[shape]
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).save_pretrained(path)
        shutil.copytree(TOKENIZER_DIR, path, dirs_exist_ok=True)
        open(os.path.join(path, "done"), "w").close()
    return path
