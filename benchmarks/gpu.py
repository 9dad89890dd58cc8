"""The GPU table (not a test): ours against diffusers in one process on a CUDA machine; `--cpu` runs every row on
the CPU, a check that the command works.

    python -m benchmarks.gpu [--out gpu.md] [--size 64] [--repeats 10] [--sdxl full|small|none] [--cpu] [--tiny]

Rows: one UNet forward in fp16 / bf16 / under torch.compile, a guided step of NPO against plain CFG, a Diffusion-DPO
step against diffusers' recipe, an SPO epoch against its sampling, and SDXL's UNet and NPO step. Times are the
median of --repeats after a warm-up, waiting for the device; memory is torch.cuda.max_memory_allocated above what was
allocated before (harness.py).
"""
import argparse
import os

import torch

from benchmarks import harness, sampling, training
from benchmarks.random_weights import WEIGHTS, make_sdxl_weights, make_weights


def timed(device, fns, repeats):
    """{name: (median seconds, peak GiB above what was allocated before)} of each fn()."""
    out = {}
    for name, fn in fns.items():
        timing = harness.measure(fn, repeats, device=device)
        out[name] = (timing.seconds, timing.extra_gib)
    return out


def gpu_unet_rows(device, weights, size, repeats):
    """One UNet forward (batch 2) in fp16 and bf16, ours vs diffusers; and ours under torch.compile (fp16)."""
    from npo import unet as ours_unet
    from diffusers import UNet2DConditionModel
    rows = []
    for dtype in (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.bfloat16,):
        ours = ours_unet.load_unet(f"{weights}/unet", dtype=dtype, device=device)
        ref = UNet2DConditionModel.from_pretrained(f"{weights}/unet", torch_dtype=dtype).to(device).eval()
        x = torch.randn(2, 4, size, size, device=device, dtype=dtype)
        c = torch.randn(2, 77, ours.config.cross_attention_dim, device=device, dtype=dtype)
        with torch.inference_mode():
            fns = {"ours": lambda: ours(x, 500, c), "diffusers": lambda: ref(x, 500, c).sample}
            if dtype == torch.float16:  # CUDA only: inductor's CPU compile takes minutes, for no GPU figure
                compiled = torch.compile(ours)
                fns["ours, torch.compile"] = lambda: compiled(x, 500, c)
            rows_here = timed(device, fns, repeats)
        name = str(dtype).removeprefix("torch.")
        rows += [(f"UNet forward, {name}, {k}", t, m, rows_here["diffusers"]) for k, (t, m) in rows_here.items()]
        del ours, ref
    return rows


def guided_step_rows(device, model, neg, pos, x, guidance, label, repeats):
    """A guided step of plain CFG, then of NPO with η and δ added as unmerged rank-8 offsets (eq. 10, α = β = 1)."""
    from npo import guided
    from npo import lora
    from npo import pipeline
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        plain = guided.npo_denoiser(model, neg, pos, guidance)
        rows = timed(device, {"plain CFG": lambda: plain(x, t)}, repeats)
        for name in ("eta", "delta"):
            lora.add_offset(model, name, rank=8)
        npo = guided.npo_denoiser(model, neg, pos, guidance, 1.0, 1.0)
        rows.update(timed(device, {"NPO (η, δ unmerged)": lambda: npo(x, t)}, repeats))
    return [(f"{label}, {k}", tm, m, rows["plain CFG"]) for k, (tm, m) in rows.items()]


def gpu_sampling_rows(device, weights, size, repeats):
    """One guided step: plain CFG vs NPO (one batched forward), fp16 (bf16 on the CPU)."""
    from npo import unet as ours_unet
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = ours_unet.load_unet(f"{weights}/unet", dtype=dtype, device=device)
    x = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    neg, pos = (torch.randn(1, 77, model.config.cross_attention_dim, device=device, dtype=dtype) for _ in range(2))
    return guided_step_rows(device, model, neg, pos, x, 7.5, f"guided step, {str(dtype).removeprefix('torch.')}",
                            repeats)


def gpu_train_rows(device, weights, size):
    """One Diffusion-DPO step (1 pair, rank 8): ours (`npo.py train`, --mixed-precision fp16 on CUDA, bf16 on the CPU)
    vs the diffusers recipe in fp32 (what its script runs without accelerate's mixed precision)."""
    mode = "fp16" if device.type == "cuda" else "bf16"
    ours = training.train_ours("ours", size, 4, str(device), {"mixed_precision": mode}, weights)
    ours_fp32 = training.train_ours("ours", size, 4, str(device), weights=weights)
    recipe = training.train_recipe("recipe", size, 4, str(device), weights)
    return [(f"DPO step, ours, --mixed-precision {mode}", ours["seconds"], float("nan"), (recipe["seconds"], 0)),
            ("DPO step, ours, fp32", ours_fp32["seconds"], float("nan"), (recipe["seconds"], 0)),
            ("DPO step, diffusers recipe, fp32", recipe["seconds"], float("nan"), (recipe["seconds"], 0))]


def gpu_spo_rows(device, weights, size):
    """One SPO epoch (`--method spo`: 1 prompt, 20 DDIM steps of which 4 plain, k = 4, threshold 0 so every candidate
    step keeps a pair; fp32) against its sampling alone (`method_spo.rollout`)."""
    from benchmarks import spo
    from npo import pipeline
    r = spo.spo_epoch(pipeline.load_pipeline(weights, device=device), device, size, 20, 4, 4)
    return [("SPO epoch (sampling + update), fp32", r["epoch"], float("nan"), (r["sampling"], 0)),
            ("SPO sampling alone, fp32", r["sampling"], float("nan"), (r["sampling"], 0))]


def gpu_sdxl_rows(device, weights, preset, size, repeats):
    """SDXL (latent 128: 1024 px): one UNet forward (batch 2), ours vs diffusers, and a guided step, NPO (η and δ
    unmerged, rank 8) vs plain CFG; fp16 (bf16 on the CPU). `preset` "small" is SDXL's layout at toy size."""
    from npo import unet as ours_unet
    from diffusers import UNet2DConditionModel
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), f"sdxl-{preset}")  # beside the SD1.5 weights
    make_sdxl_weights(path, preset)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    ours = ours_unet.load_unet(f"{path}/unet", dtype=dtype, device=device)
    ref = UNet2DConditionModel.from_pretrained(f"{path}/unet", torch_dtype=dtype).to(device).eval()
    x, c, pooled, ids = (v.to(device, dtype) for v in sampling.sdxl_unet_inputs(ours.config, 2, size))
    name = str(dtype).removeprefix("torch.")
    with torch.inference_mode():
        unet_rows = timed(device, {
            "ours": lambda: ours(x, 500, c, text_embeds=pooled, time_ids=ids),
            "diffusers": lambda: ref(x, 500, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample},
            repeats)
    del ref
    neg, pos = ({"encoder_hidden_states": c[i:i + 1], "text_embeds": pooled[i:i + 1], "time_ids": ids[i:i + 1]}
                for i in (0, 1))
    return ([(f"SDXL UNet forward, {name}, {k}", tm, m, unet_rows["diffusers"]) for k, (tm, m) in unet_rows.items()]
            + guided_step_rows(device, ours, neg, pos, x[:1], 5.0, f"SDXL guided step, {name}", repeats))


def cmd_gpu(args):
    """The GPU table: UNet fp16 / bf16 / compile, NPO against plain CFG, the DPO step against the recipe."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    weights = args.weights or WEIGHTS
    make_weights(weights, tiny=args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (fallback: checks the command runs)"
    lines = [f"{name}; SD1.5-shaped random weights{' (tiny)' if args.tiny else ''}, latent {args.size}x{args.size} "
             f"({8 * args.size} px); median of {args.repeats} after a warm-up", "",
             "| what | s | vs reference | peak GiB above weights |", "|---|---|---|---|"]
    rows = gpu_unet_rows(device, weights, args.size, args.repeats) + gpu_sampling_rows(device, weights, args.size, args.repeats)
    if not args.skip_train:
        rows += gpu_train_rows(device, weights, args.size) + gpu_spo_rows(device, weights, args.size)
    if args.sdxl != "none":
        lines[0] += f"; SDXL-shaped ({args.sdxl}) at latent {args.sdxl_size}x{args.sdxl_size} ({8 * args.sdxl_size} px)"
        rows += gpu_sdxl_rows(device, weights, args.sdxl, args.sdxl_size, args.repeats)
    for what, seconds, memory, (ref_seconds, _) in rows:
        lines.append(f"| {what} | {seconds:.4f} | {seconds / ref_seconds:.2f}x | {memory:.2f} |")
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="latent side (default 64: 512 px)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there (a check that it runs)")
    p.add_argument("--tiny", action="store_true", help="tiny random weights instead of SD1.5-shaped ones (a quick check)")
    p.add_argument("--weights", default=None, help="folder for the random weights (default: NPO_BENCH_DIR)")
    p.add_argument("--skip-train", action="store_true", help="leave out the DPO step and SPO epoch rows")
    p.add_argument("--sdxl", choices=["full", "small", "none"], default="full",
                   help="SDXL rows: SDXL base's shapes (full, default), its layout at toy size (small), or none")
    p.add_argument("--sdxl-size", type=int, default=128, help="SDXL latent side (default 128: 1024 px)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    cmd_gpu(p.parse_args())


if __name__ == "__main__":
    main()
