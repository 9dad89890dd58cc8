"""Training and data against diffusers' recipe on SD1.5-shaped random weights (not a test).

    python -m benchmarks.training train [--size 32] [--steps 6]
    python -m benchmarks.training reward [--size 32]
    python -m benchmarks.training ddpo [--size 32] [--sample-steps 10,20,50]
    python -m benchmarks.training data [--shards 4] [--workers 0,2]

Each row runs in a fresh process (harness.run_child), so that its peak memory is its own. Prints Markdown tables for
BENCHMARKS.md.
"""
import json
import os
import statistics
import tempfile

import torch

from benchmarks import harness
from benchmarks.random_weights import WEIGHTS, make_weights

MODULE = "benchmarks.training"


# ----------------------------------------------------------------------------------------------------------
# Training: one Diffusion-DPO step (1 pair, rank 8) on the SD1.5-shaped weights, ours vs the diffusers recipe.

def random_pair_dataset(folder, pixels):
    """One preference pair of random images; `npo.py train` reads it like any JSONL dataset."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("w", "l"):
        Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(f"{folder}/{name}.png")
    with open(f"{folder}/pairs.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "a photo of a cat", "chosen": "w.png", "rejected": "l.png"}) + "\n")
    return f"{folder}/pairs.jsonl"


def logged_step_seconds(run):
    """Seconds of each logged step of a training run, from its log.jsonl."""
    with open(f"{run}/log.jsonl") as f:
        return [1 / line["it_per_s"] for line in map(json.loads, f) if "it_per_s" in line]


def train_ours(variant, size, steps, device="cpu", extra=None, weights=None):
    """Our whole training loop (`npo.py train`, in this process): seconds per step from its own log, which times
    everything a step does (data, text encoder, VAE encode unless cached, both UNet passes, backward, AdamW)."""
    from npo import train
    from npo.trainconfig import TrainConfig
    tmp = tempfile.mkdtemp()
    data = random_pair_dataset(f"{tmp}/data", 8 * size)
    options = {"ours": {}, "ours-gc": {"gradient_checkpointing": True}, "ours-cache": {"cache_latents": True},
               "ours-cache-gc": {"cache_latents": True, "gradient_checkpointing": True}}[variant]
    train.train(TrainConfig(model=weights or WEIGHTS, data=data, out=f"{tmp}/run", steps=steps, resolution=8 * size,
                            rank=8, log_every=1, checkpoint_every=0, device=device, **(extra or {}), **options))
    seconds = logged_step_seconds(f"{tmp}/run")
    # step 1 fills the cache; the one pair comes flipped or not, so a later step may encode once more: the median
    # of steps 3.. is a step that reads the cache
    return dict(variant=variant, seconds=statistics.median(seconds[2:]), encode_seconds=0.0,
                peak_gib=harness.rss_gib("VmHWM"))


def train_recipe(variant, size, steps, device="cpu", weights=None):
    """diffusers' Diffusion-DPO recipe (train_diffusion_dpo.py) reduced to its step: peft LoRA r=8 on
    to_q/k/v/out.0, the reference by disabling the adapters, loss −log σ(−β/2 · (Δθ − Δref)), AdamW, grad clip.
    Reports the step (text encoder, both UNet passes, backward, update) and its VAE encode of the pair separately,
    each the median of steps 2.. (the first is the harness's warm-up)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel
    weights = weights or WEIGHTS
    unet = UNet2DConditionModel.from_pretrained(f"{weights}/unet").requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(f"{weights}/vae").requires_grad_(False).to(device)
    text = CLIPTextModel.from_pretrained(f"{weights}/text_encoder").requires_grad_(False).to(device)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if variant == "recipe-gc":
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, 8 * size, 8 * size, generator=g) * 2 - 1).to(device)  # [x_w; x_l]
    ids = torch.randint(0, 49408, (1, 77), generator=g).to(device)

    def encode():
        with torch.no_grad():
            return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    latents = encode()

    def step():
        with torch.no_grad():
            context = text(ids)[0].repeat(2, 1, 1)
        noise = torch.randn_like(latents[:1]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (1,)).repeat(2).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        model_pred = unet(noisy, t, context).sample
        with torch.no_grad():
            unet.disable_adapters()
            ref_pred = unet(noisy, t, context).sample
            unet.enable_adapters()
        mse = ((model_pred - noise) ** 2).mean(dim=(1, 2, 3))
        ref_mse = ((ref_pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = -F.logsigmoid(-0.5 * 5000 * ((mse[0] - mse[1]) - (ref_mse[0] - ref_mse[1])))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    encoding = harness.measure(encode, steps - 1, device=device)
    stepping = harness.measure(step, steps - 1, device=device)
    return dict(variant=variant, seconds=stepping.seconds, encode_seconds=encoding.seconds,
                peak_gib=max(encoding.process_peak_gib, stepping.process_peak_gib))


TRAIN_VARIANTS = {
    "recipe": "diffusers recipe (peft, adapters disabled for the reference)",
    "ours": "ours, VAE encode every step",
    "ours-cache": "ours, --cache-latents",
    "recipe-gc": "diffusers recipe, gradient checkpointing",
    "ours-gc": "ours, --gradient-checkpointing",
    "ours-cache-gc": "ours, --cache-latents --gradient-checkpointing",
}


def train_one(variant, size, steps):
    return (train_recipe if variant.startswith("recipe") else train_ours)(variant, size, steps)


def cmd_train(args):
    make_weights(WEIGHTS)
    rows = {v: harness.run_child(MODULE, "_train", v, args.size, args.steps, threads=args.threads)
            for v in args.variants}
    print(f"latent {args.size}x{args.size} ({8 * args.size} px), 1 pair, rank 8, fp32, {args.threads} threads; "
          "median of steps 2.. of one process each\n")
    print("| run | step s | + VAE encode s | = s per step with data | peak GiB | time vs recipe (same checkpointing) "
          "| with data vs recipe + encode | memory vs recipe |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in rows.items():
        ref = rows.get("recipe-gc" if variant.endswith("gc") else "recipe")
        total = r["seconds"] + r["encode_seconds"]
        cells = ["-", "-", "-"]
        if ref and variant.startswith("ours"):
            ref_total = ref["seconds"] + ref["encode_seconds"]
            cells = [f"{r['seconds'] / ref['seconds']:.2f}x", f"{total / ref_total:.2f}x",
                     f"{r['peak_gib'] / ref['peak_gib']:.2f}x"]
        encode = f"{r['encode_seconds']:.2f}" if variant.startswith("recipe") else "(in step)"
        print(f"| {TRAIN_VARIANTS[variant]} | {r['seconds']:.2f} | {encode} | {total:.2f} | {r['peak_gib']:.2f} | "
              + " | ".join(cells) + " |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Reward training (DRaFT-K): time and memory of one step against K and the number of sampling steps.

def prompts_file(tmp):
    with open(f"{tmp}/prompts.txt", "w") as f:
        f.write("a photo of a cat\n")
    return f"{tmp}/prompts.txt"


def reward_one(sample_steps, grad_steps, size):
    """`npo.py train --method reward` for one step in this process (its many UNet calls amortize any warm-up): the
    step's time from its log, and the process's peak memory (the model load included, the same for every row)."""
    from npo import train
    from npo.trainconfig import TrainConfig
    tmp = tempfile.mkdtemp()
    train.train(TrainConfig(method="reward", reward="rewards:brightness", model=WEIGHTS, prompts_file=prompts_file(tmp),
                            out=f"{tmp}/run", steps=1, resolution=8 * size, sample_steps=sample_steps,
                            grad_steps=grad_steps, log_every=1, checkpoint_every=0, device="cpu"))
    return dict(sample_steps=sample_steps, grad_steps=grad_steps, seconds=logged_step_seconds(f"{tmp}/run")[-1],
                peak_gib=harness.rss_gib("VmHWM"))


def cmd_reward(args):
    make_weights(WEIGHTS)
    print(f"latent {args.size}x{args.size}, batch 1 (CFG: 2 rows per UNet call), rank 8, fp32, {args.threads} threads\n")
    print("| sampling steps | K (grad steps) | s / training step | peak GiB |\n|---|---|---|---|")
    for sample_steps, grad_steps in ((20, 1), (20, 2), (20, 4), (10, 1), (50, 1)):
        r = harness.run_child(MODULE, "_reward", sample_steps, grad_steps, args.size, threads=args.threads)
        print(f"| {sample_steps} | {grad_steps} | {r['seconds']:.1f} | {r['peak_gib']:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# DDPO: one epoch (sampling + PPO update) against its sampling alone, and peak memory against the sampling steps.

def ddpo_one(sample_steps, size):
    """One DDPO epoch of `npo.py train --method ddpo` in this process (2 sampled batches of 1 prompt, 1 pass: 2
    optimizer steps over every stored step). The epoch's time from its log; the sampling's (DDIM with log-probs,
    decode, reward) by timing `method_ddpo.sample_epoch`; the peak memory of the whole process and of the loop alone
    (VmHWM reset when the loop starts, after the model has loaded)."""
    from npo import method_ddpo
    from npo import train
    from npo.trainconfig import TrainConfig
    tmp = tempfile.mkdtemp()
    sampling, rollout, loop = [], method_ddpo.sample_epoch, train.loop

    def timed_rollout(*args):
        result, seconds = harness.once(lambda: rollout(*args))
        sampling.append(seconds)
        return result

    def loop_with_fresh_peak(*args):
        harness.reset_peak_rss()
        return loop(*args)
    method_ddpo.sample_epoch, train.loop = timed_rollout, loop_with_fresh_peak
    start_peak = harness.rss_gib("VmHWM")
    train.train(TrainConfig(method="ddpo", reward="rewards:jpeg_compressibility", model=WEIGHTS,
                            prompts_file=prompts_file(tmp), out=f"{tmp}/run", steps=2, resolution=8 * size,
                            sample_steps=sample_steps, log_every=1, checkpoint_every=0, device="cpu"))
    return dict(sample_steps=sample_steps, epoch_seconds=sum(logged_step_seconds(f"{tmp}/run")),
                sampling_seconds=sum(sampling), loop_peak_gib=harness.rss_gib("VmHWM"), load_peak_gib=start_peak)


def cmd_ddpo(args):
    make_weights(WEIGHTS)
    print(f"latent {args.size}x{args.size}, one epoch: 2 batches of 1 prompt (CFG: 2 rows per UNet call), 1 pass, "
          f"every step trained, rank 8, fp32, {args.threads} threads\n")
    print("| sampling steps | s / epoch | s sampling (DDIM + log p, decode, reward) | epoch / sampling | "
          "peak GiB in the loop | peak GiB before it (load) |\n|---|---|---|---|---|---|")
    for steps in args.sample_steps:
        r = harness.run_child(MODULE, "_ddpo", steps, args.size, threads=args.threads)
        print(f"| {steps} | {r['epoch_seconds']:.1f} | {r['sampling_seconds']:.1f} | "
              f"{r['epoch_seconds'] / r['sampling_seconds']:.2f}x | {r['loop_peak_gib']:.2f} | "
              f"{r['load_peak_gib']:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Data: Pick-a-Pic-shaped parquet shards streamed by data.batches (decode, resize, crop, flip) against the step's
# demand, and the peak memory of one epoch at 1x and 10x the shards.

def write_fake_shards(folder, shards, rows, size, group_rows=8):
    """`shards` parquet files of `rows` pairs of random `size`-px JPEGs each (Pick-a-Pic's columns; ~500 px photos
    as the dataset holds), written once."""
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        jpgs = []
        for _ in range(2 * rows):
            buffer = io.BytesIO()
            noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth-ish content: JPEG-sized
            Image.fromarray(noise).resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
            jpgs.append(buffer.getvalue())
        table = pa.table({"caption": [f"a photo {s}-{i}" for i in range(rows)], "jpg_0": jpgs[::2], "jpg_1": jpgs[1::2],
                          "label_0": [float(i % 2) for i in range(rows)], "label_1": [float(1 - i % 2) for i in range(rows)]})
        pq.write_table(table, os.path.join(folder, f"train-{s:05d}.parquet"), row_group_size=group_rows)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def data_one(folder, resolution, batches, workers):
    """Pairs per second out of data.batches over `folder` (after one warm-up batch), and the process's peak RSS."""
    from npo import data
    stream = data.batches(data.open_pairs(folder), 8, 0, resolution, random_crop=True, num_workers=workers)
    timing = harness.measure(lambda: next(stream), batches)
    stream.close()
    return dict(pairs_per_s=8 / timing.mean, peak_gib=timing.process_peak_gib)


def epoch_peak(folder):
    """One whole epoch of rows (no decoding) over `folder`: the peak RSS, whatever the number of shards."""
    from npo import data
    dataset = data.open_pairs(folder)
    for (epoch, _), _ in dataset.rows(0):
        if epoch:
            break
    return dict(peak_gib=harness.rss_gib("VmHWM"), rows=len(dataset))


def cmd_data(args):
    base = os.path.join(os.path.dirname(WEIGHTS), "shards")
    one = write_fake_shards(f"{base}-x1", args.shards, 64, args.image_size)
    ten = write_fake_shards(f"{base}-x10", 10 * args.shards, 64, args.image_size)
    print(f"{args.image_size} px JPEG pairs, batches of 8 at --resolution {args.resolution}, random crop and flip, "
          f"{args.threads} threads\n\n| workers | pairs / s | peak GiB |\n|---|---|---|")
    for workers in args.workers:
        r = harness.run_child(MODULE, "_data", one, args.resolution, args.batches, workers, threads=args.threads)
        print(f"| {workers} | {r['pairs_per_s']:.1f} | {r['peak_gib']:.2f} |", flush=True)
    print("\n| shards | rows | one epoch's peak GiB (rows only) |\n|---|---|---|")
    for folder, count in ((one, args.shards), (ten, 10 * args.shards)):
        r = harness.run_child(MODULE, "_epoch", folder, threads=args.threads)
        print(f"| {count} | {r['rows']} | {r['peak_gib']:.3f} |", flush=True)


def add_commands(sub):
    p = sub.add_parser("train", help="one Diffusion-DPO step: ours vs the diffusers recipe, with and without checkpointing")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32: 256 px images)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the median of steps 2.. (3.. for ours) is reported")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(TRAIN_VARIANTS),
                   help=f"comma-separated subset of {','.join(TRAIN_VARIANTS)}")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("reward", help="reward training (DRaFT-K): time and peak memory against K and sampling steps")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.set_defaults(func=cmd_reward)
    p = sub.add_parser("ddpo", help="DDPO: one epoch (sampling + update) against its sampling; peak memory against steps")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--sample-steps", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50],
                   help="comma-separated sampling step counts, one epoch each (default 10,20,50)")
    p.set_defaults(func=cmd_ddpo)
    p = sub.add_parser("data", help="parquet shards: pairs/s decoded and cropped, and peak memory at 1x and 10x shards")
    p.add_argument("--shards", type=int, default=4, help="shards at 1x (default 4; 10x writes ten times as many)")
    p.add_argument("--image-size", type=int, default=512, help="side of the stored JPEGs (default 512)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--batches", type=int, default=8, help="timed batches of 8 (default 8)")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2],
                   help="comma-separated --num-workers values (default 0,2)")
    p.set_defaults(func=cmd_data)
    for name in ("train", "reward", "ddpo", "data"):
        sub.choices[name].add_argument("--threads", type=int, default=2, help="torch threads")


# `python -m benchmarks.training KIND ARGS... THREADS`: one measurement in a fresh process (harness.run_child).
CHILDREN = {"_train": train_one, "_reward": reward_one, "_ddpo": ddpo_one, "_data": data_one, "_epoch": epoch_peak}

if __name__ == "__main__":
    harness.main(__doc__, [add_commands], CHILDREN)
