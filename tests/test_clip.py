"""clip.py against transformers and open_clip: the same random weights give the same features, the same prompts the
same ids, the same images the same pixels."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from npo import clip
from npo.checkpoint import UserError
from conftest import TINY_CLIP_VISION, TOKENIZER_DIR, make_clip_dir, make_open_clip, open_clip_modules, randomize

# Tiny versions of the two text towers. vocab_size stays 49408 so that the real BOS/EOS ids (49406/49407) exist.
SD1_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                hidden_act="quick_gelu", eos_token_id=2)  # SD1.x/2.x configs carry the old eos_token_id 2
SD2_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                hidden_act="gelu", eos_token_id=49407)


def make_reference(tmp_path, seed, **kw):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref


def random_prompt_ids(batch, seed):
    """Ids shaped like tokenizer output: BOS, random tokens, EOS, then padding with EOS (SD1) or "!" (SD2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, 77), generator=g)
    for i, n in enumerate(torch.randint(1, 76, (batch,), generator=g).tolist()):
        ids[i, 0], ids[i, n] = 49406, 49407
        ids[i, n + 1:] = 49407 if i % 2 else 0
    return ids


def assert_close(ours, ref):
    # fp32 with a different order of operations (fused SDPA vs transformers' path, our own reshapes) differs by
    # ~1e-6 relative; any real bug (a wrong mask, activation, norm or layer count) is orders of magnitude larger.
    assert ours.shape == ref.shape
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max|ours-ref| = {err:.3g} > 1e-4 * {scale:.3g}"


@pytest.mark.parametrize("kw", [SD1_LIKE, SD2_LIKE], ids=["sd1_quick_gelu_eos2", "sd2_gelu_eos49407"])
def test_text_encoder_matches_transformers(tmp_path, kw):
    ref = make_reference(tmp_path, 0, **kw)
    ours = clip.load_text_encoder(tmp_path)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    ids = random_prompt_ids(4, 1)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert_close(ours(ids), out.last_hidden_state)
        # diffusers' clip_skip=1: the second-to-last hidden state through the final layer norm
        assert_close(ours(ids, clip_skip=1), ref.final_layer_norm(out.hidden_states[-2]))
        assert_close(ours.pooled(ids), out.pooler_output)


def test_text_encoder_reads_prefixed_and_legacy_keys(tmp_path):
    # transformers 5 saves keys without "text_model."; SD checkpoints (transformers 4) have the prefix and an
    # "embeddings.position_ids" buffer. Both layouts must load to the same model.
    ref = make_reference(tmp_path, 0, **SD1_LIKE)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {f"text_model.{k}": v for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, tmp_path / "model.safetensors")
    ids = random_prompt_ids(2, 2)
    with torch.no_grad():
        assert_close(clip.load_text_encoder(tmp_path)(ids), ref(ids).last_hidden_state)


def test_text_encoder_variant_and_dtype(tmp_path):
    make_reference(tmp_path, 0, **SD2_LIKE)
    os.rename(tmp_path / "model.safetensors", tmp_path / "model.fp16.safetensors")
    model = clip.load_text_encoder(tmp_path, dtype=torch.bfloat16, variant="fp16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photograph Of An ASTRONAUT riding a horse on MARS, Trending On ArtStation",
    "",
    "   ",
    "!!! ?!? ... ,,, (((masterpiece))), [best quality]:1.2 {a|b} <lora:x:0.8> #tag @user $5 100% a&b ~`^",
    "  lots \t of\n\nwhite   space\r\n and\ttabs  ",
    "café naïve Ünïcödé façade crème brûlée",
    "東京の夜景、ネオン 中文提示词 한국어",
    "emoji 🐱🚀 👩‍🚀 ❤️ 🏳️‍🌈",
    "numbers 1234567890 3.14159 1e-5 2024-01-01 ½ ² ٣",
    "it's they're we've I'm you'll he'd don't",
    "wow!! hello! !",
    "x <|endoftext|> y <|startoftext|> z <|ENDOFTEXT|>",
    "fuﬁ ligature and NFC: e\u0301 vs \u00e9",  # a decomposed é must become the composed one
    "the quick brown fox jumps over the lazy dog " * 12,  # > 77 tokens: truncated, EOS kept
]


def reference_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tmp_path, pad):
    shutil.copytree(TOKENIZER_DIR, tmp_path, dirs_exist_ok=True)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # SD2's folders set pad_token "!"
        d = json.loads((tmp_path / name).read_text())
        (tmp_path / name).write_text(json.dumps({**d, "pad_token": pad}))
    ref = transformers.CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"),
                                     os.path.join(TOKENIZER_DIR, "merges.txt"), pad_token=pad)
    ours = clip.load_tokenizer(tmp_path)
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    for p, a, b in zip(PROMPTS, got.tolist(), reference_ids(ref, PROMPTS).tolist()):
        assert a == b, p
    assert torch.equal(ours("a photo of a cat"), got[:1])


def test_tokenizer_known_ids_and_truncation():
    tok = clip.load_tokenizer(TOKENIZER_DIR)
    # ids of the real CLIP vocabulary: a</w>=320, photo</w>=1125, of</w>=539, cat</w>=2368
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.count_tokens("a photo of a cat") == 7
    long = "the quick brown fox jumps over the lazy dog " * 12
    assert tok.count_tokens(long) > tok.max_length == 77
    ids = tok(long)[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] != 49407).all()


def test_tokenizer_from_tokenizer_json(tmp_path):
    ref = transformers.CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"),
                                     os.path.join(TOKENIZER_DIR, "merges.txt"), pad_token="!")
    ref.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json (model_max_length unset: 1e30)
    assert not (tmp_path / "vocab.json").exists()
    ours = clip.load_tokenizer(tmp_path)
    assert ours.max_length == 77 and ours.pad_id == 0
    assert ours(PROMPTS).tolist() == reference_ids(ref, PROMPTS).tolist()


# ---------------------------------------------------------------------------------------------------------
# Bad input

def test_tokenizer_folder_without_vocabulary(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="neither vocab.json"):
        clip.load_tokenizer(tmp_path)


def test_text_encoder_refuses_other_activation(tmp_path):
    make_reference(tmp_path, 0, **SD1_LIKE)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="hidden_act"):
        clip.load_text_encoder(tmp_path)


def test_text_encoder_refuses_full_clip_config(tmp_path):
    make_reference(tmp_path, 0, **SD1_LIKE)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "model_type": "clip"}))
    with pytest.raises(UserError, match="model_type"):
        clip.load_text_encoder(tmp_path)


def test_text_encoder_names_bad_keys(tmp_path):
    make_reference(tmp_path, 0, **SD1_LIKE)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["encoder.layers.1.mlp.fc2.bias"]
    sd["encoder.layers.1.mlp.fc3.weight"] = torch.zeros(3)
    sd["final_layer_norm.weight"] = torch.ones(65)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as e:
        clip.load_text_encoder(tmp_path)
    msg = str(e.value)
    for key in ("text_model.encoder.layers.1.mlp.fc2.bias", "text_model.encoder.layers.1.mlp.fc3.weight",
                "text_model.final_layer_norm.weight"):
        assert key in msg, msg


# ---------------------------------------------------------------------------------------------------------
# The image tower and the two-tower model, against transformers' CLIPModel and open_clip's CLIP

def features(output):
    """transformers 5 returns get_*_features as an output object whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_model_matches_transformers(tmp_path):
    ref = make_clip_dir(tmp_path)
    ours = clip.load_clip(str(tmp_path))
    assert isinstance(ours, clip.CLIPModel) and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 224, 224, generator=g)
    ids = random_prompt_ids(3, 2)
    with torch.no_grad():
        assert_close(ours.image_features(pixels), features(ref.get_image_features(pixel_values=pixels)))
        assert_close(ours.text_features(ids), features(ref.get_text_features(input_ids=ids)))
        assert_close(ours.vision_model(pixels), ref.vision_model(pixel_values=pixels).pooler_output)
    assert ours.logit_scale.item() == ref.logit_scale.item()


def test_vision_model_with_projection_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = randomize(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(projection_dim=16, **{**TINY_CLIP_VISION, "hidden_act": "quick_gelu"})), 3).eval()
    ref.save_pretrained(tmp_path)
    ours = clip.load_clip(str(tmp_path))
    assert type(ours) is clip.CLIPVisionModelWithProjection
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(ours.image_features(pixels), ref(pixel_values=pixels).image_embeds)


def test_clip_folder_of_older_transformers(tmp_path):
    # transformers 4 saved the position_ids buffers of both towers; big models come in shards with an index
    ref = make_clip_dir(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:20]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[20:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"model-0000{1 + (i >= 20)}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    os.remove(tmp_path / "model.safetensors")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(clip.load_clip(str(tmp_path)).image_features(pixels),
                     features(ref.get_image_features(pixel_values=pixels)))


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_openclip_file_matches_open_clip(tmp_path, form):
    ref = make_open_clip(seed=6)
    path = str(tmp_path / f"hps.{form}")
    if form == "pt":  # HPSv2's form: {"state_dict": ...}, read with weights_only=True
        torch.save({"state_dict": ref.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = clip.load_clip(path)  # heads from the widths, as OpenCLIP's published configs have them
    assert isinstance(ours, clip.CLIPModel) and ours.text_config.num_hidden_layers == 2
    assert (ours.vision_config.num_attention_heads, ours.text_config.num_attention_heads) == (3, 2)
    _, tokenizer = open_clip_modules()
    ids = tokenizer.SimpleTokenizer()(["a photo of a cat", "two dogs playing chess in a sunny park, oil painting"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(ours.image_features(pixels), ref.encode_image(pixels))
        assert_close(ours.text_features(ids), ref.encode_text(ids))
    assert ours.logit_scale.item() == ref.logit_scale.item()


def test_openclip_rename_rules():
    # one key of each kind, by hand: the rules, not a table, must produce transformers' names
    w = torch.arange(12.0).view(6, 2)
    out = clip.openclip_to_transformers({
        "visual.class_embedding": torch.zeros(2), "visual.proj": torch.ones(2, 3), "text_projection": torch.ones(2, 5),
        "visual.transformer.resblocks.11.attn.in_proj_weight": w, "transformer.resblocks.0.mlp.c_fc.bias": torch.zeros(4),
        "visual.ln_post.weight": torch.ones(2), "ln_final.bias": torch.zeros(2), "positional_embedding": torch.zeros(7, 2),
        "attn_mask": torch.zeros(7, 7), "logit_scale": torch.tensor(4.6)})
    assert sorted(out) == sorted([
        "vision_model.embeddings.class_embedding", "visual_projection.weight", "text_projection.weight",
        "vision_model.encoder.layers.11.self_attn.q_proj.weight", "vision_model.encoder.layers.11.self_attn.k_proj.weight",
        "vision_model.encoder.layers.11.self_attn.v_proj.weight", "text_model.encoder.layers.0.mlp.fc1.bias",
        "vision_model.post_layernorm.weight", "text_model.final_layer_norm.bias",
        "text_model.embeddings.position_embedding.weight", "logit_scale"])
    assert out["visual_projection.weight"].shape == (3, 2) and out["text_projection.weight"].shape == (5, 2)
    assert torch.equal(out["vision_model.encoder.layers.11.self_attn.k_proj.weight"], w[2:4])


# ---------------------------------------------------------------------------------------------------------
# Pixels

def pil_images():
    """Odd sizes (both orientations, odd crop margins, smaller than 224) and a grey image, from random pixels."""
    g = np.random.default_rng(0)
    sizes = [(300, 400), (517, 333), (224, 224), (90, 100), (227, 300), (301, 227)]
    images = [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]
    return images + [Image.new("L", (64, 48), 128)]


def test_pixels_from_pil_equal_clip_image_processor():
    processor = transformers.CLIPImageProcessorPil()  # the processor PickScore and CLIP-L/14 ship (PIL backend)
    for image in pil_images():
        ref = processor(images=[image], return_tensors="pt").pixel_values
        assert torch.equal(clip.pixels_from_pil([image]), ref), image.size


def smooth_image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    channels = [127 + 100 * np.sin(x / 17) * np.cos(y / 23), 127 + 120 * np.sin((x + y) / 31), 127 + 60 * np.cos(x / 9)]
    return Image.fromarray(np.stack(channels, -1).round().astype(np.uint8))


def test_pixels_from_tensor_is_the_pil_path_on_floats():
    # torch's antialiased bicubic is PIL's filter; PIL rounds to 8 bits after each of its two passes. On a smooth
    # image the differentiable path, stored as 8 bits, is within one grey level of the exact processor; without the
    # antialiasing (plain torch bicubic: a = −0.75, no widening) it would be far off.
    std, mean = torch.tensor(clip.CLIP_STD).view(3, 1, 1), torch.tensor(clip.CLIP_MEAN).view(3, 1, 1)
    for h, w in ((300, 400), (517, 333), (224, 224)):
        image = smooth_image(h, w)
        unit = torch.tensor(np.array(image)).permute(2, 0, 1).float()[None] / 255
        ours, exact = clip.pixels_from_tensor(unit), clip.pixels_from_pil([image])
        levels = ((ours * std + mean) * 255).round() - ((exact * std + mean) * 255).round()
        assert levels.abs().max() <= 1, (h, w)
        if (h, w) == (224, 224):  # no resize: only the normalization, the same float ops
            torch.testing.assert_close(ours, exact, rtol=0, atol=1e-6)
        else:
            assert levels.abs().float().mean() < 0.2  # most pixels agree exactly


def test_pixels_from_tensor_pad_is_hpsv2_resize_max_size():
    # HPSv2's ResizeMaxSize on a 100x60 (H x W) tensor: scale 224/100, new size (224, round(134.4) = 134), pad 90
    # columns: 45 left, 45 right, value 0 before normalization
    x = torch.rand(1, 3, 100, 60, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = clip.pixels_from_tensor(x, fit="pad")
    unnorm = out * torch.tensor(clip.CLIP_STD).view(3, 1, 1) + torch.tensor(clip.CLIP_MEAN).view(3, 1, 1)
    assert out.shape == (1, 3, 224, 224)
    assert unnorm[..., :45].abs().max() < 1e-6 and unnorm[..., 179:].abs().max() < 1e-6
    resized = torch.nn.functional.interpolate(x, size=(224, 134), mode="bicubic", antialias=True)
    torch.testing.assert_close(unnorm[..., 45:179], resized, rtol=0, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Bad CLIP files

def test_load_clip_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        clip.load_clip(str(tmp_path / "nothing"))
    save_file({"token_embedding.weight": torch.zeros(3, 2)}, tmp_path / "text_only.safetensors")
    with pytest.raises(UserError, match="not an OpenCLIP model"):
        clip.load_clip(str(tmp_path / "text_only.safetensors"))
    torch.save({"state_dict": {"visual.class_embedding": torch.zeros(64)}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="is missing"):
        clip.load_clip(str(tmp_path / "partial.pt"))
    torch.save({"fn": print}, tmp_path / "code.pt")  # weights_only refuses anything but tensors and containers
    with pytest.raises(UserError, match="weights_only"):
        clip.load_clip(str(tmp_path / "code.pt"))
    make_clip_dir(tmp_path / "clip")
    d = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**d, "model_type": "siglip"}))
    with pytest.raises(UserError, match="not a CLIP model"):
        clip.load_clip(str(tmp_path / "clip"))
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**d, "projection_dim": 8}))
    with pytest.raises(UserError, match="misshaped keys.*visual_projection.weight"):
        clip.load_clip(str(tmp_path / "clip"))
