"""clip.py against transformers: the same random weights give the same features, the same prompts the same ids."""
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import clip
from checkpoint import UserError
from conftest import TOKENIZER_DIR

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
