"""A1111's prompt syntax (`npo.py sample --prompt-syntax a1111`): emphasis weights and prompts longer than CLIP's 77
tokens, read as stable-diffusion-webui reads them (its `prompt_parser.parse_prompt_attention` and
`sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase`), so a prompt pasted from A1111 or civitai means the same here.

    (red:1.3) circle      "red" at weight 1.3         (red) ×1.1, ((red)) ×1.21, [red] ÷1.1, nesting multiplies
    \\(red\\)               literal brackets            an unclosed "(" or "[" weighs everything after it
    a BREAK b             "a" and "b" in separate 77-token chunks

A prompt is cut into chunks of 75 tokens, each read by the text encoder on its own as <BOS> chunk <EOS> padding
(77 positions), and the chunks' features are concatenated along the sequence (77·n positions; the UNet's
cross-attention takes any length). A chunk that would split a phrase breaks after the last comma when one is within
the last 20 tokens. Emphasis scales the encoder's OUTPUT: each position's feature times its token's weight, then the
chunk rescaled so its mean is what it was (A1111's "Original" emphasis). The default syntax, "plain", is diffusers'
(one chunk, cut at 77, brackets are text); a1111 on a prompt without brackets that fits in 75 tokens is the same.
"""
import re

import torch

from .checkpoint import UserError

EMPHASIS = 1.1  # "(x)" multiplies x's weight by 1.1, "[x]" by 1 / 1.1
CHUNK = 75      # tokens per chunk, without <BOS> and <EOS>
BACKTRACK = 20  # A1111's comma_padding_backtrack: break after a comma this close to a chunk's end

# The grammar, one token per match: an escaped character (\( \) \[ \] \\), a lone backslash (dropped), an opening
# bracket, a ":w)" that closes a round bracket with weight w, a closing bracket, a run of text, or a lone ':'.
ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*")  # the word BREAK, with the spaces around it


def parse_attention(text):
    """A1111's emphasis grammar: `text` -> [(piece, weight), ...], with ("BREAK", -1) where a chunk must end.

    Brackets scale every piece between them when they close; what is left open at the end closes there; a closing
    bracket with nothing open is text, so no prompt is an error (except a ":w)" whose w is not a number). Runs of
    equal weight are merged. A BREAK inside brackets takes their weight and is then just the word, as in A1111."""
    pieces = []  # [text, weight] lists, scaled in place as brackets close
    opened = {"(": [], "[": []}  # for each open bracket, the index of the first piece it covers

    def scale(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), explicit_weight(weight, text))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), EMPHASIS)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in opened["("]:
        scale(start, EMPHASIS)
    for start in opened["["]:
        scale(start, 1 / EMPHASIS)

    merged = []
    for piece, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


def explicit_weight(number, prompt):
    try:
        return float(number)
    except ValueError:
        raise UserError(f"the weight {number!r} in {prompt[:60]!r} is not a number; write it as in (word:1.2).")


def split_chunks(pieces, tokenize, comma_id, size=CHUNK, backtrack=BACKTRACK):
    """The (token ids, weights) of each chunk of at most `size` tokens, from parsed pieces and `tokenize(text) -> ids`.

    A chunk ends when full or at a BREAK. When it is full and a comma is among its last `backtrack` tokens, the
    tokens after that comma move on to the next chunk, so that a phrase is not split between two chunks."""
    chunks, ids, weights, comma = [], [], [], -1  # comma: the position of the chunk's last comma, -1 for none
    for text, weight in pieces:
        if text == "BREAK" and weight == -1:
            chunks.append((ids, weights))
            ids, weights, comma = [], [], -1
            continue
        for token in tokenize(text):
            if token == comma_id:
                comma = len(ids)
            elif len(ids) == size and comma >= 0 and size - comma <= backtrack:
                chunks.append((ids[:comma + 1], weights[:comma + 1]))
                ids, weights, comma = ids[comma + 1:], weights[comma + 1:], -1
            if len(ids) == size:
                chunks.append((ids, weights))
                ids, weights, comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def tokenize(tokenizer, prompts, backtrack=BACKTRACK, min_chunks=1):
    """Prompts in A1111's syntax -> token ids (B, n, 77) and weights (B, n, 77) float32, n chunks each.

    A chunk's row is <BOS>, its tokens, <EOS>, then the tokenizer's padding (SD1's <EOS>, SD2's "!"), as a plain
    prompt's; <BOS>, <EOS> and padding weigh 1. Prompts with fewer chunks than the longest (or than `min_chunks`) get
    empty chunks, <BOS> <EOS> and padding, which is the empty prompt: this is how A1111 pads a batch, and how it
    pads the shorter of prompt and negative prompt with "Pad prompt/negative prompt" on."""
    size = tokenizer.max_length - 2
    rows = []
    for prompt in prompts:
        chunks = split_chunks(parse_attention(prompt), tokenizer.encode, tokenizer.comma_id, size, backtrack)
        rows.append([([tokenizer.bos_id] + ids + [tokenizer.eos_id] + [tokenizer.pad_id] * (size - len(ids)),
                      [1.0] + weights + [1.0] * (size + 1 - len(weights))) for ids, weights in chunks])
    n = max([min_chunks] + [len(r) for r in rows])
    empty = ([tokenizer.bos_id, tokenizer.eos_id] + [tokenizer.pad_id] * size, [1.0] * (size + 2))
    rows = [r + [empty] * (n - len(r)) for r in rows]
    ids = torch.tensor([[ids for ids, _ in r] for r in rows], dtype=torch.long)
    return ids, torch.tensor([[w for _, w in r] for r in rows], dtype=torch.float32)


def emphasize(z, weights):
    """A1111's emphasis on one chunk's features z (B, 77, D): each position times its token's weight (B, 77), then
    each row rescaled so that its mean over positions and features is the mean it had (A1111 restores the mean "to
    prevent artifacts"). With every weight 1 this is z itself."""
    mean = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights.to(z.device, z.dtype)[..., None]
    return weighted * (mean / weighted.mean(dim=(1, 2), keepdim=True))


def count_chunks(tokenizer, prompt):
    """How many 77-token chunks `prompt` takes in A1111's syntax."""
    return tokenize(tokenizer, [prompt])[0].shape[1]
