"""SPO: one epoch (one micro-batch sampled with its candidates, then SPO's update over the pairs it kept) against its
sampling alone, at SD1.5 shapes on the CPU, and the peak memory of each (not a test). CPU seconds (process time) beside the wall clock, which a
loaded machine stretches.

    python -m benchmarks.spo                                    # SD1.5 shapes, 512 px, 20 steps, k = 4
    python -m benchmarks.spo --size 8 --sample-steps 6 --plain-steps 2 --threads 1     # what fits a loaded CPU

The model is built in memory from our own modules at SD1.5's configs (UNet 320/640/1280/1280, VAE 128/256/512/512,
CLIP-L-shaped text encoder) with PyTorch's default random init: nothing is read but weights/tokenizer and
weights/scheduler. The threshold is 0, so a pair forms at every candidate step (the update's worst case). Sampling
is `method_spo.rollout` (plain steps, then per step k candidates, each candidate's x̂_0 through the UNet and the VAE,
a reward); the epoch adds the loss over the kept pairs (a guided forward and backward of θ and a guided forward of
the reference per step with pairs) and the optimizer step. Peak memory is Linux's VmHWM, reset before each part.
"""
import argparse
import os
import tempfile
import time

import torch

from npo import clip
from npo import machinery
from npo import method_spo
from npo import pipeline
from npo import train
from npo import trainconfig
from npo import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sd15_pipeline():
    """SD1.5's shapes, random weights, our modules."""
    torch.manual_seed(0)
    text = clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    return pipeline.Pipeline(
        unet=unet.UNet2DCondition(unet.UNetConfig()).eval().requires_grad_(False),
        vae=unet.AutoencoderKL(unet.VAEConfig()).eval().requires_grad_(False),
        text_encoder=clip.CLIPTextModel(text).eval().requires_grad_(False),
        tokenizer=clip.load_tokenizer(os.path.join(ROOT, "weights", "tokenizer")),
        scheduler_config=pipeline.read_scheduler_config(os.path.join(ROOT, "weights", "scheduler")))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def peak_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def bench(args):
    torch.set_num_threads(args.threads)
    return spo_epoch(sd15_pipeline(), torch.device("cpu"), args.size, args.sample_steps, args.plain_steps,
                     args.candidates)


def spo_epoch(pipe, device, size, sample_steps, plain_steps, candidates):
    """One SPO epoch of `pipe` on `device` (one micro-batch of 1 prompt, threshold 0, then the optimizer step) and
    its sampling alone: seconds (wall and CPU), pairs kept, and peak resident GiB (sampling, update, load)."""
    out = tempfile.mkdtemp()
    with open(os.path.join(out, "prompts.txt"), "w") as f:
        f.write("a photo of a cat\n")
    config = trainconfig.TrainConfig(
        out=out, method="spo", reward="rewards:brightness", prompts_file=os.path.join(out, "prompts.txt"),
        sample_steps=sample_steps, spo_plain_steps=plain_steps, spo_candidates=candidates,
        spo_threshold=0.0, resolution=8 * size, device=str(device), steps=1)
    trainconfig.check(config)
    run = machinery.Run(config, pipe, out, 0, 1, device)
    machinery.setup(run, None, None)
    prompts = ["a photo of a cat"]
    load_peak = peak_gib()
    timings, rollout = {}, method_spo.rollout

    def timed_rollout(*a):
        reset_peak()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = rollout(*a)
        sync(device)
        timings.update(sampling=time.perf_counter() - t0, sampling_cpu=time.process_time() - c0,
                       sampling_peak=peak_gib(), pairs=int(result.kept.sum()))
        reset_peak()
        return result
    method_spo.rollout = timed_rollout
    try:
        step = method_spo.micro_step(run, prompts)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = step(0, 1.0)
        train.update(run, metrics)
        sync(device)
    finally:
        method_spo.rollout = rollout
    epoch, epoch_cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(timings, epoch=epoch, epoch_cpu=epoch_cpu, update_peak=peak_gib(), load_peak=load_peak)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.spo", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="latent size (64: 512 px, SD1.5's)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (SPO: 20)")
    p.add_argument("--plain-steps", type=int, default=4, help="steps before the candidates (SPO: 4)")
    p.add_argument("--candidates", type=int, default=4, help="k (SPO SD1.5: 4)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    r = bench(args)
    print(f"SD1.5 shapes, latent {args.size}x{args.size}, {args.sample_steps} steps ({args.plain_steps} plain), "
          f"k = {args.candidates}, batch 1, fp32, {args.threads} threads, {r['pairs']} pairs kept\n")
    print("| s / epoch | s sampling | epoch / sampling | CPU s / epoch | CPU s sampling | CPU epoch / sampling | "
          "peak GiB sampling | peak GiB update | peak GiB load |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['epoch']:.1f} | {r['sampling']:.1f} | {r['epoch'] / r['sampling']:.2f}x | {r['epoch_cpu']:.1f} | "
          f"{r['sampling_cpu']:.1f} | {r['epoch_cpu'] / r['sampling_cpu']:.2f}x | {r['sampling_peak']:.2f} | "
          f"{r['update_peak']:.2f} | {r['load_peak']:.2f} |")


if __name__ == "__main__":
    main()
