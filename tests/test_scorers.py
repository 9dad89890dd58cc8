"""The scorers against their authors' recipes run on reference models with the same random weights: PickScore and
CLIP score on transformers' CLIPModel + CLIPImageProcessor + CLIPTokenizer, HPSv2 on open_clip's CLIP + its tokenizer,
LAION-aesthetic on transformers' CLIP-L-shaped tower and the MLP by hand. From a PIL image to a score."""
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from npo import clip
from npo import rewards
from npo import scorers
from npo.checkpoint import UserError
from conftest import TINY_CLIP_VISION, TOKENIZER_DIR, make_clip_dir, make_open_clip, open_clip_modules, randomize

PROMPTS = ["a photo of a cat", "A red circle on a blue square, oil painting", "two dogs playing chess", "x",
           "the quick brown fox jumps over the lazy dog " * 12]  # the last one is cut at 77 tokens


def images(seed=0):
    """PIL images of several sizes and orientations; the last is 224 x 224, which neither path resizes."""
    g = np.random.default_rng(seed)
    sizes = [(300, 400), (517, 333), (100, 90), (64, 64), (224, 224)]
    return [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]


def normalized(x):
    x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5: an output object
    return x / x.norm(dim=-1, keepdim=True)


def transformers_cosines(ref, folder, pictures, prompts):
    """cos(image, text) per pair, the way PickScore's and torchmetrics' code compute it: CLIPImageProcessor, the
    CLIP tokenizer (padding to the longest, truncation at 77), get_*_features, normalize, dot."""
    processor = transformers.CLIPImageProcessorPil()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pixels = processor(images=pictures, return_tensors="pt").pixel_values
    ids = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = normalized(ref.get_image_features(pixel_values=pixels))
        text = normalized(ref.get_text_features(**ids))
    return (image * text).sum(-1)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return str(path), make_clip_dir(path, seed=1)


def assert_scores_close(ours, ref):
    # fp32, different order of operations (SDPA, our reshapes): ~1e-6 relative; a wrong scale or pooling is O(1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_pickscore_matches_its_inference_code(clip_folder):
    folder, ref = clip_folder
    scorer = rewards.load(f"pickscore:{folder}")
    assert isinstance(scorer, scorers.PickScore) and scorer.differentiable and scorer.bounded is False
    expected = ref.logit_scale.exp() * transformers_cosines(ref, folder, images(), PROMPTS)
    assert_scores_close(scorer.score_pil(images(), PROMPTS), expected)


def test_clipscore_matches_torchmetrics_formula(clip_folder):
    folder, ref = clip_folder
    cos = transformers_cosines(ref, folder, images(1), PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: both sides of the clamp are exercised
    assert_scores_close(rewards.load(f"clipscore:{folder}").score_pil(images(1), PROMPTS), 100 * cos.clamp(min=0))


def hpsv2_reference_pixels(image):
    """HPSv2's evaluation transform (its open_clip fork, light_augmentation=True), step by step: RGB, ToTensor,
    ResizeMaxSize(224) = torchvision's tensor resize (bicubic, antialias) of the longer side to 224 and the other to
    round(side · scale), zero padding split evenly, then Normalize. (torchvision itself cannot load beside the CPU
    torch here, so its two calls are written out: F.interpolate with antialias, and a constant pad.)"""
    x = torch.tensor(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)
    height, width = x.shape[1:]
    scale = 224 / max(height, width)
    if scale != 1.0:
        size = (round(height * scale), round(width * scale))
        x = torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = 224 - size[0], 224 - size[1]
        x = torch.nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0)
    mean, std = torch.tensor(clip.CLIP_MEAN).view(3, 1, 1), torch.tensor(clip.CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_hpsv2_matches_its_score_code(tmp_path, form):
    ref = make_open_clip(seed=2)
    path = str(tmp_path / f"HPS_v2_compressed.{form}")
    if form == "pt":
        torch.save({"state_dict": ref.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    scorer = rewards.load(f"hpsv2:{path}")
    assert isinstance(scorer, scorers.HPSv2)
    _, tokenizer = open_clip_modules()
    pixels = torch.stack([hpsv2_reference_pixels(im) for im in images(2)])
    with torch.no_grad():  # HPSv2's score.py: model(image, text) gives normalized features; 100 · their dot
        out = ref(pixels, tokenizer.SimpleTokenizer()(PROMPTS))
        image, text = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    assert_scores_close(scorer.score_pil(images(2), PROMPTS), 100 * (image * text).sum(-1))


def aesthetic_mlp_state(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (o, n) in {"0": (1024, dim), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}.items():
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    return state


def mlp_by_hand(state, e):
    """The improved-aesthetic-predictor: five Linear layers, no nonlinearity (its dropouts are off at inference)."""
    h = e
    for i in ("0", "2", "4", "6", "7"):
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return h[:, 0]


@pytest.mark.parametrize("mlp_format", ["pth", "safetensors"])
def test_aesthetic_matches_clip_l_and_the_mlp_by_hand(tmp_path, mlp_format):
    torch.manual_seed(3)  # CLIP-L/14 as openai ships it: quick_gelu, image tower + projection
    ref = randomize(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(projection_dim=24, **{**TINY_CLIP_VISION, "hidden_act": "quick_gelu"})), 3).eval()
    ref.save_pretrained(tmp_path / "clip-l")
    state = aesthetic_mlp_state(24)
    mlp_path = str(tmp_path / f"sac+logos+ava1-l14-linearMSE.{mlp_format}")
    torch.save(state, mlp_path) if mlp_format == "pth" else save_file(state, mlp_path)
    scorer = rewards.load(f"aesthetic:{tmp_path / 'clip-l'},{mlp_path}")
    pixels = transformers.CLIPImageProcessorPil()(images=images(4), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = mlp_by_hand(state, normalized(ref(pixel_values=pixels).image_embeds))
    assert_scores_close(scorer.score_pil(images(4), [""] * 5), expected)


def test_aesthetic_mlp_is_linear_so_bounded_by_its_weights():
    state = aesthetic_mlp_state(8, seed=5)
    mlp = scorers.AestheticMLP(8).eval()
    mlp.load_state_dict(state)
    e = normalized(torch.randn(64, 8, generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():
        torch.testing.assert_close(mlp(e), mlp_by_hand(state, e))
        w = mlp(torch.eye(8)) - mlp(torch.zeros(1, 8))  # s = w·e + b: the bound of the docstring, b ± ‖w‖
        assert (mlp(e) - mlp(torch.zeros(1, 8))).abs().max() <= w.norm() + 1e-5


# ---------------------------------------------------------------------------------------------------------
# As rewards: differentiable, and the tensor path close to the exact one

def test_scorer_is_a_differentiable_reward(clip_folder):
    folder, _ = clip_folder
    scorer = rewards.load(f"pickscore:{folder}")
    assert rewards.probe(scorer, ["a red circle"]) is True
    with pytest.raises(UserError, match="not bounded"):
        rewards.negate(scorer)  # 1 − R needs a range first
    bounded = rewards.negate(rewards.affine(scorer, -100, 100))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    bounded(x, ["a", "b"]).sum().backward()
    assert x.grad.abs().sum() > 0


def test_tensor_path_equals_pil_path_without_resizing(clip_folder):
    folder, _ = clip_folder
    scorer = rewards.load(f"pickscore:{folder}")
    picture = images()[-1]  # 224 x 224: no resize, so only float rounding separates the two paths
    unit = torch.tensor(np.array(picture)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert_scores_close(scorer(unit, PROMPTS[:1]), scorer.score_pil([picture], PROMPTS[:1]))


# ---------------------------------------------------------------------------------------------------------
# Specs

def test_spec_path_may_hold_colons_and_commas(tmp_path):
    folder = tmp_path / "models:v1,final"  # ':' and ',' in a folder name: all after the first ':' is the path
    make_clip_dir(folder, seed=7, tokenizer=False)
    scorer = rewards.load(f"clipscore:{folder}")
    assert isinstance(scorer, scorers.CLIPScore) and scorer.tokenizer.max_length == 77  # the bundled tokenizer
    save_file(aesthetic_mlp_state(16), str(tmp_path / "mlp.safetensors"))
    assert isinstance(rewards.load(f"aesthetic:{folder},{tmp_path / 'mlp.safetensors'}"), scorers.Aesthetic)


@pytest.mark.parametrize("spec, words", [
    ("pickscore:", "names no weights"),
    ("pickscore:/no/such/folder", "does not exist"),
    ("aesthetic:/only/one/path", "CLIP_PATH,MLP_PATH"),
    ("C:\\models\\PickScore_v1", "pickscore:C:"),        # a Windows path without a scorer name
    ("models/pick:score", "neither module:function"),
])
def test_bad_specs(spec, words):
    with pytest.raises(UserError, match=words.replace("\\", "\\\\")):
        rewards.load(spec)


@pytest.mark.parametrize("spec, fix", [("hps:/nope", "hpsv2:/nope"), ("PickScore:/m/pick", "pickscore:/m/pick"),
                                       ("hps:model", "hpsv2:model"), ("aesthetics:/c,/m", "aesthetic:/c,/m")])
def test_misspelt_scorer_names_the_scorers(spec, fix):
    """A scorer name with a typo is corrected in the sentence, which names every scorer, not taken as a path."""
    with pytest.raises(UserError) as e:
        rewards.load(spec, "--scorer")
    message = str(e.value)
    assert message.startswith(f"--scorer {spec}") or message.startswith(f"--scorer {spec!r}")
    assert fix in message and ", ".join(scorers.SCORERS) in message and f"pickscore:{spec}" not in message


def test_image_tower_alone_cannot_score_prompts(tmp_path):
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=8, **TINY_CLIP_VISION)) \
        .save_pretrained(tmp_path)
    with pytest.raises(UserError, match="only CLIP's image tower"):
        rewards.load(f"pickscore:{tmp_path}")


def test_aesthetic_mlp_of_the_wrong_width(tmp_path, clip_folder):
    folder, _ = clip_folder
    save_file(aesthetic_mlp_state(8), str(tmp_path / "mlp.safetensors"))
    with pytest.raises(UserError, match="misshaped keys.*layers.0.weight.*made for this CLIP"):
        rewards.load(f"aesthetic:{folder},{tmp_path / 'mlp.safetensors'}")


def test_bundled_tokenizer_is_the_one_in_weights():
    assert os.path.samefile(scorers.BUNDLED_TOKENIZER, TOKENIZER_DIR)
