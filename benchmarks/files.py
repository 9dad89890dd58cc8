"""The files users hold (not a test): single-file checkpoints against the same model as a folder, extract-lora's
truncated SVD, and PickScore scoring against transformers' CLIPModel, on random weights of the real shapes.

    python -m benchmarks.files singlefile [--variants folder,safetensors,ckpt] [--small]
    python -m benchmarks.files extract [--rank 64] [--conv-rank 32] [--targets ...] [--small]
    python -m benchmarks.files scorers [--shape clip-h|tiny] [--batch 4]

Each measured row runs in a fresh process (harness.run_child), so that its peak memory is its own.
"""
import json
import os
import statistics
from types import SimpleNamespace

import torch

from benchmarks import harness, ldm
from benchmarks.random_weights import CLIP_SHAPES, WEIGHTS, make_clip_weights, make_weights

MODULE = "benchmarks.files"


# ----------------------------------------------------------------------------------------------------------
# Single-file checkpoints: load time and peak memory against the same model as a folder; extract-lora's time.

def single_file_of(folder, suffix):
    """The model folder written once as an LDM single file (ldm.py's converter, checked against diffusers'
    from_single_file in the tests), straight from the folder's tensors: no modules built, nothing copied but the file."""
    path = f"{folder}{suffix}"
    if os.path.exists(path):
        return path
    from safetensors.torch import load_file, save_file

    def part(name, weights):
        with open(f"{folder}/{name}/config.json") as f:
            config = SimpleNamespace(**json.load(f))
        tensors = load_file(f"{folder}/{name}/{weights}")
        return SimpleNamespace(config=config, state_dict=lambda: tensors)
    pipe = SimpleNamespace(unet=part("unet", "diffusion_pytorch_model.safetensors"),
                           vae=part("vae", "diffusion_pytorch_model.safetensors"),
                           text_encoder=part("text_encoder", "model.safetensors"))
    sd = {k: v.contiguous() for k, v in ldm.to_ldm(pipe, "sd1").items()}
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def load_one(path):
    """Seconds to load `path` (a folder or a single file) with pipeline.load_pipeline, and the peak resident memory
    (VmHWM above the RSS just before) of the load and a first read of every weight, against the weights' bytes.
    The read counts: a memory-mapped file's pages become resident only when touched, so the load alone shows none."""
    from npo import pipeline
    harness.reset_peak_rss()
    base = harness.rss_gib("VmRSS")
    pipe, seconds = harness.once(lambda: pipeline.load_pipeline(path))
    params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
    with torch.no_grad():
        for p in params:
            p.sum()
    weights = sum(p.numel() * p.element_size() for p in params)
    return dict(seconds=seconds, extra_gib=harness.rss_gib("VmHWM") - base, weights_gib=weights / 2**30)


def bench_folder(small):
    """SD1.5-shaped random weights, or with --small a tiny SD1 model (to check the command quickly)."""
    if not small:
        make_weights(WEIGHTS)
        return WEIGHTS
    folder = os.path.join(os.path.dirname(WEIGHTS), "small-sd1")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        ldm.make_family_dir(folder, "sd1")
    return folder


def cmd_singlefile(args):
    folder = bench_folder(args.small)
    paths = {"folder": folder, **{v: single_file_of(folder, f".{v}") for v in args.variants if v != "folder"}}
    print(f"pipeline.load_pipeline, fp32, {args.threads} threads, median of {args.repeats} fresh processes "
          "(files in the page cache)\n")
    print("| model | load s | vs folder | peak RSS above start (load + first read) GiB | weights GiB | RSS / weights |\n"
          "|---|---|---|---|---|---|")
    rows = {v: [harness.run_child(MODULE, "_load", p, threads=args.threads) for _ in range(args.repeats)]
            for v, p in paths.items()}
    folder_s = statistics.median(r["seconds"] for r in rows["folder"])
    for variant, runs in rows.items():
        s, extra = statistics.median(r["seconds"] for r in runs), max(r["extra_gib"] for r in runs)
        w = runs[0]["weights_gib"]
        print(f"| {variant} | {s:.2f} | {s / folder_s:.2f}x | {extra:.2f} | {w:.2f} | {extra / w:.2f} |", flush=True)


def cmd_extract(args):
    """extract.extract_offset at SD1.5 shapes: the base UNet against a copy with every weight moved."""
    from npo import extract
    from npo import lora
    from npo import pipeline
    folder = bench_folder(args.small)
    base, tuned = pipeline.load_unet(folder), pipeline.load_unet(folder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    stats, seconds = harness.once(lambda: extract.extract_offset(base, tuned, "eta", args.rank, args.conv_rank,
                                                              args.targets))
    print(f"| targets | rank | conv rank | layers | s | overall relative error (random ΔW) |\n|---|---|---|---|---|---|")
    print(f"| {args.targets} | {args.rank} | {args.conv_rank or args.rank} | {len(stats)} | {seconds:.1f} "
          f"| {extract.relative_errors(stats)['overall']:.3f} |")


# ----------------------------------------------------------------------------------------------------------
# Scorers: PickScore-shaped CLIP-H/14 (224 px), ours vs transformers' CLIPModel.

def pickscore_fn(impl, path):
    """score(pixels, prompts) = exp(logit_scale) · cos, loaded the way each side loads it."""
    if impl == "ours":
        from npo import scorers
        return scorers.load("pickscore", path).score
    from transformers import CLIPModel, CLIPTokenizer
    model, tokenizer = CLIPModel.from_pretrained(path).eval(), CLIPTokenizer.from_pretrained(path)

    def score(pixels, prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        image, text = (getattr(f, "pooler_output", f) for f in (model.get_image_features(pixel_values=pixels),
                                                              model.get_text_features(input_ids=ids)))
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (image * text).sum(-1)
    return score


def scorer_one(impl, shape, batch, repeats):
    score = pickscore_fn(impl, make_clip_weights(shape))
    load_peak = harness.rss_gib("VmHWM")
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of a cat number {i}, trending on artstation" for i in range(batch)]
    with torch.inference_mode():
        scores = score(pixels, prompts)
        timing = harness.measure(lambda: score(pixels, prompts), repeats, warmup=0)  # the call above warmed up
    return dict(seconds=timing.seconds, load_peak_gib=load_peak, peak_gib=timing.peak_gib,
                forward_extra_gib=timing.extra_gib, scores=scores.tolist())


def cmd_scorers(args):
    make_clip_weights(args.shape)
    print(f"PickScore-shaped CLIP ({args.shape}), 224 px, batch {args.batch}, fp32, {args.threads} threads\n")
    print("| scorer | images/s | time ratio | load peak GiB | forward peak GiB | forward +GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = {impl: harness.run_child(MODULE, "_scorer", impl, args.shape, args.batch, args.repeats, threads=args.threads)
            for impl in ("ref", "ours")}
    ref = rows["ref"]
    for impl, name in (("ref", "transformers CLIPModel"), ("ours", "ours (scorers.PickScore)")):
        r = rows[impl]
        print(f"| {name} | {args.batch / r['seconds']:.2f} | {r['seconds'] / ref['seconds']:.2f}x | {r['load_peak_gib']:.2f} "
              f"| {r['peak_gib']:.2f} | {r['forward_extra_gib']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f}x |", flush=True)
    gap = max(abs(a - b) for a, b in zip(rows["ours"]["scores"], ref["scores"]))
    print(f"\nlargest score difference, ours vs transformers: {gap:.2e}")


def add_commands(sub):
    p = sub.add_parser("singlefile", help="load time and peak memory: a single-file checkpoint against its folder")
    p.add_argument("--variants", type=lambda s: s.split(","), default=["folder", "safetensors"],
                   help="comma-separated subset of folder,safetensors,ckpt")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (median time, largest memory)")
    p.add_argument("--small", action="store_true", help="a tiny SD1 model instead of SD1.5 shapes (a quick check)")
    p.set_defaults(func=cmd_singlefile)
    p = sub.add_parser("extract", help="extract-lora's truncated SVD at SD1.5 shapes")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--conv-rank", type=int, default=None)
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0")
    p.add_argument("--small", action="store_true", help="a tiny SD1 model instead of SD1.5 shapes (a quick check)")
    p.set_defaults(func=cmd_extract)
    p = sub.add_parser("scorers", help="PickScore scoring throughput and memory: ours vs transformers' CLIPModel")
    p.add_argument("--shape", choices=list(CLIP_SHAPES), default="clip-h", help="clip-h (PickScore's) or tiny (a check)")
    p.add_argument("--batch", type=int, default=4, help="images (and prompts) per scoring call (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    p.set_defaults(func=cmd_scorers)
    for name in ("singlefile", "extract", "scorers"):
        sub.choices[name].add_argument("--threads", type=int, default=2, help="torch threads")


# `python -m benchmarks.files KIND ARGS... THREADS`: one measurement in a fresh process (harness.run_child).
CHILDREN = {"_load": load_one, "_scorer": scorer_one}

if __name__ == "__main__":
    harness.main(__doc__, [add_commands], CHILDREN)
