"""The paper's evaluation scorers, as rewards: PickScore, HPSv2, LAION-aesthetic v2 and CLIP score.

Each is a reward in rewards.py's sense, `scorer(images in [0, 1] (B, 3, H, W), prompts) -> (B,)`, differentiable in
the pixels (`clip.pixels_from_tensor`), so it can train η or, as 1 − R, δ. Each also scores PIL images with its
authors' own preprocessing (`score_pil`), which `npo.py evaluate` uses. Weights come only from files you give:

    pickscore:PATH                 a transformers CLIPModel folder: yuvalkirstain/PickScore_v1 (CLIP-H/14)
    hpsv2:PATH                     HPSv2's OpenCLIP ViT-H-14 file (HPS_v2_compressed.pt, or a safetensors of it)
    aesthetic:CLIP_PATH,MLP_PATH   CLIP-L/14 (openai/clip-vit-large-patch14, a transformers folder) and the
                                   improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE.pth, or safetensors)
    clipscore:PATH                 any CLIP with both towers (torchmetrics' default is openai/clip-vit-large-patch14)
    spm:PATH                       SPO's step-aware preference model (Liang et al. 2024): the published
                                   sd-v1-5_step-aware_preference_model.bin or sdxl_step-aware_preference_model.bin

A transformers folder's own tokenizer files are used when it has them, else the CLIP vocabulary in weights/ (all
these models share it). The scores are unbounded rewards (`bounded = False`); 1 − R needs them mapped to [0, 1]
first (`--reward-range LOW,HIGH`). Their exact ranges, and what Stable Diffusion 1.5 scores (the paper's table 1):

    scorer      score                          range                          SD 1.5, Pick-a-Pic prompts
    pickscore   exp(logit_scale) · cos(x, c)   ±exp(logit_scale) = ±100      20.75 (best models ~22.5)
    hpsv2       100 · cos(x, c)                ±100                          26.84 (~28.3)
    aesthetic   MLP(x / ‖x‖), linear           b ± ‖w‖ of its weights        5.54 (~6.5); the ratings were 1..10
    clipscore   100 · max(cos(x, c), 0)        0 .. 100                      about 30

so e.g. `--reward-range 17,25` (PickScore), `20,32` (HPSv2), `1,10` (aesthetic) or `0,100` (CLIP score).

    imagereward:DIR                ImageReward (a BLIP model, blip.py): DIR holds ImageReward.pt, med_config.json and
                                   bert-base-uncased's vocab.txt; its score is normalised to about N(0, 1), so
                                   `--reward-sigmoid 1` (σ(R)) or `--reward-range=-2,2` maps it to [0, 1]

The step-aware preference model (SPM) is PickScore's CLIP-H told the diffusion timestep t of the image it scores
(`StepAwareCLIP`), so it is a timestep-aware reward (rewards.py): SPO's sampler calls it as `spm(x̂_0 in [0, 1], prompts,
timesteps=t)` on each candidate's decoded x̂_0 at that candidate's timestep, and on the finished image at t = 0. Without
timesteps (`npo.py evaluate`, a reward that ignores t) it scores at t = 0, as SPO scores its finished images. Its score
is PickScore's, exp(logit_scale) · cos, with the image embedding at t, on the same ±100 scale.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import blip
from . import checkpoint
from . import clip
from .checkpoint import UserError

SCORERS = ("pickscore", "hpsv2", "aesthetic", "clipscore", "imagereward", "spm")  # the names before the ':' of a SCORER:PATH spec
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tokenizer")


def cosine(a, b):
    """cos(a, b) = a/‖a‖ · b/‖b‖, row by row: the authors' normalize-then-dot."""
    return ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def unit_pixels(image):
    """A PIL image -> (3, H, W) float32 in [0, 1]: 8-bit values / 255, as torchvision's ToTensor."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)


class Scorer(nn.Module):
    """A frozen CLIP and its tokenizer as a reward. Subclasses define `score(pixels, prompts)` on CLIP input."""

    differentiable, bounded = True, False
    fit = "crop"  # the geometry of pixels_from_tensor: CLIPImageProcessor's; "pad" is HPSv2's

    def __init__(self, model, tokenizer, name):
        super().__init__()
        self.model, self.tokenizer, self.__name__ = model, tokenizer, name
        self.size = model.vision_config.image_size

    def forward(self, images, prompts):
        """R(x, c) for images (B, 3, H, W) in [0, 1], differentiable in the pixels. The scorer moves to the images'
        device on first use (training decodes them on the UNet's)."""
        param = self.model.visual_projection.weight
        if param.device != images.device:
            self.to(images.device)
        return self.score(clip.pixels_from_tensor(images.to(param.dtype), self.size, self.fit), prompts)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        """R(x, c) for PIL images, preprocessed as the scorer's authors do: CLIPImageProcessor, or for HPSv2 its
        ToTensor + tensor resize (which is `pixels_from_tensor` with fit="pad")."""
        if self.fit == "pad":
            pixels = torch.cat([clip.pixels_from_tensor(unit_pixels(im)[None], self.size, self.fit) for im in images])
        else:
            pixels = clip.pixels_from_pil(images, self.size)
        param = self.model.visual_projection.weight
        return self.score(pixels.to(param.device, param.dtype), prompts)

    def text_and_image(self, pixels, prompts):
        """(image embeddings, text embeddings), not normalized; prompts longer than 77 tokens are cut, as the
        authors' tokenizers cut them."""
        ids = self.tokenizer(list(prompts)).to(pixels.device)
        return self.model.image_features(pixels), self.model.text_features(ids)


class PickScore(Scorer):
    def score(self, pixels, prompts):
        """s(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c)): CLIP's logit, as PickScore's inference code."""
        image, text = self.text_and_image(pixels, prompts)
        return self.model.logit_scale.exp() * cosine(image, text)


class HPSv2(Scorer):
    fit = "pad"

    def score(self, pixels, prompts):
        """s(x, c) = 100 · cos(E_img(x), E_txt(c)): HPSv2's cosine, reported ×100 by its authors."""
        image, text = self.text_and_image(pixels, prompts)
        return 100 * cosine(image, text)


class CLIPScore(Scorer):
    def score(self, pixels, prompts):
        """s(x, c) = 100 · max(cos(E_img(x), E_txt(c)), 0): torchmetrics' CLIPScore (Hessel et al. with w = 100)."""
        image, text = self.text_and_image(pixels, prompts)
        return 100 * cosine(image, text).clamp(min=0)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor's head (LAION-aesthetic v2): Linear(d, 1024) → Linear(1024, 128) →
    Linear(128, 64) → Linear(64, 16) → Linear(16, 1), with no nonlinearity between them (the dropouts act in training
    only), under that project's keys `layers.0/2/4/6/7`. Being linear, it is s = w·e + b for a unit e, so its
    scores lie in b ± ‖w‖."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings):
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(path, dim, dtype=torch.float32, device="cpu"):
    mlp = checkpoint.build_on_meta(lambda: AestheticMLP(dim))
    checkpoint.load_strict(mlp, checkpoint.read_weights(path, device), f"{path} (an aesthetic MLP on {dim}-dim CLIP "
                           "embeddings)", dtype, hint="pass the improved-aesthetic-predictor MLP made for this CLIP.")
    return mlp.eval().requires_grad_(False)


class Aesthetic(Scorer):
    def __init__(self, model, mlp, name):
        super().__init__(model, None, name)
        self.mlp = mlp

    def score(self, pixels, prompts):
        """s(x) = MLP(e / ‖e‖), e = E_img(x): the LAION-aesthetic v2 score (the prompt plays no part)."""
        e = self.model.image_features(pixels)
        return self.mlp(e / e.norm(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------
# SPO's step-aware preference model: CLIP's image tower with adaLN on a timestep embedding (DiT's conditioning).

FREQUENCIES = 256  # sinusoidal features of t fed to the timestep MLP (DiT's frequency_embedding_size)


def timestep_features(t, dim=FREQUENCIES, max_period=10000):
    """[cos(t ω_i), sin(t ω_i)], ω_i = max_period^(−i / (dim/2)) for i < dim/2: the sinusoidal embedding of GLIDE
    and DiT, of timesteps t (B,), in float32 (B, dim)."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * omega
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x, shift, scale):
    """adaLN: x · (1 + scale) + shift, with a (shift, scale) per image broadcast over the tokens."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """c = MLP(features(t)): Linear(256, d) → SiLU → Linear(d, d), under SPO's keys `t_embedder.mlp.0/2`."""

    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class AdaLNEncoderLayer(clip.CLIPEncoderLayer):
    """CLIP's pre-LN block with adaLN from c (DiT's adaLN, its gates not offset by 1; SPO starts them at 1):

        (b₁, s₁, g₁, b₂, s₂, g₂) = Linear(SiLU(c))
        x = x + g₁ · attn(LN₁(x) · (1 + s₁) + b₁)
        x = x + g₂ · mlp(LN₂(x) · (1 + s₂) + b₂)"""

    def __init__(self, cfg):
        super().__init__(cfg, causal=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.self_attn(modulate(self.layer_norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.layer_norm2(x), shift2, scale2))


class StepAwareVisionTransformer(clip.CLIPVisionTransformer):
    """CLIP's image tower with an adaLN block per layer, and a final (shift, scale) = Linear(SiLU(c)) of the pooled
    class token: LN_post(x_cls) · (1 + scale) + shift."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.hidden_size
        layers = nn.ModuleList(AdaLNEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layers=layers))  # in place of CLIP's plain layers
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, pixels, c):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.post_layernorm(x[:, 0]), shift, scale)


class StepAwareCLIP(clip.CLIPModel):
    """SPO's time-conditioned CLIP: PickScore's two towers, the image tower conditioned on c = t_embedder(t). The text
    tower, the projections and logit_scale are CLIP's (SPO trains them all from PickScore)."""

    def __init__(self, text_cfg, vision_cfg):
        super().__init__(text_cfg, vision_cfg)
        self.vision_model = StepAwareVisionTransformer(vision_cfg)
        self.t_embedder = TimestepEmbedder(vision_cfg.hidden_size)

    def image_features(self, pixels, timesteps):
        """Image embeddings (B, projection_dim) at timesteps (B,), not normalized."""
        return self.visual_projection(self.vision_model(pixels, self.t_embedder(timesteps)))


def spo_pixels(images, size):
    """Images (B, 3, H, W) in [0, 1] -> CLIP input (B, 3, size, size), as SPO prepares x̂_0 for its preference model:
    the shorter side to `size` by torch's bicubic without antialiasing, sides rounded half up; torchvision's center
    crop (offsets round((H' − size) / 2)); clamped to [0, 1]; `clip.normalize`. (SPO does it on [-1, 1] pixels; the
    resize is linear, so it commutes with x / 2 + 0.5.)"""
    h, w = images.shape[-2:]
    new = (int(h * size / min(h, w) + 0.5), int(w * size / min(h, w) + 0.5))
    x = images if new == (h, w) else F.interpolate(images, size=new, mode="bicubic", align_corners=False)
    top, left = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    return clip.normalize(x[..., top:top + size, left:left + size].clamp(0, 1))


class StepAwarePreference(Scorer):
    """SPO's step-aware preference model as a timestep-aware reward. Its CLIP is `self.model`, as in SPO's
    StepAwarePreferenceModel, so the published file's keys (`model.vision_model.…`, `model.t_embedder.…`) are ours."""

    timestep_aware = True

    def forward(self, images, prompts, timesteps=None):
        """s(x, c, t) for images (B, 3, H, W) in [0, 1] at timesteps t (B,) or one int (None: t = 0), on SPO's
        preprocessing (`spo_pixels`), differentiable in the pixels."""
        param = self.model.visual_projection.weight
        if param.device != images.device:
            self.to(images.device)
        return self.score(spo_pixels(images.to(param.dtype), self.size), prompts, timesteps)

    def score(self, pixels, prompts, timesteps=None):
        """s(x, c, t) = exp(logit_scale) · cos(E_img(x, t), E_txt(c)): SPO's get_preference_score."""
        t = torch.as_tensor(0 if timesteps is None else timesteps, device=pixels.device).expand(len(pixels))
        image = self.model.image_features(pixels, t)
        text = self.model.text_features(self.tokenizer(list(prompts)).to(pixels.device))
        return self.model.logit_scale.exp() * cosine(image, text)


def load_spm(path, dtype=torch.float32, device="cpu"):
    """The step-aware preference model of a file SPO published (`*_step-aware_preference_model.bin`, read with
    `torch.load(weights_only=True)`, or a safetensors of it), loaded strictly.

    The file is the state dict of SPO's StepAwarePreferenceModel: every weight of PickScore's CLIP-H under `model.`,
    plus the timestep MLP and the adaLN layers. The widths and depths are read from the shapes; the facts that are not
    in the weights are PickScore's config (GELU, 16 heads in each tower: `clip.openclip_configs`' rule), and the
    tokenizer is the shared CLIP vocabulary (pooling at EOS, the pad token does not change the score)."""
    state = {k: v for k, v in checkpoint.read_weights(path, device).items() if not k.endswith(".position_ids")}
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    hint = ("pass SPO's *_step-aware_preference_model.bin (a state dict with keys model.vision_model..., "
            "model.t_embedder...).")
    try:
        text_cfg, vision_cfg = clip.openclip_configs(inner)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{path} is not a step-aware preference model ({e} is missing or malformed); {hint}")
    if text_cfg is None:
        raise UserError(f"{path} has no text tower, so it is not a step-aware preference model; {hint}")
    scorer = checkpoint.build_on_meta(
        lambda: StepAwarePreference(StepAwareCLIP(text_cfg, vision_cfg), clip.load_tokenizer(BUNDLED_TOKENIZER), "spm"))
    checkpoint.load_strict(scorer, state, f"{path} (a step-aware preference model)", dtype, hint=hint)
    return scorer.eval().requires_grad_(False)


def clip_and_tokenizer(path, dtype, device):
    """A CLIP with both towers, and the tokenizer files beside it (else the bundled CLIP vocabulary)."""
    model = clip.load_clip(path, dtype, device)
    if not isinstance(model, clip.CLIPModel):
        raise UserError(f"{path} holds only CLIP's image tower; this scorer compares images with prompts, so pass a "
                        "CLIPModel with both towers.")
    own = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "tokenizer.json"))
    return model, clip.load_tokenizer(path if own else BUNDLED_TOKENIZER)


def weight_paths(name, argument):
    """The files a scorer's argument names: [PATH], or for aesthetic [CLIP_PATH, MLP_PATH], split at the last comma
    (so the CLIP path may hold commas)."""
    if name != "aesthetic":
        return [argument]
    clip_path, comma, mlp_path = argument.rpartition(",")
    if not comma or not clip_path or not mlp_path:
        raise UserError(f"aesthetic:{argument} names one file; pass aesthetic:CLIP_PATH,MLP_PATH (the CLIP-L/14 "
                        "folder, a comma, then the aesthetic MLP file).")
    return [clip_path, mlp_path]


def load(name, argument, dtype=torch.float32, device="cpu"):
    """The scorer `name` (one of SCORERS) on the weights `argument` names (see `weight_paths`)."""
    if name == "imagereward":
        return blip.load_imagereward(argument, dtype, device)
    if name == "aesthetic":
        clip_path, mlp_path = weight_paths(name, argument)
        model = clip.load_clip(clip_path, dtype, device)
        mlp = load_aesthetic_mlp(mlp_path, model.vision_config.projection_dim, dtype, device)
        return Aesthetic(model, mlp, name)
    if name == "spm":
        return load_spm(argument, dtype, device)
    kind = {"pickscore": PickScore, "hpsv2": HPSv2, "clipscore": CLIPScore}[name]
    return kind(*clip_and_tokenizer(argument, dtype, device), name)
