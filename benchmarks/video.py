"""The video UNet (video.py) against diffusers' UNet3DConditionModel on identical random weights (not a test), and
the VAE's peak memory when a video is decoded in chunks of frames.

    python -m benchmarks.video unet [--preset small|modelscope|tiny] [--frames 8] [--size 16] [--repeats 3]
    python -m benchmarks.video decode [--preset sd|tiny] [--frames 16] [--size 32] [--chunks 1,4,16]

Random weights in diffusers' layout are written once (save_pretrained: this needs the test extra); each row runs in a
fresh process, so its peak memory (harness.py: resident set on the CPU, allocated memory on a GPU) is its own.
Prints Markdown tables for BENCHMARKS.md.
"""
import math
import os

import torch
from safetensors import safe_open

from benchmarks import harness
from benchmarks.random_weights import WEIGHTS

MODULE = "benchmarks.video"

# ModelScope's text-to-video-ms UNet is diffusers' UNet3DConditionModel defaults (1.4B parameters, 5.7 GiB fp32);
# "small" keeps its layout (four levels, two layers each, heads of 64, 1024-wide text) at a quarter of the width.
PRESETS = {
    "modelscope": dict(sample_size=32),
    "small": dict(sample_size=32, block_out_channels=(64, 128, 256, 256), norm_num_groups=32),
    "tiny": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
}


def weights_folder(preset):
    """A unet/ folder of the preset's shapes with random weights (written once; a `done` file marks it)."""
    path = os.path.join(os.path.dirname(WEIGHTS), f"video-{preset}", "unet")
    if not os.path.exists(os.path.join(path, "done")):
        from diffusers import UNet3DConditionModel
        from benchmarks.random_weights import randomize
        torch.manual_seed(0)
        randomize(UNet3DConditionModel(**PRESETS[preset]), 0).save_pretrained(path)  # conv4 of each stack non-zero too
        open(os.path.join(path, "done"), "w").close()
    return path


def unet_one(impl, path, frames, size, repeats, device):
    """One forward of a CFG batch (2 videos of `frames` frames, latent size x size): median seconds and peak GiB."""
    device = torch.device(device)
    if impl == "ours":
        from npo import video
        model = video.load_unet3d(path, device=device)
    else:
        from diffusers import UNet3DConditionModel
        model = UNet3DConditionModel.from_pretrained(path).eval().to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, frames, size, size, generator=g).to(device)
    c = torch.randn(2, 77, model.config.cross_attention_dim, generator=g).to(device)
    fn = (lambda: model(x, 500, c)) if impl == "ours" else (lambda: model(x, 500, c).sample)
    with torch.inference_mode():
        timing = harness.measure(fn, repeats, device=device)
    return dict(seconds=timing.seconds, peak_gib=timing.peak_gib, extra_gib=timing.extra_gib)


def cmd_unet(args):
    path = weights_folder(args.preset)
    with safe_open(f"{path}/diffusion_pytorch_model.safetensors", "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"video UNet, {args.preset} shapes ({n / 1e6:.1f}M parameters), random weights, fp32, {args.device}, "
          f"{args.threads} threads; each row a fresh process (peak: whole process, weights included)\n")
    print("| input | ours s | diffusers s | time ratio | ours peak GiB | diffusers peak GiB | memory ratio | "
          "ours forward +GiB | diffusers forward +GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    ours, ref = (harness.run_child(MODULE, "_unet", impl, path, args.frames, args.size, args.repeats, args.device,
                                   threads=args.threads) for impl in ("ours", "ref"))
    print(f"| 2 x {args.frames} frames, latent {args.size}x{args.size} | {ours['seconds']:.3f} | {ref['seconds']:.3f} | "
          f"{ours['seconds'] / ref['seconds']:.2f}x | {ours['peak_gib']:.2f} | {ref['peak_gib']:.2f} | "
          f"{ours['peak_gib'] / ref['peak_gib']:.2f}x | {ours['extra_gib']:.2f} | {ref['extra_gib']:.2f} |", flush=True)


VAE_PRESETS = {  # SD's (and ModelScope's) VAE, and the layout at toy size
    "sd": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32),
    "tiny": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8),
}


def vae_folder(preset):
    """A vae/ folder of the preset's shapes with diffusers' random initialisation (written once)."""
    path = os.path.join(os.path.dirname(WEIGHTS), f"video-vae-{preset}")
    if not os.path.exists(os.path.join(path, "done")):
        from diffusers import AutoencoderKL
        torch.manual_seed(0)
        AutoencoderKL(layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, **VAE_PRESETS[preset]).save_pretrained(path)
        open(os.path.join(path, "done"), "w").close()
    return path


def decode_one(path, frames, size, chunk, repeats):
    """video.decode_frames of one video at `chunk` frames per VAE call: median seconds and peak GiB."""
    from npo import unet
    from npo import video
    vae = unet.load_vae(path)
    z = torch.randn(1, 4, frames, size, size, generator=torch.Generator().manual_seed(0))
    timing = harness.measure(lambda: video.decode_frames(vae, z, chunk), repeats)
    return dict(seconds=timing.seconds, peak_gib=timing.peak_gib, extra_gib=timing.extra_gib)


def cmd_decode(args):
    path = vae_folder(args.preset)
    print(f"decode_frames: one video of {args.frames} frames, latent {args.size}x{args.size} ({8 * args.size} px), "
          f"{args.preset} VAE shapes, fp32, {args.threads} threads; each row a fresh process\n")
    print("| frames per VAE call | s | peak GiB | decode +GiB |\n|---|---|---|---|")
    for chunk in args.chunks:
        r = harness.run_child(MODULE, "_decode", path, args.frames, args.size, chunk, args.repeats, threads=args.threads)
        print(f"| {chunk} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | {r['extra_gib']:.2f} |", flush=True)


def add_commands(sub):
    p = sub.add_parser("unet", help="one forward of the video UNet: ours vs diffusers' UNet3DConditionModel")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="small: ModelScope's layout at a quarter of its width (default); modelscope: its full shapes")
    p.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    p.add_argument("--size", type=int, default=16, help="latent side (default 16; ModelScope samples at 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per row (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_unet)
    p = sub.add_parser("decode", help="decode_frames' time and peak memory against the frames per VAE call")
    p.add_argument("--preset", choices=sorted(VAE_PRESETS), default="sd", help="sd: SD's VAE shapes (default)")
    p.add_argument("--frames", type=int, default=16, help="frames of the video (default 16)")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32: 256 px, ModelScope's)")
    p.add_argument("--chunks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16],
                   help="frames per VAE call to compare (default 1,4,16)")
    p.add_argument("--repeats", type=int, default=1, help="timed decodes per row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_decode)


# `python -m benchmarks.video KIND ARGS... THREADS`: one measurement in a fresh process (harness.run_child).
CHILDREN = {"_unet": unet_one, "_decode": decode_one}

if __name__ == "__main__":
    harness.main(__doc__, [add_commands], CHILDREN)
