"""ImageReward: ours (blip.py) against transformers' BLIP (BlipVisionModel + BlipTextModel with cross-attention, the
head as five matrix products) at the same batch, fp32, on the CPU: seconds per scoring call and peak memory.

    python -m benchmarks.imagereward                # from the repository root; small: ViT 384 x 6, BERT 384 x 6
    python -m benchmarks.imagereward --shape tiny   # a check that the command runs

Both score the same random pixels (normalized, 224 px) and the same prompts from one ImageReward.pt in the published
format (random weights, written once to a temporary folder); tokenization is inside the timed call for both. Each side
runs in a fresh process, so its peak resident memory (VmHWM, reset before the timed calls) is its own. Imports only
the project and transformers."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from npo import blip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # (ViT width, depth, BERT width, layers, BERT heads); ImageReward's own is (1024, 24, 768, 12, 12)
    "small": (384, 6, 384, 6, 6),
    "tiny": (128, 2, 64, 2, 2),
}
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'") + [chr(c) for c in range(97, 123)]
         + [f"##{chr(c)}" for c in range(97, 123)] + ["photo", "of", "the", "cat", "trending", "on", "artstation"])
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072


def configs(shape):
    vw, vd, tw, td, th = SHAPES[shape]
    import transformers
    vision = transformers.BlipVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vd,
                                           num_attention_heads=vw // 64, image_size=224, patch_size=16,
                                           hidden_act="gelu", layer_norm_eps=1e-6)
    text = transformers.BlipTextConfig(vocab_size=len(VOCAB) + 2, hidden_size=tw, intermediate_size=4 * tw,
                                       num_hidden_layers=td, num_attention_heads=th, max_position_embeddings=64,
                                       encoder_hidden_size=vw, is_decoder=True, bos_token_id=len(VOCAB),
                                       sep_token_id=3, pad_token_id=0)
    return vision, text


def published_key(key):
    """transformers' BlipVisionModel key -> ImageReward.pt's (BlipTextModel's keys are med.py's already)."""
    for theirs, ours in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                         ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                         ("self_attn.projection", "attn.proj"), ("self_attn.", "attn."), ("layer_norm1", "norm1"),
                         ("layer_norm2", "norm2"), ("post_layernorm", "norm")):
        key = key.replace(theirs, ours)
    return key


def write_weights(shape, folder):
    """ImageReward.pt, med_config.json and vocab.txt of the given shape, random weights (seed 0)."""
    import transformers
    torch.manual_seed(0)
    vision_cfg, text_cfg = configs(shape)
    vision = transformers.BlipVisionModel(vision_cfg)
    text = transformers.BlipTextModel(text_cfg, add_pooling_layer=False)
    state = {"blip.visual_encoder." + published_key(k): v for k, v in vision.state_dict().items()}
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    vw, tw = vision_cfg.hidden_size, text_cfg.hidden_size
    for name, shape_ in (("blip.vision_proj", (256, vw)), ("blip.text_proj", (256, tw)), ("mlp.layers.0", (1024, tw)),
                         ("mlp.layers.2", (128, 1024)), ("mlp.layers.4", (64, 128)), ("mlp.layers.6", (16, 64)),
                         ("mlp.layers.7", (1, 16))):
        state[name + ".weight"], state[name + ".bias"] = torch.randn(shape_) / shape_[1] ** 0.5, torch.zeros(shape_[0])
    torch.save(state, os.path.join(folder, "ImageReward.pt"))
    med = {k: getattr(text_cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "max_position_embeddings", "layer_norm_eps")}
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump({**med, "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 768}, f)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")


def reference_fn(folder, shape):
    """ImageReward.score on transformers' classes, with the same tensors."""
    import transformers
    state = torch.load(os.path.join(folder, "ImageReward.pt"), weights_only=True)
    vision_cfg, text_cfg = configs(shape)
    vision = transformers.BlipVisionModel(vision_cfg).eval()
    vision.load_state_dict({k: state["blip.visual_encoder." + published_key(k)] for k in vision.state_dict()})
    text = transformers.BlipTextModel(text_cfg, add_pooling_layer=False).eval()
    text.load_state_dict({k: state["blip.text_encoder." + k] for k in text.state_dict()})
    head = [(state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"]) for i in (0, 2, 4, 6, 7)]
    tokenizer = transformers.BertTokenizer(os.path.join(folder, "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    def score(pixels, prompts):
        t = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image = vision(pixel_values=pixels).last_hidden_state
        h = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=image,
                 encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long)).last_hidden_state[:, 0]
        for w, b in head:
            h = F.linear(h, w, b)
        return (h.squeeze(-1) - REWARD_MEAN) / REWARD_STD
    return score


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(impl, folder, shape, batch, repeats, threads):
    """One side in this (fresh) process: load, warm up, then time `repeats` calls with the peak memory reset."""
    torch.set_num_threads(threads)
    score = blip.load_imagereward(folder).score if impl == "ours" else reference_fn(folder, shape)
    load_peak = rss_kib("VmHWM")
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of the cat {'!' * i}, trending on artstation" for i in range(batch)]
    with torch.inference_mode():
        first = score(pixels, prompts)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM back to the current RSS
        base, times = rss_kib("VmRSS"), []
        for _ in range(repeats):
            start = time.perf_counter()
            score(pixels, prompts)
            times.append(time.perf_counter() - start)
        peak = rss_kib("VmHWM")
    return dict(seconds=statistics.median(times), best=min(times), load_peak=load_peak / 2**20, peak=peak / 2**20,
                extra=(peak - base) / 2**20, scores=first.tolist())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.shape, args.batch, args.repeats, args.threads)))
        return
    with tempfile.TemporaryDirectory() as folder:
        write_weights(args.shape, folder)
        common = ["--shape", args.shape, "--batch", str(args.batch), "--repeats", str(args.repeats),
                  "--threads", str(args.threads)]
        rows = {impl: json.loads(subprocess.run(
            [sys.executable, "-m", "benchmarks.imagereward", "--child", impl, folder, *common], cwd=ROOT, check=True,
            capture_output=True, text=True).stdout.splitlines()[-1])
                for impl in ("ref", "ours")}
    vw, vd, tw, td, _ = SHAPES[args.shape]
    print(f"ImageReward-shaped BLIP ({args.shape}: ViT {vw} x {vd}, BERT {tw} x {td}), 224 px, batch {args.batch}, "
          f"fp32, {args.threads} threads\n")
    print("| scorer | s per call (median) | time ratio | fastest call, ratio | load peak GiB | forward peak GiB "
          "| forward +GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ref = rows["ref"]
    for impl, name in (("ref", "transformers BLIP"), ("ours", "ours (blip.ImageReward)")):
        r = rows[impl]
        print(f"| {name} | {r['seconds']:.3f} | {r['seconds'] / ref['seconds']:.2f}x | {r['best']:.3f}, "
              f"{r['best'] / ref['best']:.2f}x | {r['load_peak']:.3f} | "
              f"{r['peak']:.3f} | {r['extra']:.3f} | {r['peak'] / ref['peak']:.2f}x |")
    gap = max(abs(a - b) for a, b in zip(rows["ours"]["scores"], ref["scores"]))
    print(f"\nlargest score difference, ours vs transformers: {gap:.2e}")


if __name__ == "__main__":
    main()
