"""BLIP, written by hand, as ImageReward (Xu et al. 2023) uses it: a ViT image tower, a BERT text tower that reads the
image through cross-attention in every layer, and a small head on the [CLS] feature that gives the reward.

ImageReward's `score(prompt, image)`:

    v = ViT(pixels)                       # (B, 1 + N, width): class token and N patch tokens, after a final LN
    h = BERT(ids, mask, cross-attn to v)  # every image token is attended: the image mask is all ones
    r = MLP(h[:, 0])                      # 768 -> 1024 -> 128 -> 64 -> 16 -> 1, affine (no activations)
    s = (r - 0.16717362830052426) / 1.0333394966054072

The published model is ViT-L/16 at 224 px (24 layers, 1024 wide, 16 heads) and BERT-base (12 x 768) with
bert-base-uncased's WordPiece vocabulary; every size here is read from the files (`med_config.json` and the tensors'
shapes), so a smaller file in the same format builds a smaller model. Attribute names are the keys of
`ImageReward.pt`, a plain state dict of ImageReward's module: `blip.visual_encoder.blocks.0.attn.qkv.weight`,
`blip.text_encoder.encoder.layer.0.crossattention.self.query.weight`, `mlp.layers.0.weight`, so it loads with one
strict `load_state_dict`.

    model = blip.load_imagereward("ImageReward/")   # ImageReward.pt, med_config.json, vocab.txt
    s = model.score_pil(pil_images, prompts)        # ImageReward's own preprocessing
    s = model(images, prompts)                      # images (B, 3, H, W) in [0, 1], differentiable
"""
import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import BertWordPieceTokenizer

from . import checkpoint
from .checkpoint import UserError

FILES = ("ImageReward.pt", "med_config.json", "vocab.txt")  # what an imagereward:DIR folder holds
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's normalisation of the head's output
MAX_TOKENS = 35  # ImageReward pads and truncates every prompt to 35 tokens, [CLS] and [SEP] included
# ImageReward's Normalize: the mean and std of CLIP's training images, per RGB channel
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_EPS, VIT_HEAD_DIM = 1e-6, 64  # BLIP's ViT: LayerNorm eps 1e-6 everywhere; 64 dims per head (L/16: 1024 / 16)


# ----------------------------------------------------------------------------------------------------------
# Configs: the text tower's from med_config.json, the image tower's from the tensors

@dataclass
class BertConfig:
    # med_config.json's field names (a transformers BertConfig). ImageReward's: vocab 30524 = bert-base-uncased's
    # 30522 + BLIP's added [DEC] and [ENC]; 768 / 3072 / 12 layers / 12 heads; 512 positions.
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    add_cross_attention: bool = True
    position_embedding_type: str = "absolute"
    # med_config.json's `encoder_width` (768) is not used: BLIP overwrites it with the ViT's width (1024) before it
    # builds the cross-attention, so the width of the image tokens is read from the cross-attention's key weights.

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(f"'hidden_act' = {self.hidden_act!r} is not supported (BLIP's is 'gelu')")
        if not self.add_cross_attention:
            raise ValueError("'add_cross_attention' is false, but ImageReward's text tower reads the image through it")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"'position_embedding_type' = {self.position_embedding_type!r} is not supported "
                             "(BLIP's is 'absolute')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")


def read_bert_config(path):
    """The fields of med_config.json that make the network; transformers' bookkeeping (architectures, dropouts,
    initializer_range, type_vocab_size: BLIP's embeddings have no token types) changes nothing at inference."""
    d = checkpoint.read_json(path)
    names = {f.name for f in fields(BertConfig)}
    try:
        return BertConfig(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}; use the med_config.json published with ImageReward.")


@dataclass
class ViTConfig:
    width: int = 1024
    depth: int = 24
    patch_size: int = 16
    image_size: int = 224
    mlp_width: int = 4096

    @property
    def heads(self):
        return self.width // VIT_HEAD_DIM


def vit_config(state, prefix="blip.visual_encoder."):
    """The image tower's sizes from its tensors: width from the class token, patch from the patch convolution, the
    image size from the number of positions ((size / patch)² + 1), depth from the blocks present."""
    width = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    depth = len({k[len(prefix + "blocks."):].split(".")[0] for k in state if k.startswith(prefix + "blocks.")})
    if width % VIT_HEAD_DIM or grid * grid != state[prefix + "pos_embed"].shape[1] - 1:
        raise ValueError(f"its ViT is {width} wide with {state[prefix + 'pos_embed'].shape[1]} positions: not "
                         f"{VIT_HEAD_DIM} dims per head on a square grid of patches, as BLIP's ViTs are")
    return ViTConfig(width, depth, patch, grid * patch, state[prefix + "blocks.0.mlp.fc1.weight"].shape[0])


# ----------------------------------------------------------------------------------------------------------
# Image tower: BLIP's ViT (timm's VisionTransformer as BLIP writes it)

class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)  # q, k, v in one matrix, with bias
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, C/h)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU, nn.GELU's default


class Block(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=VIT_EPS)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=VIT_EPS)
        self.mlp = Mlp(cfg.width, cfg.mlp_width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)  # one p×p patch -> one token

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, h·w, d)


class VisionTransformer(nn.Module):
    """Patches, a class token in front, learned positions, the blocks, and a final LayerNorm on every token (all of
    them go to the text tower, not only the class token)."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.empty(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=VIT_EPS)

    def forward(self, pixels):
        """Normalized pixels (B, 3, size, size) -> image tokens (B, 1 + N, width)."""
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------
# Text tower: BERT with cross-attention to the image tokens in every layer (BLIP's med.py in "multimodal" mode)

class BertSelfAttention(nn.Module):
    """Queries from the text; keys and values from the text (self-attention) or from the image tokens (cross)."""

    def __init__(self, d, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv_width, d), nn.Linear(kv_width, d)

    def forward(self, x, context, mask=None):
        def split(t):  # (B, T, d) -> (B, heads, T, d/heads)
            return t.view(len(t), t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(x.shape)


class AddNorm(nn.Module):
    """BERT's post-LN sublayer output: LN(dense(h) + residual)."""

    def __init__(self, d_in, d, eps):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d), nn.LayerNorm(d, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg, kv_width):
        super().__init__()
        self.self = BertSelfAttention(cfg.hidden_size, cfg.num_attention_heads, kv_width)
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, context, mask=None):
        return self.output(self.self(x, context, mask), x)


class BertLayer(nn.Module):
    """Self-attention over the prompt (padding masked), cross-attention to every image token, then the MLP; each
    sublayer post-LN."""

    def __init__(self, cfg, image_width):
        super().__init__()
        d = cfg.hidden_size
        self.attention = BertAttention(cfg, d)
        self.crossattention = BertAttention(cfg, image_width)
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(d, cfg.intermediate_size)))
        self.output = AddNorm(cfg.intermediate_size, d, cfg.layer_norm_eps)

    def forward(self, x, mask, image):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image)  # no mask: ImageReward gives every image token the mask value 1
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class BertEmbeddings(nn.Module):
    """Word + position embeddings, then LayerNorm (BLIP's BERT has no token-type embeddings)."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings.weight[:ids.shape[1]])


class BertModel(nn.Module):
    def __init__(self, cfg, image_width):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            BertLayer(cfg, image_width) for _ in range(cfg.num_hidden_layers))))

    def forward(self, ids, attention_mask, image):
        """Token ids and their mask (B, T) (1 = token, 0 = padding), image tokens (B, N, w) -> hidden states (B, T, d).
        Padding is masked as keys only (BERT's extended mask); the padded positions' own outputs are unused."""
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the prompt's real tokens
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class BLIP(nn.Module):
    """The two towers under BLIP_Pretrain's names. `vision_proj` and `text_proj` (BLIP's contrastive projections) are
    in the published file but ImageReward's score does not use them; they are kept so the file loads strictly."""

    def __init__(self, vit_cfg, bert_cfg, embed_dim):
        super().__init__()
        self.visual_encoder = VisionTransformer(vit_cfg)
        self.text_encoder = BertModel(bert_cfg, vit_cfg.width)
        self.vision_proj = nn.Linear(vit_cfg.width, embed_dim)
        self.text_proj = nn.Linear(bert_cfg.hidden_size, embed_dim)


class RewardHead(nn.Module):
    """ImageReward's MLP: Linear(768, 1024) → Linear(1024, 128) → Linear(128, 64) → Linear(64, 16) → Linear(16, 1),
    its ReLUs commented out in the original, so the head is one affine map (the dropouts act in training only);
    `layers.0/2/4/6/7` are its keys."""

    def __init__(self, widths):
        super().__init__()
        w = widths
        self.layers = nn.Sequential(nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
                                    nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]),
                                    nn.Linear(w[4], w[5]))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# Tokens and pixels, as ImageReward prepares them

class BertTokenizer:
    """Prompts -> (ids, attention mask), each (B, 35): BLIP's `BertTokenizer` (bert-base-uncased's WordPiece with
    lower-casing, accent stripping and CJK characters split out; BLIP adds [DEC] and [ENC] after the vocabulary, as
    ids 30522 and 30523), called as ImageReward calls it: [CLS] prompt [SEP], truncated and padded to 35 tokens. The
    ids go in as they come: ImageReward's score keeps [CLS] first (it does not swap in BLIP's [ENC] token)."""

    def __init__(self, vocab_path, max_length=MAX_TOKENS):
        try:
            self.tok = BertWordPieceTokenizer(vocab_path, lowercase=True)
        except Exception as e:  # tokenizers raises a plain Exception on a file it cannot read
            raise UserError(f"{vocab_path} is not a WordPiece vocabulary ({e}); use bert-base-uncased's vocab.txt.")
        if self.tok.token_to_id("[PAD]") is None:
            raise UserError(f"{vocab_path} has no [PAD] token; use bert-base-uncased's vocab.txt.")
        self.tok.add_special_tokens(["[DEC]", "[ENC]"])
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=self.tok.token_to_id("[PAD]"), pad_token="[PAD]")

    def __call__(self, prompts):
        rows = self.tok.encode_batch(list(prompts))
        return (torch.tensor([r.ids for r in rows], dtype=torch.long),
                torch.tensor([r.attention_mask for r in rows], dtype=torch.long))


def normalize(x):
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def resized_and_corner(height, width, size):
    """torchvision's Resize(size) and CenterCrop(size) geometry: the shorter side to `size`, the longer to
    ⌊size · longer / shorter⌋; the crop's top-left corner at round((H' − size) / 2), round((W' − size) / 2), Python's
    round (half to even: an excess of 3 starts at 2, where CLIPImageProcessor's floor starts at 1)."""
    if height <= width:
        h, w = size, int(size * width / height)
    else:
        h, w = int(size * height / width), size
    return (h, w), (int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))


def pixels_from_pil(images, size):
    """PIL images -> (B, 3, size, size), ImageReward's transform: Resize(size, bicubic) on the PIL image in its own
    mode, CenterCrop(size), then RGB, ToTensor (8-bit / 255 in float32) and Normalize."""
    rows = []
    for image in images:
        (h, w), (top, left) = resized_and_corner(image.height, image.width, size)
        image = image.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size)).convert("RGB")
        rows.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255))
    return normalize(torch.stack(rows))


def pixels_from_tensor(images, size):
    """Images (B, 3, H, W) in [0, 1] -> (B, 3, size, size), differentiable: the same geometry with torch's bicubic
    (antialiased, as torchvision resizes tensors; ImageReward's ReFL training does this to decoded images). It agrees
    with `pixels_from_pil` to PIL's 8-bit rounding."""
    (h, w), (top, left) = resized_and_corner(*images.shape[-2:], size)
    x = images if (h, w) == tuple(images.shape[-2:]) else F.interpolate(
        images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return normalize(x[..., top:top + size, left:left + size])


# ----------------------------------------------------------------------------------------------------------
# The reward

class ImageReward(nn.Module):
    """ImageReward as a reward (rewards.py's interface): `model(images in [0, 1] (B, 3, H, W), prompts) -> (B,)`,
    differentiable in the pixels, and `score_pil` with ImageReward's own preprocessing (what `npo.py evaluate`
    uses). The score is unbounded (about N(0, 1) over its training data), so 1 − R needs a map to [0, 1] first."""

    differentiable, bounded = True, False

    def __init__(self, vit_cfg, bert_cfg, embed_dim, head_widths, tokenizer, name="imagereward"):
        super().__init__()
        self.blip = BLIP(vit_cfg, bert_cfg, embed_dim)
        self.mlp = RewardHead(head_widths)
        self.tokenizer, self.size, self.__name__ = tokenizer, vit_cfg.image_size, name

    def score(self, pixels, prompts):
        """s = (MLP(BERT(prompt | ViT(x))[CLS]) − mean) / std for normalized pixels (B, 3, size, size)."""
        ids, mask = (t.to(pixels.device) for t in self.tokenizer(prompts))
        image = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(ids, mask, image)
        return (self.mlp(text[:, 0]) - REWARD_MEAN) / REWARD_STD

    def forward(self, images, prompts):
        """R(x, c) for images (B, 3, H, W) in [0, 1]. The model moves to the images' device on first use."""
        param = self.mlp.layers[0].weight
        if param.device != images.device:
            self.to(images.device)
        return self.score(pixels_from_tensor(images.to(param.dtype), self.size), prompts)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        param = self.mlp.layers[0].weight
        return self.score(pixels_from_pil(images, self.size).to(param.device, param.dtype), prompts)


def head_widths(state, prefix="mlp.layers."):
    return [state[prefix + "0.weight"].shape[1]] + [state[f"{prefix}{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]


def load_imagereward(folder, dtype=torch.float32, device="cpu"):
    """ImageReward from the user's folder: the published `ImageReward.pt` (a plain state dict, read with
    `torch.load(weights_only=True)`), its `med_config.json`, and bert-base-uncased's `vocab.txt`. Frozen. ImageReward's
    own loader calls a non-strict `load_state_dict`, which would score with random weights for a file of other
    names; here every key must match."""
    if not os.path.isdir(folder):
        raise UserError(f"imagereward:{folder}: {folder} is not a folder; pass imagereward:DIR, a folder holding "
                        f"{', '.join(FILES)}.")
    for name in FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"imagereward:{folder}: {name} is missing from {folder}; put ImageReward's {name} there "
                            "(ImageReward.pt and med_config.json from THUDM/ImageReward, vocab.txt from "
                            "bert-base-uncased).")
    weights, config, vocab = (os.path.join(folder, name) for name in FILES)
    bert_cfg = read_bert_config(config)
    state = checkpoint.read_weights(weights, device)
    state.pop("blip.text_encoder.embeddings.position_ids", None)  # a constant arange buffer of old BERTs, not a weight
    try:
        vit_cfg = vit_config(state)
        proj_dim, widths = state["blip.vision_proj.weight"].shape[0], head_widths(state)
    except KeyError as e:
        raise UserError(f"{weights} is not an ImageReward state dict (it has no {e.args[0]}); pass the published "
                        "ImageReward.pt.")
    except ValueError as e:
        raise UserError(f"{weights}: {e}; pass the published ImageReward.pt.")
    tokenizer = BertTokenizer(vocab)
    if tokenizer.tok.get_vocab_size() > bert_cfg.vocab_size:
        raise UserError(f"{vocab} has {tokenizer.tok.get_vocab_size()} tokens with BLIP's [DEC] and [ENC], more than "
                        f"the {bert_cfg.vocab_size} of {config}; use bert-base-uncased's vocab.txt.")
    model = checkpoint.build_on_meta(lambda: ImageReward(vit_cfg, bert_cfg, proj_dim, widths, tokenizer))
    checkpoint.load_strict(model, state, weights, dtype,
                           hint="check that ImageReward.pt and med_config.json come from the same ImageReward.")
    return model.eval().requires_grad_(False)
