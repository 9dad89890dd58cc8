"""Tiny SD1 / SD2 models as diffusers folders, and a converter of ours from such a folder to the original LDM
single-file layout (what civitai / A1111 users hold; SDXL's is Stability's sgm layout). The converter is checked
against diffusers' `from_single_file` in tests/test_singlefile.py; the loader under test (singlefile.py) never sees
this code. The benchmarks write single files with it (files.py); the tests import it through tests/ldm.py, which adds
the tiny SDXL family.

The tiny configs keep each family's rules, so a loader that knows only the rules can rebuild them from shapes:
SD1 has 8 heads per attention block and 1x1-conv projections, SD2 and SDXL 64-dim heads and Linear projections;
all text encoders have 64-dim heads (CLIP ViT-L: 12 x 64, OpenCLIP ViT-H: 16 x 64, bigG: 20 x 64); GroupNorm has
32 groups; SDXL's size ids have 256 features each. (conftest.TINY_SDXL_* has 8-dim groups and heads: a loader
cannot rebuild it from shapes.)
"""
import os
import re

import torch
from safetensors.torch import save_file

from benchmarks.random_weights import TOKENIZER_DIR, randomize

TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
FAMILIES = {
    # three levels, one resnet each, attention on the first two (as SD1.5: none on the last)
    "sd1": dict(unet=dict(sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=128,
                          attention_head_dim=8,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(TEXT, hidden_act="quick_gelu"), pad="<|endoftext|>"),
    # two levels, two resnets each (SD's layers_per_block), heads = channels / 64, Linear projections
    "sd2": dict(unet=dict(sample_size=8, block_out_channels=(64, 128), layers_per_block=2, cross_attention_dim=128,
                          attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(TEXT, hidden_act="gelu"), pad="!"),
}
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)


def make_family_dir(path, family, seed=0, prediction_type="epsilon"):
    """A diffusers folder (model_index.json and all) of a tiny random `family` model; returns the pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    f = FAMILIES[family]
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=randomize(UNet2DConditionModel(**f["unet"]), seed + 1).eval(),
        vae=randomize(AutoencoderKL(**VAE), seed + 2).eval(),
        text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**f["text"])), seed + 3).eval(),
        tokenizer=CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"), os.path.join(TOKENIZER_DIR, "merges.txt"),
                                pad_token=f["pad"], model_max_length=77),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


# ----------------------------------------------------------------------------------------------------------
# diffusers names -> LDM names (the inverse of what singlefile.py does, written independently)

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest):
    name, _, tail = rest.partition(".")
    return f"{RESNET_TO_LDM[name]}.{tail}"


def ldm_unet_key(key, L, up_attn):
    """`L` resnets per down level; `up_attn[b]`: whether up level b has transformers."""
    for ours, theirs in UNET_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, b, kind, k, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (L + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            return f"output_blocks.{b * (L + 1) + L}.{2 if up_attn[b] else 1}.{rest}"
        i = 1 + b * (L + 1) + k if side == "down" else b * (L + 1) + k
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"{blocks}.{i}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[m[1], m[2]]
    return f"middle_block.{slot}.{_resnet(m[3]) if m[1] == 'resnets' else m[3]}"


def ldm_vae_key(key, levels):
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
    return key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")


def ldm_unet(unet):
    cfg = unet.config
    L = cfg.layers_per_block
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    return {ldm_unet_key(k, L, up_attn): v for k, v in unet.state_dict().items()}


def ldm_vae(vae):
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        k = ldm_vae_key(k, levels)
        out[k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v  # the LDM VAE's attention is 1x1 convs
    return out


def ldm_clip(text_encoder, prefix="cond_stage_model.transformer."):
    """SD1 (and SDXL's first encoder under `conditioner.embedders.0.transformer.`): transformers' CLIP, with a float
    position_ids as merges leave it."""
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None] + 0.4  # damaged, unused
    return {f"{prefix}{k}": v for k, v in sd.items()}


def ldm_open_clip(text_encoder, seed=0, prefix="cond_stage_model.model.", unused_layer=True):
    """SD2: OpenCLIP's names, q/k/v fused into in_proj, plus the final resblock SD2 does not use (random here: the
    diffusers folder never had it), a text projection and a logit scale. SDXL's bigG (`unused_layer=False`) has all
    its layers, and its text projection is the folder's, stored as OpenCLIP applies it: x @ P, P (width, proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    n, d = text_encoder.config.num_hidden_layers, text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    projection = sd["text_projection.weight"].T if "text_projection.weight" in sd else torch.randn(d, d, generator=g)
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": projection, "logit_scale": torch.tensor(4.6)}
    for i in range(n + 1 if unused_layer else n):
        def get(name):
            key = f"encoder.layers.{i}.{name}"
            return sd[key] if i < n else torch.randn(sd[f"encoder.layers.0.{name}"].shape, generator=g)
        r = f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[r + f"attn.in_proj_{part}"] = torch.cat([get(f"self_attn.{p}_proj.{part}") for p in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[r + f"{theirs}.{part}"] = get(f"{ours}.{part}")
    return {f"{prefix}{k}": v for k, v in out.items()}


def ldm_text(pipe, family):
    if family == "sd1":
        return ldm_clip(pipe.text_encoder)
    if family == "sd2":
        return ldm_open_clip(pipe.text_encoder)
    return {**ldm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."),
            **ldm_open_clip(pipe.text_encoder_2, prefix="conditioner.embedders.1.model.", unused_layer=False)}


def to_ldm(pipe, family, parts=("unet", "vae", "text_encoder"), ema_unet=None, v_pred_marker=False):
    """The LDM state dict of a diffusers pipeline: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.`
    (SDXL: both encoders under `conditioner.embedders.`), plus what real files carry beside the weights (the DDPM
    schedule buffers; EMA copies under `model_ema.` with the dots of the key removed, when `ema_unet` is given; a
    `v_pred` marker)."""
    sd = {}
    if "unet" in parts:
        sd.update({f"model.diffusion_model.{k}": v for k, v in ldm_unet(pipe.unet).items()})
    if "vae" in parts:
        sd.update({f"first_stage_model.{k}": v for k, v in ldm_vae(pipe.vae).items()})
    if "text_encoder" in parts:
        sd.update(ldm_text(pipe, family))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    if ema_unet is not None:
        sd.update({"model_ema." + "".join(f"diffusion_model.{k}".split(".")): v for k, v in ldm_unet(ema_unet).items()})
        sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)})
    if v_pred_marker:
        sd["v_pred"] = torch.tensor([])
    return sd


def save_ldm(sd, path):
    """Write `sd` as a .safetensors file, or as a .ckpt (a torch.save of {"state_dict": ...}, as LDM training saves)."""
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if path.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 1000}, path)
    return path
