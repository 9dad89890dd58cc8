"""The CLIP text encoders and tokenizer of Stable Diffusion 1.x / 2.x / XL, written by hand.

Attribute names are the state-dict keys of transformers' `CLIPTextModel`
(`text_model.encoder.layers.3.self_attn.q_proj`), so a diffusers `text_encoder/` folder loads with one strict
`load_state_dict`. SD1.x uses OpenAI's CLIP ViT-L/14 text tower (768 wide, 12 layers, quick_gelu); SD2.x uses
OpenCLIP's ViT-H/14 tower (1024 wide, 23 layers, gelu); SDXL uses ViT-L/14's and OpenCLIP's ViT-bigG/14 tower with
its text projection (1280 wide, 32 layers, gelu). All share one BPE vocabulary (weights/tokenizer/).
"""
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

import checkpoint
from checkpoint import UserError


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
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"'hidden_act' = {self.hidden_act!r} is not supported (supported: 'quick_gelu', 'gelu')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")


def read_text_config(path):
    """The fields of `text_encoder/config.json` that the model uses.

    transformers writes many generic fields (architectures, dtype, transformers_version, initializer_range,
    projection_dim, dropout, ...) that vary across its versions and change nothing at inference, so unlike the
    UNet config the rest is ignored; only what would make a different network is refused."""
    d = checkpoint.read_json(path)
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserError(f"{path}: 'model_type' = {d['model_type']!r} is not a CLIP text encoder (a full CLIP model has a "
                        "'text_config' and vision weights); use a Stable Diffusion text_encoder/ folder.")
    names = {f.name for f in fields(CLIPTextConfig)}
    try:
        return CLIPTextConfig(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}; use a Stable Diffusion 1.x/2.x/XL text encoder.")


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI's sigmoid approximation of GELU (SD1.x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i only
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
    """A pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, d),
                position_embedding=nn.Embedding(cfg.max_position_embeddings, d),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)))),
            final_layer_norm=nn.LayerNorm(d, eps=cfg.layer_norm_eps),
        ))

    def forward(self, input_ids, clip_skip=0):
        """Token features (B, T, hidden) for input_ids (B, T): what the UNet cross-attends to.

        `clip_skip = k` stops k layers before the end and still applies the final layer norm (diffusers'
        `clip_skip`, i.e. `hidden_states[-(k+1)]`; A1111's "Clip skip 2" is k = 1)."""
        m, n = self.text_model, self.config.num_hidden_layers
        if not 0 <= clip_skip < n:
            raise UserError(f"clip_skip = {clip_skip} is out of range; use 0 (off) to {n - 1}.")
        x = self.embed(input_ids)
        for layer in m.encoder.layers[:n - clip_skip]:
            x = layer(x)
        return m.final_layer_norm(x)

    def embed(self, input_ids):
        """Token plus position embeddings (B, T, hidden): the input of the first layer."""
        e = self.text_model.embeddings
        return e.token_embedding(input_ids) + e.position_embedding(torch.arange(input_ids.shape[1], device=input_ids.device))

    def pooled(self, input_ids):
        """The feature of the EOS token (B, hidden): CLIP's sentence embedding, before its text projection."""
        return self.at_eos(self(input_ids), input_ids)

    def at_eos(self, h, input_ids):
        """The rows of h (B, T, D) at each sequence's EOS token: (B, D)."""
        eos = self.config.eos_token_id
        # checkpoints with the old eos_token_id 2 find EOS as the largest id (49407); the others by its first position
        where = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)
        return h[torch.arange(len(h), device=h.device), where]

    def penultimate_and_pooled(self, input_ids):
        """What SDXL takes from each text encoder, in one pass: the hidden state after the second-to-last layer,
        without the final layer norm (B, T, D) (transformers' `hidden_states[-2]`), and the pooled EOS feature of
        the last layer after it (B, D)."""
        layers = self.text_model.encoder.layers
        x = self.embed(input_ids)
        for layer in layers[:-1]:
            x = layer(x)
        return x, self.at_eos(self.text_model.final_layer_norm(layers[-1](x)), input_ids)


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


def load_text_encoder(folder, dtype=torch.float32, device="cpu", variant=None, projection=False):
    """A `text_encoder/` folder; `projection=True` for a CLIPTextModelWithProjection (SDXL's `text_encoder_2/`)."""
    cfg = read_text_config(os.path.join(folder, "config.json"))
    path = checkpoint.find_weights(folder, ["model"], variant)
    model = checkpoint.build_on_meta(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg))
    checkpoint.load_strict(model, rename_legacy_clip_keys(checkpoint.read_safetensors(path, device)), path, dtype)
    return model.eval().requires_grad_(False)


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


def load_tokenizer(folder):
    """The tokenizer of a model folder: vocab.json + merges.txt (SD's layout), else a tokenizers `tokenizer.json`.

    tokenizer_config.json and special_tokens_map.json (which wins, as in transformers) give the pad token
    (SD1.x pads with "<|endoftext|>", SD2.x with "!") and `model_max_length` (77)."""
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
    return CLIPTokenizer(tok, pad_token=_special_token(settings.get("pad_token", "<|endoftext|>")),
                         max_length=max_length,
                         bos_token=_special_token(settings.get("bos_token", "<|startoftext|>")),
                         eos_token=_special_token(settings.get("eos_token", "<|endoftext|>")))
