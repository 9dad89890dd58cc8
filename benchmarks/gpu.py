"""The GPU table (not a test): ours against diffusers in one process on a CUDA machine; `--cpu` runs every row on
the CPU, a check that the command works.

    python -m benchmarks.gpu [--out gpu.md] [--size 64] [--repeats 10] [--sdxl full|small|none] [--vc2 full|small|none]
                             [--cpu] [--tiny]

Rows: one UNet forward in fp16 / bf16 / under torch.compile, a guided step of NPO against plain CFG, a Diffusion-DPO
step against diffusers' recipe, an SPO epoch against its sampling, SDXL's UNet and NPO step, and VideoCrafter2's
UNet and a few DDIM steps of a 16-frame 320x512 video (plain CFG and NPO). Times are the
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


# VideoCrafter2's UNet (configs/inference_t2v_512_v2.0.yaml in diffusers' fields), and its layout at toy size
VC2_PRESETS = {
    "full": dict(config=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=64,
                             cross_attention_dim=1024), frames=16, height=320, width=512),
    "small": dict(config=dict(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=16,
                              cross_attention_dim=64, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
                              up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"]), frames=2, height=64, width=64),
}


def vc2_sampling(device, model, vae, preset, steps, dtype):
    """sample(): `steps` DDIM steps of VideoCrafter2's sampler (x̂0 rescale, η = 1, CFG 12, fps 28) on one video of
    the preset's frames and size, then its frames decoded (8 per VAE call); random prompt embeddings."""
    from npo import guided, sampler, video, videocrafter
    p, d = VC2_PRESETS[preset], videocrafter.DEFAULTS
    c = model.config.cross_attention_dim
    fps = torch.tensor([d["fps"]], device=device)
    neg, pos = ({"encoder_hidden_states": torch.randn(1, 77, c, device=device, dtype=dtype), "fps": fps}
                for _ in range(2))
    x_T = torch.randn(1, 4, p["frames"], p["height"] // 8, p["width"] // 8, device=device, dtype=dtype)

    def sample():
        denoise = guided.npo_denoiser(model, neg, pos, d["guidance"])
        latents = sampler.sample("ddim", denoise, x_T, videocrafter.SCHEDULER, steps, d["ddim_eta"],
                                 torch.Generator(device).manual_seed(0))
        return video.decode_frames(vae, latents)
    return sample, x_T, neg


def gpu_vc2_rows(device, weights, preset, steps, repeats):
    """VideoCrafter2 (random weights of its config; `preset` "small" is its layout at toy size), fp16 (bf16 on the
    CPU): one UNet forward of a CFG batch (2 videos of 16 frames at 320x512) against diffusers' UNet3DConditionModel
    of the same shapes (ModelScope's: no fps embedding), and `steps` DDIM steps plus the frames' decoding, plain CFG
    against NPO (η, δ unmerged, rank 8)."""
    from diffusers import UNet3DConditionModel
    from npo import lora, unet, video, videocrafter
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    cfg = video.UNet3DConfig(**VC2_PRESETS[preset]["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = videocrafter.VideoCrafterUNet(cfg).to(dtype).eval().requires_grad_(False)
        ref = UNet3DConditionModel(**VC2_PRESETS[preset]["config"]).to(dtype).eval()
    vae = unet.load_vae(f"{weights}/vae", dtype=dtype, device=device)
    sample, x_T, neg = vc2_sampling(device, model, vae, preset, steps, dtype)
    x, c, t = torch.cat([x_T, x_T]), neg["encoder_hidden_states"].expand(2, -1, -1), torch.tensor(500, device=device)
    name, size = str(dtype).removeprefix("torch."), f"{x_T.shape[2]}x{8 * x_T.shape[3]}x{8 * x_T.shape[4]}"
    with torch.inference_mode():
        forward = timed(device, {"ours": lambda: model(x, t, c, fps=neg["fps"].expand(2)),
                                 "diffusers UNet3DConditionModel": lambda: ref(x, t, c).sample}, repeats)
        del ref
        rows = timed(device, {"plain CFG": sample}, repeats)
        for offset in ("eta", "delta"):
            lora.add_offset(model, offset, rank=8)
        rows.update(timed(device, {"NPO (η, δ unmerged)": sample}, repeats))
    return ([(f"VideoCrafter2 UNet forward {size}, {name}, {k}", tm, m, forward["diffusers UNet3DConditionModel"])
             for k, (tm, m) in forward.items()]
            + [(f"VideoCrafter2 {steps} DDIM steps + decode {size}, {name}, {k}", tm, m, rows["plain CFG"])
               for k, (tm, m) in rows.items()])


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
    if args.vc2 != "none":
        lines[0] += f"; VideoCrafter2-shaped ({args.vc2}), {args.vc2_steps} DDIM steps"
        rows += gpu_vc2_rows(device, weights, args.vc2, args.vc2_steps, args.repeats)
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
    p.add_argument("--vc2", choices=["full", "small", "none"], default="full",
                   help="VideoCrafter2 rows: its UNet's shapes at 16 frames of 320x512 (full, default), its layout at "
                        "toy size (small), or none")
    p.add_argument("--vc2-steps", type=int, default=4, help="DDIM steps of the VideoCrafter2 sampling rows (default 4)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    cmd_gpu(p.parse_args())


if __name__ == "__main__":
    main()
