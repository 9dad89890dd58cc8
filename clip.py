"""CLIP, written by hand: the text encoders and tokenizer of Stable Diffusion 1.x / 2.x / XL, and the image tower
with the two projections that make CLIP a scorer (PickScore, HPSv2, CLIP score, the LAION-aesthetic embedding).

Attribute names are the state-dict keys of transformers' `CLIPModel` (`text_model.encoder.layers.3.self_attn.q_proj`,
`vision_model.embeddings.patch_embedding`, `visual_projection`), so a diffusers `text_encoder/` folder or a
transformers CLIP folder loads with one strict `load_state_dict`; OpenCLIP files (HPSv2's form) are renamed by a few
rules first. SD1.x uses OpenAI's CLIP ViT-L/14 text tower (768 wide, 12 layers, quick_gelu); SD2.x uses OpenCLIP's
ViT-H/14 tower (1024 wide, 23 layers, gelu); SDXL uses ViT-L/14's and OpenCLIP's ViT-bigG/14 tower with its text
projection (1280 wide, 32 layers, gelu). All share one BPE vocabulary (weights/tokenizer/).

    model = clip.load_clip("PickScore_v1")                      # transformers folder, or an OpenCLIP .pt / .safetensors
    pixels = clip.pixels_from_pil(pil_images)                    # = CLIPImageProcessor; pixels_from_tensor: differentiable
    image, text = model.image_features(pixels), model.text_features(tokenizer(prompts))
"""
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import numpy as np
from PIL import Image
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from . import checkpoint
from .checkpoint import UserError


# ----------------------------------------------------------------------------------------------------------
# Text encoder

@dataclass
class CLIPTextConfig:
    # Field names and defaults are those of transformers' CLIPTextConfig, so a config.json that omits a field
    # means what it means there. SD1.x: 768 / 3072 / 12 layers / 12 heads / quick_gelu; SD2.x: 1024 / 4096 / 23 / 16 / gelu.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # only used to find the pooled (EOS) token; SD checkpoints say 2, an old wrong value kept for compatibility
    eos_token_id: int = 49407
    projection_dim: int = 512  # output of the text projection (SDXL's text_encoder_2: 1280); unused without one

    def __post_init__(self):
        check_tower(self)


def check_tower(cfg):
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"'hidden_act' = {cfg.hidden_act!r} is not supported (supported: 'quick_gelu', 'gelu')")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}")


def config_from(cls, d, where, hint):
    """`cls` from the fields of `d` it has; the others (transformers' generic bookkeeping) are ignored."""
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}; {hint}")


def read_text_config(path):
    return text_config(checkpoint.read_json(path), path)


def text_config(d, path):
    """The fields of a `text_encoder/config.json` dict that the model uses.

    transformers writes many generic fields (architectures, dtype, transformers_version, initializer_range,
    projection_dim, dropout, ...) that vary across its versions and change nothing at inference, so unlike the
    UNet config the rest is ignored; only what would make a different network is refused."""
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserError(f"{path}: 'model_type' = {d['model_type']!r} is not a CLIP text encoder (a full CLIP model has a "
                        "'text_config' and vision weights); use a Stable Diffusion text_encoder/ folder.")
    return config_from(CLIPTextConfig, d, path, "use a Stable Diffusion 1.x/2.x/XL text encoder.")


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI's sigmoid approximation of GELU (SD1.x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg, causal):
        super().__init__()
        self.heads, self.causal = cfg.num_attention_heads, causal
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # text: token i sees tokens 0..i only; image: every patch sees every patch
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)). Causal attention in the text tower."""

    def __init__(self, cfg, causal):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    """The text tower: token + position embeddings, causal encoder, final layer norm (transformers' `text_model`)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, d),
            position_embedding=nn.Embedding(cfg.max_position_embeddings, d),
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            CLIPEncoderLayer(cfg, causal=True) for _ in range(cfg.num_hidden_layers))))
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def embed(self, input_ids):
        """Token plus position embeddings (B, T, hidden): the input of the first layer."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(pos)

    def forward(self, input_ids, clip_skip=0):
        n = self.config.num_hidden_layers
        if not 0 <= clip_skip < n:
            raise UserError(f"clip_skip = {clip_skip} is out of range; use 0 (off) to {n - 1}.")
        x = self.embed(input_ids)
        for layer in self.encoder.layers[:n - clip_skip]:
            x = layer(x)
        return self.final_layer_norm(x)

    def at_eos(self, h, input_ids):
        """The rows of h (B, T, D) at each sequence's EOS token: (B, D)."""
        eos = self.config.eos_token_id
        # checkpoints with the old eos_token_id 2 find EOS as the largest id (49407); the others by its first position
        where = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)
        return h[torch.arange(len(h), device=h.device), where]

    def pooled(self, input_ids):
        return self.at_eos(self(input_ids), input_ids)


class CLIPTextModel(nn.Module):
    """A Stable Diffusion text encoder: the text tower alone, under transformers' `text_model.` keys."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids, clip_skip=0):
        """Token features (B, T, hidden) for input_ids (B, T): what the UNet cross-attends to.

        `clip_skip = k` stops k layers before the end and still applies the final layer norm (diffusers'
        `clip_skip`, i.e. `hidden_states[-(k+1)]`; A1111's "Clip skip 2" is k = 1)."""
        return self.text_model(input_ids, clip_skip)

    def pooled(self, input_ids):
        """The feature of the EOS token (B, hidden): CLIP's sentence embedding, before its text projection."""
        return self.text_model.pooled(input_ids)

    def penultimate_and_pooled(self, input_ids):
        """What SDXL takes from each text encoder, in one pass: the hidden state after the second-to-last layer,
        without the final layer norm (B, T, D) (transformers' `hidden_states[-2]`), and the pooled EOS feature of
        the last layer after it (B, D)."""
        m = self.text_model
        x = m.embed(input_ids)
        for layer in m.encoder.layers[:-1]:
            x = layer(x)
        return x, m.at_eos(m.final_layer_norm(m.encoder.layers[-1](x)), input_ids)


class CLIPTextModelWithProjection(CLIPTextModel):
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower): CLIP plus `text_projection`, a bias-free
    linear map of the pooled EOS feature (transformers' `text_embeds`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def penultimate_and_pooled(self, input_ids):
        """As CLIPTextModel's, with the pooled feature projected: SDXL's pooled text embedding (B, projection_dim)."""
        hidden, pooled = super().penultimate_and_pooled(input_ids)
        return hidden, self.text_projection(pooled)


def rename_legacy_clip_keys(state_dict):
    """The two differences between real text encoder files and our names.

    transformers before v5 saved `text_model.`-prefixed keys (every SD1.x/2.x checkpoint), v5 saves them without;
    and older checkpoints also saved `text_model.embeddings.position_ids`, a constant arange buffer, not a weight."""
    out = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state_dict.items()}
    out.pop("text_model.embeddings.position_ids", None)
    return out


def build_text_encoder(cfg, state_dict, where, dtype=torch.float32, projection=False):
    """Our text encoder from its config and a state dict in transformers' names (a folder's, or singlefile.py's);
    `projection=True` for a CLIPTextModelWithProjection (SDXL's `text_encoder_2/`)."""
    model = checkpoint.build_on_meta(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg))
    checkpoint.load_strict(model, rename_legacy_clip_keys(state_dict), where, dtype)
    return model.eval().requires_grad_(False)


def load_text_encoder(folder, dtype=torch.float32, device="cpu", variant=None, projection=False):
    cfg = read_text_config(os.path.join(folder, "config.json"))
    path = checkpoint.find_weights(folder, ["model"], variant)
    return build_text_encoder(cfg, checkpoint.read_safetensors(path, device), path, dtype, projection)


# ----------------------------------------------------------------------------------------------------------
# Image tower, and the two-tower CLIP model

@dataclass
class CLIPVisionConfig:
    # transformers' CLIPVisionConfig field names and defaults. CLIP-H/14 (PickScore, HPSv2): 1280 wide, 5120, 32 layers,
    # 16 heads, patch 14, gelu, projection 1024; CLIP-L/14 (aesthetic): 1024 / 4096 / 24 / 16, patch 14, quick_gelu, 768.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # the shared embedding size (a CLIPModel states it once, at its top level)

    def __post_init__(self):
        check_tower(self)


class CLIPVisionEmbeddings(nn.Module):
    """Patches and a class token: a p×p convolution with stride p cuts the image into N = (size / p)² patch
    embeddings, the learned class embedding goes first, and N + 1 learned positions are added."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, h·w, d)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """The image tower (transformers' `vision_model`): embeddings, a layer norm, the encoder (full attention), and a
    layer norm on the class token, which is the image's feature."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)  # sic: transformers' spelling is the key
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        """CLIP-normalized pixels (B, 3, size, size) -> the pooled image feature (B, hidden)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModelWithProjection(nn.Module):
    """The image tower and its projection into the shared embedding space (all the LAION-aesthetic head needs)."""

    def __init__(self, vision_cfg):
        super().__init__()
        self.vision_config = vision_cfg
        self.vision_model = CLIPVisionTransformer(vision_cfg)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, vision_cfg.projection_dim, bias=False)

    def image_features(self, pixels):
        """Image embeddings (B, projection_dim), not normalized."""
        return self.visual_projection(self.vision_model(pixels))


class CLIPModel(CLIPVisionModelWithProjection):
    """Both towers, projected into one space, and the learned temperature `logit_scale` = log(1/τ): CLIP's logits
    are exp(logit_scale) · cos(image, text)."""

    def __init__(self, text_cfg, vision_cfg):
        super().__init__(vision_cfg)
        self.text_config = text_cfg
        self.text_model = CLIPTextTransformer(text_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, vision_cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def text_features(self, input_ids):
        """Text embeddings (B, projection_dim) of token ids (B, 77), not normalized: the projected EOS feature."""
        return self.text_projection(self.text_model.pooled(input_ids))


def read_clip_config(path):
    """(text config or None, vision config) of a transformers `CLIPModel` or `CLIPVisionModelWithProjection`
    config.json; for a CLIPModel the shared `projection_dim` is its top-level one."""
    d = checkpoint.read_json(path)
    hint = "use the config.json that came with the CLIP weights."
    if d.get("model_type") == "clip":
        shared = {"projection_dim": d.get("projection_dim", 512)}
        vision = config_from(CLIPVisionConfig, {**d.get("vision_config", {}), **shared}, path, hint)
        return config_from(CLIPTextConfig, d.get("text_config", {}), path, hint), vision
    if d.get("model_type") == "clip_vision_model":
        return None, config_from(CLIPVisionConfig, d, path, hint)
    raise UserError(f"{path}: 'model_type' = {d.get('model_type')!r} is not a CLIP model; pass a transformers CLIPModel "
                    "or CLIPVisionModelWithProjection folder, or an OpenCLIP .pt / .safetensors file.")


def read_folder_weights(folder, device="cpu"):
    """All tensors of a transformers folder: `model.safetensors`, or the shards its `model.safetensors.index.json`
    lists; old files' `*.position_ids` (constant arange buffers, not weights) are dropped."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(checkpoint.read_json(index).get("weight_map", {}).values()))
        state = {}
        for name in shards:
            state.update(checkpoint.read_safetensors(os.path.join(folder, name), device))
    else:
        state = checkpoint.read_safetensors(checkpoint.find_weights(folder, ["model"]), device)
    return {k: v for k, v in state.items() if not k.endswith(".position_ids")}


def load_clip(path, dtype=torch.float32, device="cpu", heads=None):
    """A frozen CLIP, loaded strictly: from a transformers folder (`CLIPModel`: both towers; or
    `CLIPVisionModelWithProjection`: the image tower), or from an OpenCLIP file (.safetensors, or .pt / .pth read with
    `weights_only=True`; see `openclip_configs` for `heads`)."""
    if os.path.isdir(path):
        text_cfg, vision_cfg = read_clip_config(os.path.join(path, "config.json"))
        state = read_folder_weights(path, device)
    elif os.path.isfile(path):
        state = openclip_to_transformers(checkpoint.read_weights(path, device))
        if "vision_model.embeddings.class_embedding" not in state:
            raise UserError(f"{path} is not an OpenCLIP model (it has no visual.class_embedding); pass an OpenCLIP "
                            "ViT state dict such as HPSv2's, or a transformers CLIP folder.")
        try:
            text_cfg, vision_cfg = openclip_configs(state, *(heads or (None, None)))
        except KeyError as e:
            raise UserError(f"{path} is not a whole OpenCLIP ViT ({e.args[0]} is missing, in transformers' names); "
                            "pass the complete state dict.")
        except ValueError as e:
            raise UserError(f"{path}: {e}; its widths are not those of a published OpenCLIP ViT, so pass `heads`.")
    else:
        raise UserError(f"{path} does not exist; pass a transformers CLIP folder or an OpenCLIP .pt / .safetensors file.")
    model = checkpoint.build_on_meta(
        lambda: CLIPModel(text_cfg, vision_cfg) if text_cfg else CLIPVisionModelWithProjection(vision_cfg))
    checkpoint.load_strict(model, state, path, dtype)
    return model.eval().requires_grad_(False)


# OpenCLIP's names for the parts that transformers names otherwise. An image-tower key is the same name under "visual.".
OPENCLIP_PARTS = {
    "transformer.resblocks": "encoder.layers", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn": "self_attn",
    "c_fc": "fc1", "c_proj": "fc2", "ln_pre": "pre_layrnorm", "ln_post": "post_layernorm", "ln_final": "final_layer_norm",
    "conv1": "embeddings.patch_embedding", "class_embedding": "embeddings.class_embedding",
    "token_embedding": "embeddings.token_embedding", "positional_embedding": "embeddings.position_embedding.weight",
}
OPENCLIP_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
OPENCLIP_PART = re.compile(r"(?<![^.])(" + "|".join(map(re.escape, OPENCLIP_PARTS)) + r")(?![^.])")


def openclip_to_transformers(state):
    """An OpenCLIP CLIP state dict under transformers' names, by four rules (a text tower alone, such as SD2's
    `cond_stage_model.model.*` without its prefix, renames the same way):

    - `visual.X` is `vision_model.X`, any other X is `text_model.X`, with the parts of X renamed by OPENCLIP_PARTS;
    - the projections are matrices used as `x @ P`, so transformers' Linear weights are their transposes:
      `visual.proj` -> `visual_projection.weight`, `text_projection` -> `text_projection.weight`;
    - the fused attention input `in_proj_weight` / `in_proj_bias` stacks [q; k; v] by rows: split into three;
    - `logit_scale` keeps its name; old files' `attn_mask` (the constant causal mask) is dropped.

    A file saved with the state dict under "state_dict" (HPSv2's) is unwrapped first."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if key in OPENCLIP_PROJECTIONS:
            out[OPENCLIP_PROJECTIONS[key]] = value.T.contiguous()
        elif key == "logit_scale":
            out[key] = value
        elif key != "attn_mask":
            tower, name = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else ("text_model", key)
            name = f"{tower}.{OPENCLIP_PART.sub(lambda m: OPENCLIP_PARTS[m.group(1)], name)}"
            stem, fused, kind = name.rpartition(".in_proj_")
            if fused:
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{stem}.{proj}.{kind}"] = part
            else:
                out[name] = value
    return out


def openclip_configs(state, vision_heads=None, text_heads=None):
    """(text config or None, vision config) read from the shapes of a renamed OpenCLIP state dict.

    Two facts are not in the weights. The number of heads: OpenCLIP's published ViTs have width/64 heads in the text
    tower and min(width/64, 16) in the image tower (ViT-H-14: 1280 wide, 16 heads of 80), the defaults here. The
    activation: GELU, as in LAION-trained towers (HPSv2 is one); OpenAI's own weights use quick_gelu: load their
    transformers folder instead."""
    def shape(key, dim=0):
        return state[key].shape[dim]

    def layers(tower):
        return len({k.split(".")[3] for k in state if k.startswith(f"{tower}.encoder.layers.")})
    v, width = "vision_model", shape("vision_model.embeddings.class_embedding")
    patch = shape(f"{v}.embeddings.patch_embedding.weight", -1)
    grid = math.isqrt(shape(f"{v}.embeddings.position_embedding.weight") - 1)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=shape(f"{v}.encoder.layers.0.mlp.fc1.weight"),
                              num_hidden_layers=layers(v), num_attention_heads=vision_heads or max(1, min(width // 64, 16)),
                              image_size=grid * patch, patch_size=patch, hidden_act="gelu",
                              projection_dim=shape("visual_projection.weight"))
    if "text_model.embeddings.token_embedding.weight" not in state:
        return None, vision
    t, width = "text_model", shape("text_model.embeddings.token_embedding.weight", 1)
    # eos_token_id 2 pools at the largest id, the end-of-text token, which is how OpenCLIP pools (text.argmax(-1))
    text = CLIPTextConfig(vocab_size=shape(f"{t}.embeddings.token_embedding.weight"), hidden_size=width,
                          intermediate_size=shape(f"{t}.encoder.layers.0.mlp.fc1.weight"), num_hidden_layers=layers(t),
                          num_attention_heads=text_heads or max(1, width // 64), hidden_act="gelu", eos_token_id=2,
                          max_position_embeddings=shape(f"{t}.embeddings.position_embedding.weight"))
    return text, vision


# ----------------------------------------------------------------------------------------------------------
# Tokenizer

# OpenAI's CLIP split: the special tokens, English contractions, runs of letters, single digits, runs of anything
# else that is not whitespace (whitespace itself is dropped).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_bpe_tokenizer(vocab_path, merges_path):
    """CLIP's text pipeline on the `tokenizers` library: NFC, collapse whitespace, lower-case, split with
    CLIP_SPLIT, map bytes to visible characters (GPT-2's byte-level trick), then BPE where the last symbol of
    each word carries `</w>` (so "cat" at the end of a word is a different token from "cat" inside one)."""
    tok = Tokenizer(BPE.from_file(vocab_path, merges_path, end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # ByteLevel also re-splits each piece with GPT-2's regex (use_regex), as transformers does; this matters only
    # for odd input such as an upper-case "<|ENDOFTEXT|>", which lower-cases into one CLIP piece.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


class CLIPTokenizer:
    """Prompts -> token ids (B, 77): <|startoftext|>, the prompt's tokens (cut to 75), <|endoftext|>, padding."""

    def __init__(self, tokenizer, pad_token="<|endoftext|>", max_length=77,
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>"):
        self.tok, self.max_length = tokenizer, max_length
        # transformers registers the special tokens, the pad token included, as whole tokens matched in the raw
        # text before normalization. diffusers' pipelines see those ids, so we do the same: "<|endoftext|>" typed
        # in a prompt is the EOS token, and with SD2's pad token "!" every "!" is token 0 on its own, never
        # merged with its neighbours ("wow!!" is wow</w> ! !, not wow</w> !!</w>).
        tokenizer.add_special_tokens([bos_token, eos_token, pad_token])
        ids = [tokenizer.token_to_id(t) for t in (bos_token, eos_token, pad_token)]
        if None in ids:
            missing = [t for t, i in zip((bos_token, eos_token, pad_token), ids) if i is None]
            raise UserError(f"the tokenizer vocabulary has no {missing}; use the tokenizer/ folder of the same model.")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.comma_id = tokenizer.token_to_id(",</w>")  # where A1111's long prompts prefer to break (prompt_syntax.py)

    def encode(self, prompt):
        """The prompt's token ids, without BOS/EOS, truncation or padding."""
        return self.tok.encode(prompt, add_special_tokens=False).ids

    def count_tokens(self, prompt):
        """Tokens the prompt needs with BOS and EOS; more than `max_length` means `__call__` cuts it."""
        return len(self.encode(prompt)) + 2

    def __call__(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.max_length
        rows = []
        for p in prompts:
            ids = [self.bos_id] + self.encode(p)[:n - 2] + [self.eos_id]  # truncation keeps EOS last
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def _special_token(value):
    return value["content"] if isinstance(value, dict) else value  # either "!" or {"content": "!", ...}


def load_tokenizer(folder, pad_token=None):
    """The tokenizer of a model folder: vocab.json + merges.txt (SD's layout), else a tokenizers `tokenizer.json`.

    tokenizer_config.json and special_tokens_map.json (which wins, as in transformers) give the pad token
    (SD1.x pads with "<|endoftext|>", SD2.x with "!") and `model_max_length` (77); `pad_token` overrides the
    folder's (a single file has no tokenizer: it uses the shipped vocabulary with its family's pad token)."""
    vocab, merges, full = (os.path.join(folder, n) for n in ("vocab.json", "merges.txt", "tokenizer.json"))
    if os.path.isfile(vocab) and os.path.isfile(merges):
        tok = clip_bpe_tokenizer(vocab, merges)
    elif os.path.isfile(full):
        try:
            tok = Tokenizer.from_file(full)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise UserError(f"{full} is not a readable tokenizers file ({e}); restore it from the original model.")
        tok.no_truncation()  # __call__ truncates and pads itself
        tok.no_padding()
    else:
        raise UserError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json; "
                        "point at the tokenizer/ folder of a Stable Diffusion model.")

    settings = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(folder, name)):
            settings.update({k: v for k, v in checkpoint.read_json(os.path.join(folder, name)).items() if v is not None})
    max_length = settings.get("model_max_length", 77)
    if not isinstance(max_length, int) or max_length > 10**6:
        max_length = 77  # transformers writes 1e30 when the length was never set
    return CLIPTokenizer(tok, pad_token=pad_token or _special_token(settings.get("pad_token", "<|endoftext|>")),
                         max_length=max_length,
                         bos_token=_special_token(settings.get("bos_token", "<|startoftext|>")),
                         eos_token=_special_token(settings.get("eos_token", "<|endoftext|>")))


# ----------------------------------------------------------------------------------------------------------
# Pixels: images -> CLIP input

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(x):
    """(x − mean) / std per channel, for pixels x in [0, 1] (B, 3, H, W): CLIP's input normalization."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def shorter_side_to(height, width, size):
    """(H', W') with the shorter side `size` and the longer ⌊size · longer / shorter⌋, as transformers and
    torchvision compute it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def pixels_from_pil(images, size=224):
    """PIL images -> (B, 3, size, size), exactly as transformers' `CLIPImageProcessor` (its PIL backend, the one
    PickScore was evaluated with): RGB; the shorter side to `size` with PIL's bicubic filter; a center crop at
    ⌊(H' − size)/2⌋, ⌊(W' − size)/2⌋; 8-bit values / 255 (in float64, then float32, as transformers rescales); then
    `normalize`."""
    rows = []
    for image in images:
        image = image.convert("RGB")
        h, w = shorter_side_to(image.height, image.width, size)
        image = image.resize((w, h), Image.BICUBIC)
        top, left = (h - size) // 2, (w - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)))
        rows.append(torch.from_numpy(pixels.astype(np.float64) * (1 / 255)).float().permute(2, 0, 1))
    return normalize(torch.stack(rows))


def pixels_from_tensor(images, size=224, fit="crop"):
    """Images (B, 3, H, W) in [0, 1] -> (B, 3, size, size), differentiable: the path for training on a score.

    fit="crop" is CLIPImageProcessor's geometry (shorter side to `size`, center crop); fit="pad" is HPSv2's (its
    `ResizeMaxSize`: the longer side to `size`, the other to round(side · size / longer), then zeros, i.e. black,
    split evenly left/right and top/bottom with the odd pixel right/bottom).

    The resize is torch's bicubic with antialias=True: PIL's filter (Keys' cubic, a = −0.5, widened by the
    downscale factor), but on floats. PIL resizes 8-bit images in two passes, horizontal then vertical, rounding
    and clipping to 0..255 after each. So on smooth images the two agree to one grey level, and at sharp edges,
    where bicubic overshoots, PIL's clipping can differ by more; `pixels_from_pil` is the exact processor.
    HPSv2's own transform is this one (torchvision's resize on tensors)."""
    h, w = images.shape[-2:]
    if fit == "crop":
        new = shorter_side_to(h, w, size)
    else:
        scale = size / max(h, w)
        new = (round(h * scale), round(w * scale))
    x = images if new == (h, w) else F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=True)
    if fit == "crop":
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    else:
        pad_h, pad_w = size - new[0], size - new[1]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return normalize(x)
