"""Write weights/tokenizer/ (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json) from
OpenAI CLIP's BPE file `bpe_simple_vocab_16e6.txt.gz`, exactly as OpenAI's `SimpleTokenizer` builds its vocabulary.

    python weights/make_clip_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz

The .gz ships inside the `open-clip-torch` wheel (open_clip/bpe_simple_vocab_16e6.txt.gz); see weights/README.md.
"""
import gzip
import json
import os
import sys

N_MERGES = 49152 - 256 - 2  # OpenAI keeps lines [1, 49152-256-2+1) of the file: 48894 merges


def byte_alphabet():
    """GPT-2's byte-to-unicode table, as a list indexed in vocabulary order.

    Byte-level BPE works on the 256 bytes, but each byte needs a visible character: the printable Latin-1 bytes
    stand for themselves, the other 68 (controls, space, ...) are shifted to U+0100, U+0101, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def main(gz_path, out_dir):
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a '#version' header
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges), "unexpected BPE file"

    # vocabulary order: bytes, bytes that end a word, one token per merge, then the two special tokens
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
        f.write("\n")
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # SD1.x pads with <|endoftext|>; SD2.x model folders override pad_token with "!".
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials},
                  f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1], os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer"))
