"""--prompt-syntax a1111 (prompt_syntax.py) against a reading of A1111's rules written here on its own: a character
scanner that pairs brackets before weighing anything, a chunker that looks for the last comma when a chunk is full,
and transformers' tokenizer and CLIP text models (the tiny random ones of conftest) encoding one prompt at a time, as
A1111 does. Rules (stable-diffusion-webui, modules/prompt_parser.py parse_prompt_attention, modules/sd_hijack_clip.py
tokenize_line / process_tokens / forward, modules/sd_emphasis.py EmphasisOriginal):

- "(x)" ×1.1, "[x]" ×(1/1.1), "(x:w)" ×w, nested brackets multiply as they close; "\\(" "\\)" "\\[" "\\]" "\\\\" are
  the characters, a lone backslash is dropped; an unclosed bracket closes at the end, a closing one with nothing open
  is text; pieces of equal weight merge; "BREAK" (a word) ends the chunk, unless brackets changed its weight -1.
- Chunks of 75 tokens: <BOS> tokens <EOS>, then <EOS> to 77, everything after the first <EOS> replaced by the pad
  token; when a chunk is full and the next token is not a comma, the tokens after the chunk's last comma move to
  the next chunk if that comma is at most 20 tokens from the end.
- z = the encoder's output per chunk; z · weight per position; then z · (mean(z) / mean(z · weight)).
- Batch rows, and prompt vs negative prompt ("Pad prompt/negative prompt"), are padded with the empty prompt's chunk.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from npo import clip
from npo import guided
from npo import lora
import npo
from npo import pipeline
from npo import prompt_syntax
from npo.checkpoint import UserError
from conftest import TOKENIZER_DIR, diffusers_pipeline, make_model_dir, randomize
from test_sample import ATOL, to01

SMALL = ["--steps", "3", "--height", "32", "--width", "32"]
TOK = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
COMMA, BOS, EOS = TOK.get_vocab()[",</w>"], TOK.bos_token_id, TOK.eos_token_id
BREAK_MARK = object()


# ----------------------------------------------------------------------------------------------------------
# The reference reading.

def ref_scan(text):
    """Characters -> ("text", s) | ("open", c) | ("close", c) | ("weight", raw, w) for ":w)". Text runs stop at
    \\ ( ) [ ] and ':'."""
    out, i, specials = [], 0, "\\()[]:"
    while i < len(text):
        c = text[i]
        if c == "\\":
            escaped = i + 1 < len(text) and text[i + 1] in "()[]\\"
            if escaped:
                out.append(("text", text[i + 1]))
            i += 2 if escaped else 1
        elif c in "([":
            out.append(("open", c))
            i += 1
        elif c in ")]":
            out.append(("close", c))
            i += 1
        elif c == ":":
            j = i + 1 + (i + 1 < len(text) and text[i + 1] in "+-")
            k = j
            while k < len(text) and (text[k] in "0123456789."):
                k += 1
            if k > j and k < len(text) and text[k] == ")":
                out.append(("weight", text[i:k + 1], text[i + 1:k]))  # the raw text, and the signed number
                i = k + 1
            else:
                out.append(("text", ":"))
                i += 1
        else:
            j = i
            while j < len(text) and text[j] not in specials:
                j += 1
            out.append(("text", text[i:j]))
            i = j
    return out


def ref_parse(text):
    """[(piece, weight)], BREAK as ("BREAK", -1 times its brackets): brackets paired first, then each piece weighed by
    the brackets around it, multiplied in the order they close."""
    tokens = ref_scan(text)
    pairs, rounds, squares = [], [], []  # pairs: (open index, close index, factor) in closing order
    for t, tok in enumerate(tokens):
        if tok[0] == "open":
            (rounds if tok[1] == "(" else squares).append(t)
        elif tok[0] == "weight" and rounds:
            pairs.append((rounds.pop(), t, float(tok[2])))
        elif tok == ("close", ")") and rounds:
            pairs.append((rounds.pop(), t, 1.1))
        elif tok == ("close", "]") and squares:
            pairs.append((squares.pop(), t, 1 / 1.1))
        elif tok[0] in ("weight", "close"):
            tokens[t] = ("text", tok[1])
    end = len(tokens)
    pairs += [(o, end, 1.1) for o in rounds] + [(o, end, 1 / 1.1) for o in squares]
    pieces = []
    for t, tok in enumerate(tokens):
        if tok[0] != "text":
            continue
        parts = re.split(r"\s*\bBREAK\b\s*", tok[1])
        for k, part in enumerate(parts):
            for piece, start in ([("BREAK", -1.0)] if k else []) + [(part, 1.0)]:
                w = start
                for o, c, factor in pairs:
                    if o < t < c:
                        w *= factor
                pieces.append([piece, w])
    merged = []
    for piece, w in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == w:
            merged[-1][0] += piece
        else:
            merged.append([piece, w])
    return [tuple(p) for p in merged]


def ref_chunks(text):
    """[[(token, weight)], ...] chunks of at most 75."""
    flat = []
    for piece, w in ref_parse(text):
        if piece == "BREAK" and w == -1:
            flat.append(BREAK_MARK)
        else:
            flat += [(t, w) for t in TOK(piece, add_special_tokens=False).input_ids]
    chunks, cur = [], []
    for item in flat:
        if item is BREAK_MARK:
            chunks.append(cur)
            cur = []
            continue
        if len(cur) == 75:
            commas = [i for i, (t, _) in enumerate(cur) if t == COMMA]
            if item[0] != COMMA and commas and 75 - commas[-1] <= 20:
                chunks.append(cur[:commas[-1] + 1])
                cur = cur[commas[-1] + 1:]
            else:
                chunks.append(cur)
                cur = []
        cur.append(item)
    if cur or not chunks:
        chunks.append(cur)
    return chunks


def ref_rows(text, pad):
    """Each chunk as A1111 sends it: ids (77,) and weights (77,)."""
    rows = []
    for chunk in ref_chunks(text):
        ids = [BOS] + [t for t, _ in chunk] + [EOS] * (76 - len(chunk))
        first_end = ids.index(EOS)
        ids = ids[:first_end + 1] + [pad] * (76 - first_end)
        rows.append((ids, [1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk))))
    return rows


def ref_encode(encoder_fn, text, pad, chunks=1):
    """One prompt, chunk by chunk: (1, 77·n, D), padded to `chunks` with the empty prompt's encoding."""
    zs = []
    for ids, weights in ref_rows(text, pad):
        z = encoder_fn(torch.tensor([ids]))
        weighted = z * torch.tensor(weights)[None, :, None]
        zs.append(weighted * (z.mean() / weighted.mean()))
    zs += [encoder_fn(torch.tensor([ref_rows("", pad)[0][0]]))] * (chunks - len(zs))
    return torch.cat(zs, dim=1)


def words(n, comma_at=()):
    """n single-token words ("cat"), with commas (one token each) at the given token positions."""
    out = []
    for i in range(n):
        out.append("," if i in comma_at else "cat")
    return " ".join(out)


TRICKY = [
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",   # A1111's own example
    "((a (b:1.5) c)) [[d]] ((e)",                              # nested, and one left open
    "(unbalanced [also",
    "closing) only] here:",                                     # closers with nothing open are text
    "((a][:b:c [d:3]",
    r"\(literal\) \[x\] back\\slash \lone",
    "(x:+1.2) (y:-.5) (z:2.) (w: 3)",                          # signs, dots, a space before the number
    "a red circle BREAK a blue square, (shiny) BREAK",
    "BREAK starts, BREAK BREAK twice, notBREAK, (in BREAK brackets)",
    words(75), words(76), words(150), words(151),
    words(80, comma_at={50}),                                   # comma 25 from the end: no backtrack
    words(80, comma_at={55}),                                   # 20 from the end: the tail moves on
    words(80, comma_at={54}),                                   # 21: it does not
    words(80, comma_at={74}), words(80, comma_at={75}),        # the last token of a chunk, the first after
    words(80, comma_at={60, 70}),                               # the last comma counts
    "(" + words(70, comma_at={60}) + ":1.4) " + words(30),     # weights travel with the moved tokens
    "masterpiece, best quality, " * 12 + "(red:1.3) circle",
    "", "   ", "()", "[]", "(:1.5)",
]


# ----------------------------------------------------------------------------------------------------------
# Parsing and chunking

def test_parse_matches_a1111_docstring():
    """The examples in A1111's own docstring of parse_prompt_attention."""
    assert prompt_syntax.parse_attention("normal text") == [("normal text", 1.0)]
    assert prompt_syntax.parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert prompt_syntax.parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert prompt_syntax.parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert prompt_syntax.parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = prompt_syntax.parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("text", TRICKY)
def test_parse_matches_reference(text):
    assert prompt_syntax.parse_attention(text) == ref_parse(text)


def test_unbalanced_brackets_are_read_never_refused():
    assert prompt_syntax.parse_attention("a) b] (c") == [("a) b] ", 1.0), ("c", 1.1)]
    assert prompt_syntax.parse_attention("[[x") == [("x", pytest.approx(1 / 1.21))]
    assert prompt_syntax.parse_attention("(in BREAK brackets)")[1] == ("BREAK", pytest.approx(-1.1))  # just a word


def test_a_weight_that_is_not_a_number_is_a_user_error():
    with pytest.raises(UserError, match="not a number"):
        prompt_syntax.parse_attention("(red:1.2.3) circle")
    assert prompt_syntax.parse_attention("red:1.2.3) circle") == [("red:1.2.3) circle", 1.0)]  # nothing open: text


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["sd1_pads_eos", "sd2_pads_bang"])
def test_chunks_match_reference(pad_token):
    tokenizer = clip.load_tokenizer(TOKENIZER_DIR, pad_token)
    for text in TRICKY:
        ids, weights = prompt_syntax.tokenize(tokenizer, [text])
        rows = ref_rows(text, tokenizer.pad_id)
        assert ids[0].tolist() == [r for r, _ in rows], text
        assert weights[0].tolist() == [pytest.approx(w, rel=1e-6) for _, w in rows], text


def test_chunk_boundaries():
    tokenizer = clip.load_tokenizer(TOKENIZER_DIR)

    def sizes(text):
        ids, _ = prompt_syntax.tokenize(tokenizer, [text])
        return [int((row[1:] != EOS).sum()) for row in ids[0]]  # tokens of each chunk, without BOS / EOS
    assert sizes(words(75)) == [75] and sizes(words(76)) == [75, 1] and sizes(words(151)) == [75, 75, 1]
    assert sizes(words(80, comma_at={55})) == [56, 24]  # up to the comma, the rest moves on
    assert sizes(words(80, comma_at={54})) == [75, 5] and sizes(words(80, comma_at={50})) == [75, 5]
    assert sizes("a BREAK b") == [1, 1] and sizes("a BREAK") == [1] and sizes("BREAK a") == [0, 1]
    assert sizes("") == [0]
    ids, weights = prompt_syntax.tokenize(tokenizer, ["x", words(76)])  # the shorter row gets the empty prompt
    assert ids.shape == (2, 2, 77) and ids[0, 1].tolist() == tokenizer([""])[0].tolist()
    assert (weights[0, 1] == 1).all()


# ----------------------------------------------------------------------------------------------------------
# Encoding: SD1/2, SDXL

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """conftest's tiny SD1 model with every text encoder weight random: transformers initialises the final layer
    norm to weight 1, bias 0, which makes each position's features average exactly 0, and A1111's mean restoration
    0 / 0. Real encoders have a bias."""
    path = str(tmp_path_factory.mktemp("tiny_model_random_text"))
    refs = make_model_dir(path)
    randomize(refs["text_encoder"], 3).save_pretrained(os.path.join(path, "text_encoder"))
    return path, refs


PROMPTS = ["a (red:1.3) circle, [blue] square", words(76), TRICKY[0], "masterpiece, best quality, " * 12 + "(red:1.3)",
           "one BREAK two BREAK three", r"\(not emphasis\)"]


def sd_reference(text_encoder, clip_skip):
    def encode(ids):
        out = text_encoder(ids, output_hidden_states=True)
        return out.last_hidden_state if clip_skip == 0 else text_encoder.final_layer_norm(out.hidden_states[-1 - clip_skip])
    return encode


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sd_encoding_matches_reference(tiny_model, clip_skip):
    path, refs = tiny_model
    pipe = pipeline.load_pipeline(path)
    pipe.prompt_syntax = "a1111"
    with torch.no_grad():
        ours = pipe.encode_prompts(PROMPTS, clip_skip=clip_skip)
        n = ours.shape[1] // 77
        ref = torch.cat([ref_encode(sd_reference(refs["text_encoder"], clip_skip), p, EOS, n) for p in PROMPTS])
    assert ours.shape == ref.shape == (len(PROMPTS), 3 * 77, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_plain_prompt_reads_the_same_in_both_syntaxes(tiny_model):
    pipe = pipeline.load_pipeline(tiny_model[0])
    prompts = ["a red circle", "", words(75), "masterpiece, best quality, a photo of a cat on a mat"]
    with torch.no_grad():
        plain = pipe.encode_prompts(prompts)
        pipe.prompt_syntax = "a1111"
        assert torch.equal(pipe.encode_prompts(prompts), plain)


def test_sdxl_encoding_matches_reference(tiny_sdxl):
    path, refs = tiny_sdxl
    pipe = pipeline.load_pipeline(path)
    pipe.prompt_syntax = "a1111"
    te1, te2 = refs["text_encoder"], refs["text_encoder_2"]
    with torch.no_grad():
        context, pooled = pipe.encode_sdxl(PROMPTS)
        n = context.shape[1] // 77
        # each encoder's penultimate hidden state weighted on its own, then side by side (A1111's conditioner)
        h1 = torch.cat([ref_encode(lambda ids: te1(ids, output_hidden_states=True).hidden_states[-2], p, EOS, n)
                        for p in PROMPTS])
        h2 = torch.cat([ref_encode(lambda ids: te2(ids, output_hidden_states=True).hidden_states[-2], p, 0, n)
                        for p in PROMPTS])
        first = torch.tensor([ref_rows(p, 0)[0][0] for p in PROMPTS])  # the pooled embedding of the first chunk
        ref_pooled = te2(first).text_embeds
    assert context.shape == (len(PROMPTS), 3 * 77, 80)
    torch.testing.assert_close(context, torch.cat([h1, h2], dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Both branches of eq. 10, and whole images

def add_text_offsets(pipe, seed):
    for k, name in enumerate(("eta", "delta")):
        lora.add_offset(pipe.text_encoder, name, rank=2, targets=("q_proj", "v_proj", "fc1"))
        g = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for p in lora.parameters(pipe.text_encoder, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("prompt, negative", [(words(80), "ugly, (blurry:1.4)"), ("(red:1.3) circle", words(160))],
                         ids=["long_prompt", "long_negative"])
def test_both_branches_of_eq10(tiny_model, prompt, negative):
    """c' is read with the text encoder at θ + α·η + β·δ, c at θ + η; both get as many chunks, the shorter padded
    with the empty prompt read by its own branch's weights (A1111's "Pad prompt/negative prompt")."""
    pipe = pipeline.load_pipeline(tiny_model[0])
    add_text_offsets(pipe, 5)
    pipe.prompt_syntax = "a1111"
    alpha, beta = 0.6, 0.8
    with torch.no_grad():
        neg, pos = guided.branch_conditioning(pipe, [prompt], negative, alpha, beta, 0, None)
        n = max(prompt_syntax.count_chunks(pipe.tokenizer, t) for t in (prompt, negative))
        for got, text, weights in ((neg, negative, dict(eta=alpha, delta=beta)), (pos, prompt, dict(eta=1.0, delta=0.0))):
            with lora.multipliers(pipe.text_encoder, **weights):
                ref = ref_encode(lambda ids: pipe.text_encoder(ids), text, EOS, n)
            assert got["encoder_hidden_states"].shape == (1, n * 77, 32)
            torch.testing.assert_close(got["encoder_hidden_states"], ref, rtol=1e-5, atol=1e-5)


def test_sdxl_branches_padded_with_the_empty_prompt(tiny_sdxl):
    path, refs = tiny_sdxl
    pipe = pipeline.load_pipeline(path)
    pipe.prompt_syntax = "a1111"
    time_ids = pipe.time_ids(32, 32)
    with torch.no_grad():
        for prompt, negative in ((words(80), "blurry"), ("a cat", words(80))):
            neg, pos = guided.branch_conditioning(pipe, [prompt], negative, 1.0, 1.0, 0, time_ids)
            short = pos if len(prompt) < len(negative) else neg
            empty = pipe.conditioning([""], time_ids)["encoder_hidden_states"]
            assert neg["encoder_hidden_states"].shape == pos["encoder_hidden_states"].shape == (1, 154, 80)
            assert torch.equal(short["encoder_hidden_states"][:, 77:], empty)
        neg, pos = guided.branch_conditioning(pipe, [words(80)], None, 1.0, 1.0, 0, time_ids)  # diffusers' zeros
        assert neg["encoder_hidden_states"].shape == (1, 154, 80) and not neg["encoder_hidden_states"].any()


def test_generate_matches_diffusers_on_the_reference_embeddings(tiny_model):
    """A long prompt with emphasis, read by the reference, fed to StableDiffusionPipeline as prompt_embeds."""
    path, refs = tiny_model
    prompt, negative = "(red:1.3) circle, " + words(90, comma_at={40}), "[ugly], blurry"
    with torch.no_grad():
        encode = sd_reference(refs["text_encoder"], 0)
        c, uc = ref_encode(encode, prompt, EOS, 2), ref_encode(encode, negative, EOS, 2)
        ref = diffusers_pipeline(path, refs)(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=4,
                                             height=32, width=32, output_type="pt",
                                             generator=torch.Generator("cpu").manual_seed(7)).images
    pipe = pipeline.load_pipeline(path)
    pipe.prompt_syntax = "a1111"
    ours = guided.generate(pipe, [prompt], [7], negative, steps=4, height=32, width=32)
    assert (to01(ours) - ref).abs().max() <= ATOL


# ----------------------------------------------------------------------------------------------------------
# The command line

def test_cli_prompt_syntax(tiny_model, tmp_path, capsys):
    path = tiny_model[0]
    rows = tmp_path / "rows.jsonl"
    prompt = "a (red:1.3) circle, ((unbalanced [x " + words(80)
    rows.write_text(json.dumps({"prompt": prompt, "negative_prompt": "[blurry]"}) + "\n")
    out = tmp_path / "a.png"
    assert npo.main(["sample", "--model", path, *SMALL, "--prompts-file", str(rows), "--prompt-syntax", "a1111",
                     "--out", str(out)]) == 0
    assert "truncated" not in capsys.readouterr().err
    picture = Image.open(out)
    assert picture.text["parameters"].startswith(f"{prompt}\nNegative prompt: [blurry]\n")  # as written
    assert "Pad conds: True" in picture.text["parameters"]  # 2 chunks and 1: A1111 pads alike with this key
    pipe = pipeline.load_pipeline(path)
    pipe.prompt_syntax = "a1111"
    expected = guided.generate(pipe, [prompt], [0], ["[blurry]"], steps=3, height=32, width=32)
    from npo.images import to_pil
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(to_pil(expected)[0]))

    assert npo.main(["sample", "--model", path, *SMALL, "--prompt", words(80), "--out", str(tmp_path / "p.png")]) == 0
    assert "truncated" in capsys.readouterr().err  # plain (the default) still cuts at 77, and says so
    assert npo.main(["sample", "--model", path, *SMALL, "--prompt", "(red:1.2.3)", "--prompt-syntax", "a1111",
                     "--out", str(tmp_path / "bad.png")]) == 2
    assert "not a number" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad.png")


def test_cli_batches_keep_each_image_as_alone(tiny_model, tmp_path):
    """Rows of a batch are padded to its longest text, so jobs batch only with jobs of the same length: an image is
    the same at --batch-size 3 as alone."""
    path = tiny_model[0]
    rows = tmp_path / "rows.txt"
    rows.write_text("\n".join(["a (red) circle", words(80), "[blue] square"]) + "\n")
    common = ["sample", "--model", path, *SMALL, "--prompts-file", str(rows), "--prompt-syntax", "a1111"]
    assert npo.main([*common, "--batch-size", "3", "--out", str(tmp_path / "b3")]) == 0
    assert npo.main([*common, "--batch-size", "1", "--out", str(tmp_path / "b1")]) == 0
    names = sorted(os.listdir(tmp_path / "b1"))
    assert len(names) == 3 and names == sorted(os.listdir(tmp_path / "b3"))
    for name in names:
        one, three = (np.asarray(Image.open(tmp_path / b / name).convert("RGB")).astype(int) for b in ("b1", "b3"))
        assert np.abs(one - three).max() <= 1, name  # batched fp32 reorders sums: one grey level at most
    assert "Pad conds" not in Image.open(tmp_path / "b1" / names[0]).text["parameters"]  # "" and the prompt: 1 chunk


def test_sd2_encoding_matches_reference(tmp_path):
    """SD2's text encoder (gelu, eos_token_id 49407) and tokenizer (padding with "!", id 0 after the first EOS)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    ref = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 hidden_act="gelu", eos_token_id=49407)), 4).eval()
    ref.save_pretrained(tmp_path)
    pipe = pipeline.Pipeline(unet=None, vae=None, text_encoder=clip.load_text_encoder(tmp_path),
                             tokenizer=clip.load_tokenizer(TOKENIZER_DIR, "!"), prompt_syntax="a1111")
    with torch.no_grad():
        ours = pipe.encode_prompts(PROMPTS)
        n = ours.shape[1] // 77
        expected = torch.cat([ref_encode(lambda ids: ref(ids).last_hidden_state, p, 0, n) for p in PROMPTS])
    assert pipe.tokenizer.pad_id == 0 and ours.shape == (len(PROMPTS), 3 * 77, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
