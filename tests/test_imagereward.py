"""ImageReward (blip.py) against transformers' BLIP classes on tiny random weights, from a PIL image to the score.

The tiny model is written in the published format: a plain state dict `ImageReward.pt` under ImageReward's keys
(`blip.visual_encoder.*`, `blip.text_encoder.*`, `blip.vision_proj/text_proj.*`, `mlp.layers.*`, and the old
`position_ids` buffer), a `med_config.json` with the published fields, and a WordPiece `vocab.txt`. Its tensors are
those of a transformers `BlipVisionModel` and a `BlipTextModel` with cross-attention, renamed by the map below; the
reference score runs those two models, the head as five matrix products and ImageReward's normalisation."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from npo import blip
from npo import images
import npo
from npo import rewards
from npo import scorers
from npo.checkpoint import UserError

# A WordPiece vocabulary in bert-base-uncased's form: special tokens, punctuation, letters and their "##"
# continuations (so every ASCII word has a spelling), and a few whole words and pieces.
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~0123456789")
         + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
         + ["photo", "of", "the", "cat", "dog", "red", "circle", "cafe", "creme", "play", "##ing", "日"])
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)  # 2 heads of 64, as BLIP's ViTs
TEXT = dict(vocab_size=len(VOCAB) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
HEAD = [64, 32, 16, 8, 4, 1]  # the published head is 768 -> 1024 -> 128 -> 64 -> 16 -> 1
PROMPTS = ["a photo of a cat", "The RED circle, playing!", "café crème & 日本 🙂",
           " ".join(["dogs"] * 40) + " and one cat"]  # the last one runs past 35 tokens


def vision_key(key):
    """transformers' BlipVisionModel key -> the published file's (BLIP's timm ViT), e.g.
    encoder.layers.0.self_attn.qkv.weight -> blip.visual_encoder.blocks.0.attn.qkv.weight."""
    for ours, theirs in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                         ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                         ("self_attn.projection", "attn.proj"), ("self_attn.", "attn."), ("layer_norm1", "norm1"),
                         ("layer_norm2", "norm2"), ("post_layernorm", "norm")):
        key = key.replace(ours, theirs)
    return "blip.visual_encoder." + key


def randomize(module, generator):
    """Every parameter random (LayerNorm scales near 1), so that no part of the network can be skipped unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if "norm" in name.lower() and name.endswith("weight") else 0.2 * noise)


def write_tiny_imagereward(folder, seed=0):
    """The published format at tiny sizes; returns the transformers reference (vision, text, head matrices)."""
    g = torch.Generator().manual_seed(seed)
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(**VISION)).eval()
    text = transformers.BlipTextModel(transformers.BlipTextConfig(
        **TEXT, encoder_hidden_size=VISION["hidden_size"], is_decoder=True, bos_token_id=len(VOCAB),
        sep_token_id=VOCAB.index("[SEP]")), add_pooling_layer=False).eval()  # BLIP's [DEC] id follows the vocab
    randomize(vision, g), randomize(text, g)
    state = {vision_key(k): v for k, v in vision.state_dict().items()}
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})  # med.py's names
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = torch.randn(8, 128, generator=g), torch.zeros(8)
    state["blip.text_proj.weight"], state["blip.text_proj.bias"] = torch.randn(8, 64, generator=g), torch.zeros(8)
    head = [(0.3 * torch.randn(o, i, generator=g), 0.3 * torch.randn(o, generator=g)) for i, o in zip(HEAD, HEAD[1:])]
    for slot, (w, b) in zip((0, 2, 4, 6, 7), head):
        state[f"mlp.layers.{slot}.weight"], state[f"mlp.layers.{slot}.bias"] = w, b
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "ImageReward.pt"))
    config = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1,
              "initializer_range": 0.02, "model_type": "bert", "type_vocab_size": 2, "encoder_width": 768,
              "add_cross_attention": True, **TEXT}  # encoder_width as published: BLIP overrides it with the ViT's
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")
    return vision, text, head


def reference_tokenizer(folder):
    """BLIP's init_tokenizer on our vocabulary: BertTokenizer plus [DEC] (bos) and [ENC]."""
    tok = transformers.BertTokenizer(os.path.join(folder, "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def reference_scores(reference, folder, pil_images, prompts):
    """ImageReward.score, step by step, on transformers' modules."""
    vision, text, head = reference
    size = VISION["image_size"]
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size})
    pixels = processor(images=pil_images, return_tensors="pt").pixel_values
    tokens = reference_tokenizer(folder)(prompts, padding="max_length", truncation=True, max_length=35,
                                         return_tensors="pt")
    with torch.no_grad():
        image = vision(pixel_values=pixels).last_hidden_state
        out = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                   encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long), is_decoder=False)
        r = out.last_hidden_state[:, 0]
        for w, b in head:
            r = F.linear(r, w, b)  # no activation between the layers
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_transformers_reference_is_bert_with_cross_attention():
    """The reference's text layers have the cross-attention ImageReward's have, reading the ViT's width."""
    text = transformers.BlipTextModel(transformers.BlipTextConfig(**TEXT, encoder_hidden_size=128, is_decoder=True,
                                                                  bos_token_id=len(VOCAB), sep_token_id=3))
    assert text.encoder.layer[0].crossattention.self.key.in_features == 128


def smooth_images():
    """RGB pictures whose crops start where floor and round-half-even agree (CLIPImageProcessor floors)."""
    y, x = np.mgrid[0:40, 0:48]
    wide = np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)                  # 48 x 40 -> 38 x 32, crop at 3
    tall = np.stack([255 - y * 4, x * 5, y * 2], -1)[:, :40].astype(np.uint8).repeat(2, 0)[:52]  # 40 x 52 -> 32 x 41
    return [Image.fromarray(wide), Image.fromarray(tall), Image.fromarray(wide[:32, :32]), Image.fromarray(wide)]


def test_scores_equal_the_transformers_blip_reference(tmp_path):
    reference = write_tiny_imagereward(tmp_path)
    model = scorers.load("imagereward", str(tmp_path))
    pil = smooth_images()
    ours = model.score_pil(pil, PROMPTS)
    expected = reference_scores(reference, str(tmp_path), pil, PROMPTS)
    assert ours.shape == (4,) and expected.std() > 0.1  # four different scores, not a constant
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_equals_berttokenizer(tmp_path):
    write_tiny_imagereward(tmp_path)
    ours = blip.BertTokenizer(str(tmp_path / "vocab.txt"))
    reference = reference_tokenizer(str(tmp_path))
    prompts = PROMPTS + ["Hello, World... it's 3:45pm (really?)", "ÀÉÎÕÜ naïve façade", "qwxz zzyzx",
                         "a [MASK] cat and [ENC] a [DEC]", "", "tab\tnew\nline  spaces", "x" * 120]
    ids, mask = ours(prompts)
    expected = reference(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ids.shape == (len(prompts), 35) and (ids == 1).any()  # [UNK] occurs: 🙂 and a 120-letter word
    assert ids[3, -1] == VOCAB.index("[SEP]") and mask[3].all()  # the long prompt is cut and ends with [SEP]
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)


def test_centre_crop_rounds_half_to_even_as_torchvision():
    """torchvision's CenterCrop starts at int(round(excess / 2)): an excess of 3 starts at 2, of 5 at 2, of 1 at 0."""
    rng = np.random.default_rng(0)
    for width, left in ((35, 2), (37, 2), (33, 0)):
        pixels = rng.integers(0, 256, (32, width, 3), dtype=np.uint8)
        got = blip.pixels_from_pil([Image.fromarray(pixels)], 32)[0]
        want = torch.from_numpy(pixels[:, left:left + 32]).permute(2, 0, 1).float() / 255
        mean, std = torch.tensor(blip.MEAN).view(3, 1, 1), torch.tensor(blip.STD).view(3, 1, 1)
        torch.testing.assert_close(got, (want - mean) / std)


def test_is_a_differentiable_reward_and_tensor_path_follows_pil(tmp_path):
    write_tiny_imagereward(tmp_path)
    r = rewards.load(f"imagereward:{tmp_path}")
    assert rewards.probe(r, ["a cat", "a dog"], 64) is True and r.bounded is False
    pil = smooth_images()[:2]
    tensors = [scorers.unit_pixels(im)[None] for im in pil]
    for im, t in zip(pil, tensors):  # same geometry; PIL rounds to 8 bits, torch does not
        diff = blip.pixels_from_tensor(t, 32) - blip.pixels_from_pil([im], 32)
        assert diff.abs().max() < 3 / 255 / min(blip.STD)
    x = tensors[0].clone().requires_grad_(True)
    r(x, ["a cat"]).sum().backward()
    assert x.grad.abs().sum() > 0
    bounded = rewards.negate(rewards.sigmoid(r, 1.0))  # 1 − σ(R): what --npo --reward-sigmoid 1 trains on
    assert 0 < bounded(tensors[0], ["a cat"]).item() < 1


def test_sizes_come_from_the_files(tmp_path):
    write_tiny_imagereward(tmp_path)
    model = blip.load_imagereward(str(tmp_path))
    vit = model.blip.visual_encoder
    assert (len(vit.blocks), vit.blocks[0].attn.heads, model.size) == (2, 2, 32)
    assert model.blip.text_encoder.encoder.layer[0].crossattention.self.key.in_features == 128  # not med's 768
    assert [m.out_features for m in model.mlp.layers if isinstance(m, torch.nn.Linear)] == HEAD[1:]


@pytest.mark.parametrize("name", blip.FILES)
def test_a_missing_file_is_one_sentence_naming_it(tmp_path, capsys, name):
    write_tiny_imagereward(tmp_path / "ir")
    os.remove(tmp_path / "ir" / name)
    folders = [str(tmp_path / f) for f in ("a", "b")]
    for f in folders:  # one sample each, as npo.py sample writes it
        os.makedirs(f)
        images.save_png(Image.new("RGB", (40, 40)), os.path.join(f, "00000.png"), "a cat\nSteps: 1, Seed: 0")
    code = npo.main(["evaluate", *folders, "--scorer", f"imagereward:{tmp_path / 'ir'}",
                     "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "report" / "results.json")
    with pytest.raises(UserError, match=name):
        rewards.load(f"imagereward:{tmp_path / 'ir'}")


def test_bad_files(tmp_path):
    write_tiny_imagereward(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        blip.load_imagereward(str(tmp_path / "ImageReward.pt"))
    state = torch.load(tmp_path / "ImageReward.pt", weights_only=True)
    torch.save({"state_dict": state}, tmp_path / "ImageReward.pt")  # a training checkpoint, not the state dict
    with pytest.raises(UserError, match="not an ImageReward state dict"):
        blip.load_imagereward(str(tmp_path))
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.query.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="1 missing keys"):
        blip.load_imagereward(str(tmp_path))
    with open(tmp_path / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")  # one token past the embedding's rows
    with pytest.raises(UserError, match="vocab.txt has"):
        blip.load_imagereward(str(tmp_path))
    (tmp_path / "med_config.json").write_text(json.dumps({**TEXT, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="hidden_act"):
        blip.load_imagereward(str(tmp_path))
