"""Training the offsets: Diffusion-DPO (or SFT) on preference pairs, with every pair swapped for NPO's δ; or
differentiable-reward fine-tuning through the sampler, with R or, for δ, 1 − R.

    python npo.py train --data pairs.jsonl --out runs/dpo            # η, the preference offset
    python npo.py train --data pairs.jsonl --out runs/npo --npo      # δ, the NPO offset (paper eq. 8)
    python npo.py train --method reward --reward shapes:reward --prompts-file p.txt --out runs/r --npo   # eq. 7
    torchrun --nproc_per_node 8 npo.py train ...                     # data-parallel, same flags
    python npo.py train ... --resume latest                          # continue an interrupted run

One optimizer step, for each pair (x_w, x_l, c) of the batch (DESIGN §4):

    z     = s · (μ(x) + σ(x) ⊙ n)        a sample of the VAE posterior q(z|x), s the VAE's scaling factor
    t ~ U{0, …, T−1},  ε ~ N(0, I)       one timestep and one noise, shared by the two images of a pair
    z_t   = √ᾱ_t z + √(1−ᾱ_t) ε
    d_θ   = ‖ε_θ(z_t^w) − ε‖² − ‖ε_θ(z_t^l) − ε‖²          the UNet with the LoRA on (multiplier 1)
    d_ref = the same with the LoRA off (multiplier 0): the reference is the base, never a second UNet copy
    L     = −log σ(β (d_ref − d_θ))                          losses.dpo_loss
With --npo each pair is swapped, (x_l, x_w, c), and nothing else changes: the offset learns δ. (The swap is applied
to the pair's latents, so every image keeps its posterior sample and an NPO step sees exactly what the DPO step
sees, with the roles reversed: at a zero offset its first update is the DPO run's, negated.)

The reward method (`reward_micro_step`) samples each example with DDIM + CFG and backpropagates −R through the
decode and the last K denoising steps (DRaFT-K). Both methods share the loop below: one micro-step function per
method, then the same gradient all-reduce, clipping, update, logging and checkpoints.

Every random number of training example i (its t, its ε, the two posterior noises n; for the reward method its
prompt and starting noise) comes from a generator
seeded by (seed, i), and data.batches makes the images and caption of example i a function of (seed, i) too.
So the whole state of a run is its step, its LoRA and its optimizer: a checkpoint of those three resumes bit
for bit, and 2 ranks with batch B compute what 1 rank computes with batch 2B.

Files in --out: `lora.safetensors` (the result, kohya format; `eta.safetensors` + `delta.safetensors` with
--joint), `log.jsonl` (one line per logged step),
`checkpoints/step-XXXXXX/` (`lora.safetensors` + `state.pt`, written atomically, the last K kept), and
`validation/step-XXXXXX-K.png` when --validation-prompts is given.
"""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from PIL import Image

import checkpoint
import data
import lora
import losses
import rewards
import sampler
from checkpoint import UserError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINT_FORMAT = "npo-train-checkpoint-1"
# Settings that make a checkpoint a different run: resuming with another value is an error. The others
# (lr, β, batch size, ...) may change on resume, with a warning, since the run no longer replays exactly.
IDENTITY = ("model_fingerprint", "role", "method", "rank", "lora_alpha", "layers")
# data.py's epoch generators use the spawn keys (epoch,); ours are (NOISE_STREAM, example), a separate stream
NOISE_STREAM = 0x6E6F697365
METRICS = ("loss", "implicit_acc", "reward_margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l")


# ----------------------------------------------------------------------------------------------------------
# The command line: `npo.py train` adds these flags to its subparser.

def add_arguments(p):
    p.add_argument("--model", default=None,
                   help="diffusers model folder of the frozen base model (default: the embedded model in weights/)")
    p.add_argument("--data", default=None,
                   help="preference pairs (dpo, sft): a .jsonl file ({prompt, chosen, rejected}), a folder with w/ "
                        "and l/, or a Pick-a-Pic .parquet file")
    p.add_argument("--out", required=True,
                   help="output folder: the LoRA goes to OUT/lora.safetensors, checkpoints to OUT/checkpoints/, "
                        "the log to OUT/log.jsonl")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the frozen base model (the LoRA parameters are float32 always)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu; under torchrun a CUDA run "
                        "puts rank r on cuda:LOCAL_RANK)")
    # the offset
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8, the authors' NPO setting)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha; the offset is scaled by alpha / rank (default: alpha = rank, scale 1)")
    p.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS),
                   help="comma-separated layer-name suffixes that get the LoRA "
                        f"(default {','.join(lora.DEFAULT_TARGETS)}: both attentions of every transformer block)")
    p.add_argument("--init-lora", default=None,
                   help="start from this LoRA file instead of a zero offset (its rank, alpha and layers are used)")
    # the objective
    p.add_argument("--npo", action="store_true",
                   help="train the NPO offset δ (role 'delta'): dpo/sft swap every pair (eq. 8), reward maximizes "
                        "1 − R (eq. 7); without it the run trains the preference offset η (role 'eta')")
    p.add_argument("--method", choices=["dpo", "sft", "reward"], default="dpo",
                   help="dpo: Diffusion-DPO; sft: plain denoising loss on the preferred image (for comparison); "
                        "reward: differentiable-reward fine-tuning through the sampler (DRaFT-K / AlignProp)")
    p.add_argument("--beta-dpo", type=float, default=500.0,
                   help="β of L = −log σ(β (d_ref − d_θ)), diffusers' convention (Salesforce's β is twice this); "
                        "default 500, the authors' NPO value for SD1.5")
    # reward training (--method reward)
    p.add_argument("--reward", default=None,
                   help="module:function of a reward R(images in [0,1], prompts) -> (B,), e.g. rewards:brightness")
    p.add_argument("--reward-range", default=None,
                   help="LOW,HIGH: map an unbounded reward to [0, 1] (affine, clamped), as 1 − R needs")
    p.add_argument("--reward-sigmoid", type=float, default=None,
                   help="map an unbounded reward to [0, 1] by σ(R / SCALE) instead")
    p.add_argument("--prompts-file", default=None, help="prompts of reward training, one per line")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of each training sample (default 20)")
    p.add_argument("--grad-steps", type=int, default=1,
                   help="K: gradients flow through the last K denoising steps only (DRaFT-K; default 1)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the training samples (default 7.5)")
    p.add_argument("--joint", action="store_true",
                   help="reward: train η (conditional branch) and δ (unconditional branch) at once in the eq. 10 "
                        "sampler, into OUT/eta.safetensors and OUT/delta.safetensors")
    p.add_argument("--alpha", type=float, default=1.0, help="--joint: weight of η on the unconditional branch")
    p.add_argument("--beta", type=float, default=1.0, help="--joint: weight of δ on the unconditional branch")
    # the optimizer
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate, constant after the warmup (default 5e-6)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup over this many steps")
    p.add_argument("--batch-size", type=int, default=1,
                   help="pairs per rank per micro-step; pairs per optimizer step = batch size × grad accum × ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps whose gradients add up to one optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient's global norm to this (0: no clipping)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet blocks' activations in the backward pass: less memory, about 30%% more time")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total, counting those of a resumed run")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of everything random: LoRA init, data order, crops, flips, caption dropout, t, ε")
    # the data
    p.add_argument("--resolution", type=int, default=None,
                   help="training image size in pixels, a multiple of 8 (default: the model's own size)")
    p.add_argument("--random-crop", action="store_true",
                   help="crop at a random position (the same for both images of a pair) instead of the center")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="probability of training a pair with the empty prompt (the unconditional branch of CFG)")
    p.add_argument("--cache-latents", action="store_true",
                   help="VAE-encode each image once per flip and keep the posterior in memory "
                        "(center crops only; costs 2 · 2 · 4 · (R/8)² values per pair)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip pairs whose images are missing or unreadable (counted at the end) instead of stopping")
    p.add_argument("--num-workers", type=int, default=0,
                   help="processes decoding images in the background (the batches are the same either way)")
    # bookkeeping
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="write OUT/checkpoints/step-XXXXXX every N steps (0: only at the end and on Ctrl-C)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints (0: keep all)")
    p.add_argument("--resume", default=None,
                   help="continue from a checkpoint folder, or 'latest' for the newest one in OUT/checkpoints/ "
                        "(pass the same flags as the interrupted run)")
    p.add_argument("--log-every", type=int, default=10, help="print and log the metrics averaged over every N steps")
    p.add_argument("--validation-prompts", nargs="+", default=None,
                   help="prompts to sample with the current LoRA into OUT/validation/ (one image each)")
    p.add_argument("--validation-every", type=int, default=0,
                   help="sample the validation prompts every N steps (0: only at the end)")
    p.add_argument("--validation-steps", type=int, default=25, help="DDIM steps of the validation images")


def check_arguments(args):
    positive = {"--rank": args.rank, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--steps": args.steps, "--log-every": args.log_every, "--validation-steps": args.validation_steps,
                "--sample-steps": args.sample_steps, "--grad-steps": args.grad_steps}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value}).")
    not_negative = {"--warmup-steps": args.warmup_steps, "--max-grad-norm": args.max_grad_norm,
                    "--checkpoint-every": args.checkpoint_every, "--keep-checkpoints": args.keep_checkpoints,
                    "--validation-every": args.validation_every, "--num-workers": args.num_workers}
    for flag, value in not_negative.items():
        if value < 0:
            raise UserError(f"{flag} must not be negative (got {value}).")
    for flag, value in (("--lr", args.lr), ("--beta-dpo", args.beta_dpo)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive finite number (got {value}).")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise UserError(f"--caption-dropout must be a probability in [0, 1] (got {args.caption_dropout}); pass e.g. 0.1.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError(f"--resolution {args.resolution} is not a positive multiple of 8; pass e.g. 512.")
    if args.cache_latents and args.random_crop:
        raise UserError("--cache-latents needs center crops (every random crop is a new image to encode); "
                        "drop --random-crop or --cache-latents.")
    if args.method == "reward":
        if not args.reward or not args.prompts_file:
            raise UserError("--method reward needs --reward module:function and --prompts-file; "
                            "e.g. --reward rewards:brightness --prompts-file prompts.txt.")
        if args.grad_steps > args.sample_steps:
            raise UserError(f"--grad-steps {args.grad_steps} exceeds --sample-steps {args.sample_steps}; "
                            "K counts the last of the sampling steps.")
        if args.joint and args.npo:
            raise UserError("--joint trains η and δ from the same reward R; drop --npo.")
    else:
        if not args.data:
            raise UserError(f"--method {args.method} trains on preference pairs; pass --data pairs.jsonl "
                            "(or a w/+l/ folder, or a .parquet file).")
        if args.joint:
            raise UserError("--joint is a reward-training mode; use it with --method reward.")


def reward_for(args):
    """--reward, bounded by --reward-range / --reward-sigmoid when given; refused if training cannot use it."""
    r = rewards.load(args.reward)
    if args.reward_range and args.reward_sigmoid is not None:
        raise UserError("pass one of --reward-range and --reward-sigmoid, not both.")
    if args.reward_range:
        try:
            low, high = (float(v) for v in args.reward_range.split(","))
        except ValueError:
            raise UserError(f"--reward-range takes LOW,HIGH such as 0,40, not {args.reward_range!r}.")
        r = rewards.affine(r, low, high)
    elif args.reward_sigmoid is not None:
        r = rewards.sigmoid(r, args.reward_sigmoid)
    if not rewards.is_differentiable(r):
        raise UserError(f"--method reward backpropagates through the reward, and {args.reward} is not "
                        "differentiable (e.g. JPEG size); use a differentiable reward.")
    if args.npo:
        rewards.negate(r)  # refuses an unbounded reward with a message
    return r


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({e}); pass a UTF-8 text file, one prompt per line.")
    if not prompts:
        raise UserError(f"the prompts file {path} holds no prompts; write one prompt per line.")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# The training loop.

def main(args, load_pipeline, generate=None):
    """Train one LoRA offset on preference pairs and write OUT/lora.safetensors; returns its path.

    `load_pipeline(path, dtype, device)` loads the base model (npo.load_pipeline); `generate(pipe, prompts, seeds,
    ...)` samples the validation images (npo.generate). After Ctrl-C or SIGTERM the run finishes its step, saves a
    checkpoint and raises SystemExit(130). Bad input raises UserError, before anything is written."""
    check_arguments(args)
    out = os.path.abspath(args.out)
    ckpt_dir = os.path.join(out, "checkpoints")
    model_path = os.path.abspath(args.model or DEFAULT_MODEL)
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    master = rank == 0  # only rank 0 writes files and prints

    def say(message):
        if master:
            print(message, file=sys.stderr, flush=True)

    # ---- what a user can get wrong is checked before the model loads (minutes for SD at full size) ----------
    if args.method == "reward":
        reward_for(args)
        source = read_prompts(args.prompts_file)
    else:
        source = data.open_pairs(args.data, skip_bad_rows=args.skip_bad_rows)
        if len(source) < args.batch_size * world_size:
            raise UserError(f"{args.data} has {len(source)} usable pairs, fewer than one batch of "
                            f"{args.batch_size * world_size}; lower --batch-size or add pairs.")
    resume_from = find_resume(args.resume, ckpt_dir)
    if args.resume == "latest" and resume_from is None:
        say(f"no checkpoint in {ckpt_dir} yet: starting from step 0")
    results = [os.path.join(out, name) for name in result_files(args).values()]
    if resume_from is None and (list_checkpoints(ckpt_dir) or any(map(os.path.exists, results))):
        raise UserError(f"{out} already holds a training run; continue it with --resume latest, "
                        "or pass --out a new folder.")
    state = read_checkpoint(resume_from) if resume_from else None
    created = prepare_output(out) if master else False

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, load_pipeline, generate, source, state, resume_from, out, ckpt_dir, model_path,
                      rank, world_size, device, say)
    except UserError:
        if created:
            remove_if_empty(out)  # a run that never got going leaves no folder behind
        raise
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _train(args, load_pipeline, generate, source, state, resume_from, out, ckpt_dir, model_path,
           rank, world_size, device, say):
    master = rank == 0
    dtype = DTYPES[args.dtype]
    pipe = load_pipeline(model_path, dtype, device)
    unet = pipe.unet
    if args.resolution is None:  # the model's own image size
        args.resolution = unet.config.sample_size * pipe.vae.downscale
    fingerprint = model_fingerprint(unet)  # of the base weights, before any offset is attached
    files = result_files(args)  # {role: file name}: one offset, or η and δ with --joint

    # ---- the offsets: fp32 LoRA parameters on the frozen base ---------------------------------------------
    torch.manual_seed(args.seed)  # lora_down's kaiming init draws from the global generator: the same on every rank
    params = []
    for role in files:
        if args.init_lora:
            lora.load_lora(unet, args.init_lora, role)
            params += [p.requires_grad_(True) for p in lora.parameters(unet, role)]
        else:
            params += lora.add_offset(unet, role, args.rank, args.lora_alpha, args.targets)
    found = {f"{role}:{name}": o for role in files for name, o in lora.offsets(unet, role).items()}
    global_batch = args.batch_size * args.grad_accum * world_size  # pairs (or prompts) per optimizer step
    settings = dict(
        model=model_path, model_fingerprint=fingerprint, role="+".join(files), method=args.method,
        rank=Counter(o.rank for o in found.values()).most_common(1)[0][0],
        lora_alpha=Counter(float(o.alpha) for o in found.values()).most_common(1)[0][0],
        layers=sorted(found), beta_dpo=args.beta_dpo, lr=args.lr, warmup_steps=args.warmup_steps,
        global_batch=global_batch, seed=args.seed, resolution=args.resolution, random_crop=args.random_crop,
        caption_dropout=args.caption_dropout, max_grad_norm=args.max_grad_norm, dtype=args.dtype,
        data=os.path.abspath(args.data) if args.data else None, reward=args.reward, grad_steps=args.grad_steps,
        sample_steps=args.sample_steps, guidance=args.guidance,
        init_lora=os.path.abspath(args.init_lora) if args.init_lora else None)
    # AdamW(0.9, 0.999, wd 1e-2) as the Diffusion-DPO and NPO recipes; the lr is set by hand every step
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2)

    step = 0  # optimizer steps done
    if state is not None:
        check_resume(state["settings"], settings, resume_from, say)
        for role, name in files.items():
            restore_lora(unet, role, os.path.join(resume_from, name))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])  # the loop draws nothing from it; restored for anything that does
        step = state["step"]
        say(f"resuming from {resume_from} at step {step}")

    if args.method == "reward":
        micro_step = reward_micro_step(args, pipe, source, files, rank, world_size, device)
        what = f"{len(source)} prompts, reward {settings['reward']}"
    else:
        micro_step = dpo_micro_step(args, pipe, source, files, step, rank, world_size, device)
        what = repr(source)
    say(f"training {'+'.join(files)} ({args.method}{', NPO' if args.npo else ''}) on {what}: "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters on {len(found)} layers, "
        f"{global_batch} examples per step on {world_size} rank(s), {device}, {args.dtype}")

    log = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") if master else None
    if log and state is not None:
        log.write(json.dumps({"event": "resume", "step": step, "from": resume_from}) + "\n")
    stop = StopRequest()
    last_saved = step if state is not None else None
    window, window_start = [], time.perf_counter()
    try:
        while step < args.steps:
            # ---- forward and backward over the micro-batches; gradients add up in p.grad ----------------------
            totals = None
            for micro in range(args.grad_accum):
                first = ((step * args.grad_accum + micro) * world_size + rank) * args.batch_size  # example index
                metrics = micro_step(first, 1 / args.grad_accum)
                values = torch.tensor([metrics[k] for k in sorted(metrics)])
                totals = values if totals is None else totals + values
            names = sorted(metrics)

            # ---- one gradient and one set of metrics for all ranks ------------------------------------------
            stats = torch.cat([totals / args.grad_accum, torch.tensor([float(stop.requested)])])
            if world_size > 1:
                # The mean over ranks of each rank's mean over its examples is the mean over all (equal shares).
                # One flat all-reduce of the LoRA gradients; the stop flag travels with the metrics so every rank
                # stops (or raises) at the same step instead of waiting forever for the others.
                flat = torch.cat([p.grad.flatten() for p in params])
                dist.all_reduce(flat)
                flat /= world_size
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu() / world_size
            metrics = dict(zip(names, stats[:-1].tolist()))
            stopping = bool(stats[-1] > 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
            if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
                kept = f"the last good checkpoint is {last_saved_path(ckpt_dir)}" if list_checkpoints(ckpt_dir) \
                    else "there is no checkpoint yet"
                raise UserError(f"the loss became {metrics['loss']} (gradient norm {grad_norm}) at step {step + 1}, "
                                f"so the run stopped without applying it and {kept}; lower --lr (or --beta-dpo) and "
                                "continue with --resume latest.")

            # ---- the update: constant lr after a linear warmup (nanoGPT's ramp: never 0 at step 0) -------------
            lr = args.lr * min(1.0, (step + 1) / (args.warmup_steps + 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # ---- logging, checkpoints, validation (rank 0 writes) --------------------------------------------
            window.append(dict(metrics, grad_norm=grad_norm))
            if step % args.log_every == 0 or step == args.steps or stopping:
                elapsed = time.perf_counter() - window_start
                it_s = len(window) / elapsed
                line = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                line.update(step=step, lr=lr, it_per_s=it_s, eta_s=(args.steps - step) / it_s, time=time.time())
                shown = ("implicit_acc", "reward_margin") if args.method != "reward" else ("reward",)
                say(f"step {step}/{args.steps} | loss {line['loss']:.4f} | "
                    + "".join(f"{k} {line[k]:.4g} | " for k in shown)
                    + f"lr {lr:.2e} | grad {line['grad_norm']:.3g} | {it_s:.2f} it/s | ETA {format_seconds(line['eta_s'])}")
                if log:
                    log.write(json.dumps({"step": step, **{k: v for k, v in line.items() if k != "step"}}) + "\n")
                    log.flush()
                window, window_start = [], time.perf_counter()
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or stopping or step == args.steps:
                if master:
                    save_checkpoint(ckpt_dir, step, unet, files, optimizer, settings, args.keep_checkpoints)
                last_saved = step
                if world_size > 1:
                    dist.barrier()  # no rank exits (and makes torchrun kill rank 0) while the checkpoint is written
            if stopping:
                say(f"interrupted: saved {checkpoint_path(ckpt_dir, step)}; continue with --resume latest")
                raise SystemExit(130)
            if master and generate and args.validation_prompts and (
                    step == args.steps or (args.validation_every and step % args.validation_every == 0)):
                images = validate(pipe, generate, args, out, step)
                if log:
                    log.write(json.dumps({"event": "validation", "step": step, "images": images}) + "\n")
                    log.flush()
    finally:
        stop.restore()
        if log:
            log.close()

    # ---- the result -------------------------------------------------------------------------------------------
    paths = [os.path.join(out, name) for name in files.values()]
    if master:
        if last_saved != step:
            save_checkpoint(ckpt_dir, step, unet, files, optimizer, settings, args.keep_checkpoints)
        for (role, name), path in zip(files.items(), paths):
            lora.save_lora(unet, role, path, role=role, base_model=model_path, metadata=file_metadata(settings, step))
        if getattr(source, "skipped", 0):
            say(f"skipped {source.skipped} bad rows of {args.data}")
        say(f"wrote {', '.join(paths)} ({step} steps)")
    if world_size > 1:
        dist.barrier()
    return paths[0] if len(paths) == 1 else paths


def result_files(args):
    """The offsets a run trains and the file each ends in: η or δ in lora.safetensors; both with --joint."""
    if args.joint:
        return {"eta": "eta.safetensors", "delta": "delta.safetensors"}
    return {"delta" if args.npo else "eta": "lora.safetensors"}


# ----------------------------------------------------------------------------------------------------------
# One micro-step of Diffusion-DPO (or SFT): forward and backward of one batch of pairs; returns its metrics.

def dpo_micro_step(args, pipe, dataset, files, step, rank, world_size, device):
    (role,) = files
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[args.dtype]
    schedule = sampler.DDIMConfig.from_dict(pipe.scheduler_config)
    ac = sampler.alphas_cumprod(schedule)  # ᾱ_t, t = 0 … T−1
    if args.gradient_checkpointing:
        checkpoint_unet_blocks(unet)
    # the data: example i of the stream is micro-step i // (B·W), rank (i // B) % W, row i % B
    stream = data.batches(dataset, args.batch_size, args.seed, args.resolution, start_step=step * args.grad_accum,
                          random_crop=args.random_crop, caption_dropout=args.caption_dropout,
                          rank=rank, world_size=world_size, num_workers=args.num_workers)
    cache = {} if args.cache_latents else None

    def micro_step(first, weight):
        prompts, preferred, rejected = next(stream)
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        mean, std = posterior(vae, torch.cat([preferred, rejected]), device, dtype, cache)  # [x_w; x_l]
        shape = mean.shape[1:]
        # from each pair's own generator, in this order: t, ε, then the posterior noises of x_w and x_l
        draws = [(torch.randint(0, len(ac), (1,), generator=g), torch.randn((1, *shape), generator=g),
                  torch.randn((2, *shape), generator=g)) for g in gens]
        t = torch.cat([d[0] for d in draws]).repeat(2).to(device)            # shared within a pair
        eps = torch.cat([d[1] for d in draws]).repeat(2, 1, 1, 1).to(device)  # shared within a pair
        n = torch.cat([d[2][0:1] for d in draws] + [d[2][1:2] for d in draws]).to(device, mean.dtype)
        z = ((mean + std * n) * vae.scaling_factor).float()  # a posterior sample, scaled (DESIGN §3)
        if args.npo:  # eq. 8: (x_l, x_w, c), the loser trained as the winner; each latent keeps its noise
            z = losses.swap_halves(z)
        z_t = sampler.add_noise(z, eps, t, ac).to(dtype)
        target = sampler.target(z, eps, t, ac, schedule.prediction_type)  # ε, or v for v-prediction models
        context = pipe.encode_prompts(prompts).repeat(2, 1, 1)

        model_pred = unet(z_t, t, context)
        # the reference: the same UNet with the offset switched off. (With gradient checkpointing the backward
        # recomputes the LoRA forward later, outside this block, so at multiplier 1 again.)
        with torch.no_grad(), lora.multipliers(unet, **{role: 0.0}):
            ref_pred = unet(z_t, t, context)
        loss, metrics = losses.dpo_loss(model_pred, ref_pred, target, args.beta_dpo)
        if args.method == "sft":  # SFT logs the same DPO metrics, so the two runs read alike
            loss = losses.sft_loss(model_pred, target)
        (loss * weight).backward()
        return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
    return micro_step


# ----------------------------------------------------------------------------------------------------------
# One micro-step of differentiable-reward fine-tuning (DRaFT-K / AlignProp style), R or, for NPO, 1 − R.

def reward_micro_step(args, pipe, prompts, files, rank, world_size, device):
    """Sample each example from noise with DDIM and CFG, the offsets on; gradients flow only through the last K
    (--grad-steps) denoising steps, each UNet call of which is checkpointed; decode; loss = −R (δ: −(1 − R)).

    One offset: θ + offset on both CFG branches, as the sampler of the fine-tuned model. --joint: eq. 10, η on
    both branches and δ on the unconditional one only (multipliers [α, 1] and [β, 0]), both learning from R."""
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[args.dtype]
    schedule = sampler.pipeline_config(pipe.scheduler_config)
    steps = sampler.ddim_steps(schedule, args.sample_steps)
    score = reward_for(args)
    train_on = rewards.negate(score) if args.npo else score  # eq. 7: δ maximizes 1 − R
    size, channels = args.resolution, unet.config.in_channels
    weights = multipliers_for(files, args, args.batch_size, device)

    def denoise(x, t, context):
        eps_neg, eps_pos = unet(torch.cat([x, x]), t, context).chunk(2)
        return sampler.cfg_combine(eps_neg, eps_pos, args.guidance)

    def micro_step(first, weight):
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        chosen = [prompts[int(torch.randint(len(prompts), (1,), generator=g))] for g in gens]
        x = sampler.initial_latents(gens, size, size, channels, device, dtype, vae.downscale)
        context = torch.cat([pipe.encode_prompts([""] * len(chosen)), pipe.encode_prompts(chosen)]).to(dtype)
        # the multipliers stay set through the backward: checkpointing recomputes the UNet calls there
        with lora.multipliers(unet, **weights):
            for i, (t, a_t, a_prev) in enumerate(steps):
                if i < len(steps) - args.grad_steps:
                    with torch.no_grad():
                        x = sampler.ddim_step(x, denoise(x, t, context), a_t, a_prev, schedule)
                else:  # one of the last K steps: keep its graph, but only its inputs in memory
                    out = torch.utils.checkpoint.checkpoint(denoise, x, t, context, use_reentrant=False)
                    x = sampler.ddim_step(x, out, a_t, a_prev, schedule)
            images = vae.decode(x.to(next(vae.parameters()).dtype) / vae.scaling_factor)
            images = (images.float() / 2 + 0.5).clamp(0, 1)
            objective = train_on(images, chosen)
            loss = -objective.mean()
            (loss * weight).backward()
        r = (1 - objective) if args.npo else objective  # the reward R itself is logged, also when training 1 − R
        return {"loss": loss.item(), "reward": r.mean().item()}
    return micro_step


def multipliers_for(files, args, batch, device):
    """The offsets' multipliers during reward sampling, for the batch [unconditional rows; conditional rows]."""
    if args.joint:
        m = {"eta": torch.cat([torch.full((batch,), args.alpha), torch.ones(batch)]),
             "delta": torch.cat([torch.full((batch,), args.beta), torch.zeros(batch)])}
        return {k: v.to(device) for k, v in m.items()}
    return {role: 1.0 for role in files}


# ----------------------------------------------------------------------------------------------------------
# The pieces of one step.

def example_generator(seed, index):
    """The generator of training example `index` (its t, ε and posterior noises): a function of (seed, index)
    only, so a resumed run and any number of ranks draw the same numbers for the same example."""
    state = np.random.SeedSequence(seed, spawn_key=(NOISE_STREAM, index)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def posterior(vae, pixels, device, dtype, cache=None):
    """The VAE posterior q(z|x) = N(μ, σ²) of each image (unscaled latents): `(mean, std)`, each (N, C, h, w).

    With a cache (--cache-latents) each distinct image is encoded once, on its own, and its moments are kept on
    the CPU. The cache is keyed by the pixels because the data stream hands us pixels, not row ids; with center
    crops an image comes in two versions (flipped or not), so a pair costs at most four encodes in a whole run.
    Caching μ and σ rather than a latent keeps the posterior sample fresh each time, as without the cache.
    (Encoding alone, not in a batch, also makes the moments the same bits after a resume refills the cache.)"""
    if cache is None:
        q = vae.encode(pixels.to(device, dtype))
        return q.mean, q.std
    moments = []
    for x in pixels:
        key = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest()
        if key not in cache:
            q = vae.encode(x[None].to(device, dtype))
            cache[key] = (q.mean.cpu(), q.std.cpu())
        moments.append(cache[key])
    return tuple(torch.cat(m).to(device) for m in zip(*moments))


def checkpoint_unet_blocks(unet):
    """Gradient checkpointing: every resnet and transformer of the UNet keeps only its inputs in the forward pass
    and recomputes its activations in the backward pass (torch.utils.checkpoint, non-reentrant: the frozen inputs
    need no grad for the LoRA weights inside to get theirs). The down/upsampling convs between them are cheap to
    keep and are not recomputed; this is the granularity diffusers' UNet checkpoints at, too."""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for layer in [*block.resnets, *(block.attentions or [])]:
            layer.forward = _recomputed(layer.forward)


def _recomputed(forward):
    def run(*args):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return run


@torch.no_grad()
def validate(pipe, generate, args, out, step):
    """Sample the validation prompts with the LoRA as it stands, as `npo.py sample` would use this file: η on
    both CFG branches (α = 1); δ on the negative branch only (base + NPO, β = 1). Fixed seeds, so the images of
    successive steps compare."""
    folder = os.path.join(out, "validation")
    os.makedirs(folder, exist_ok=True)
    prompts = args.validation_prompts
    images = generate(pipe, prompts, [args.seed + k for k in range(len(prompts))], steps=args.validation_steps,
                      height=args.resolution, width=args.resolution)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for k, array in enumerate(pixels):
        path = os.path.join(folder, f"step-{step:06d}-{k}.png")
        checkpoint.atomic_write(path, lambda f, a=array: Image.fromarray(a).save(f, format="PNG"))
        paths.append(os.path.relpath(path, out))
    return paths


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save a checkpoint there, so a
    half-applied optimizer step is never saved. A second signal stops at once."""

    def __init__(self):
        self.requested, self.old = False, {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (signal again to quit now)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def file_metadata(settings, step):
    """Metadata strings of the LoRA file, beside lora.save_lora's role, rank, alpha, targets and base model."""
    meta = {"npo_method": settings["method"], "npo_steps": str(step), "npo_lr": f"{settings['lr']:g}",
            "npo_global_batch": str(settings["global_batch"]), "npo_resolution": str(settings["resolution"]),
            "npo_seed": str(settings["seed"])}
    if settings["method"] == "reward":
        meta.update(npo_reward=settings["reward"], npo_grad_steps=str(settings["grad_steps"]),
                    npo_sample_steps=str(settings["sample_steps"]), npo_guidance=f"{settings['guidance']:g}",
                    npo_objective="1 - R" if settings["role"] == "delta" else "R")
    else:
        meta.update(npo_beta_dpo=f"{settings['beta_dpo']:g}", npo_pairs_swapped=str(settings["role"] == "delta").lower())
    return meta


def model_fingerprint(unet):
    """A short hash of the base UNet: every key and shape, and every 4099th weight rounded to bfloat16 (so a
    float32 and a bfloat16 load of one model agree, and a fine-tune or merge of the same architecture differs)."""
    h = hashlib.sha256()
    for name, t in unet.state_dict().items():
        h.update(f"{name}{tuple(t.shape)};".encode())
        h.update(t.detach().flatten()[::4099].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Files: output folder, checkpoints (atomic: a temporary folder, fsync, rename), resume.

def prepare_output(out):
    """Create OUT/checkpoints and prove OUT writable; returns whether OUT was created here."""
    created = not os.path.exists(out)
    try:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out} ({e.strerror or e}); "
                        "pass --out a folder you can write to.")
    for name in os.listdir(os.path.join(out, "checkpoints")):
        if name.startswith(".step-"):  # a checkpoint that a killed run left half-written
            shutil.rmtree(os.path.join(out, "checkpoints", name), ignore_errors=True)
    return created


def remove_if_empty(out):
    for folder in (os.path.join(out, "checkpoints"), out):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def checkpoint_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step-{step:06d}")


def list_checkpoints(ckpt_dir):
    """The complete checkpoint folders, oldest first (temporary ones start with '.' and are not listed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = sorted(int(m[1]) for name in os.listdir(ckpt_dir) if (m := re.fullmatch(r"step-(\d+)", name)))
    return [checkpoint_path(ckpt_dir, s) for s in steps]


def last_saved_path(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir, step, unet, files, optimizer, settings, keep):
    """Write checkpoints/step-XXXXXX/ with the run's LoRA files (`files`: {role: name}, usable as they are) and
    `state.pt` (a plain dict of tensors and Python values, readable with torch.load(weights_only=True)), then keep
    the last `keep`.

    The folder appears only complete: it is written under a temporary name, fsynced, then renamed."""
    final = checkpoint_path(ckpt_dir, step)
    tmp = tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=ckpt_dir)
    try:
        for role, name in files.items():
            lora.save_lora(unet, role, os.path.join(tmp, name), role=role, base_model=settings["model"],
                           metadata=file_metadata(settings, step))
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,  # optimizer steps done; the data stream continues at micro-step step × grad_accum
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "data": {"examples_seen": step * settings["global_batch"], "seed": settings["seed"]},
            "settings": settings,
            "files": dict(files),
        }
        torch.save(state, os.path.join(tmp, "state.pt"))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if os.path.exists(final):  # the same step written again (a resumed run): swap the old one out first
            old = tempfile.mkdtemp(prefix=f".step-{step:06d}-old-", dir=ckpt_dir)
            os.replace(final, os.path.join(old, "x"))
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if keep:
        for folder in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(folder)
    return final


def find_resume(resume, ckpt_dir):
    """The checkpoint folder that --resume names: 'latest' (None when there is none yet) or a folder."""
    if resume is None:
        return None
    if resume == "latest":
        return last_saved_path(ckpt_dir)
    folder = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(folder, "state.pt")):
        raise UserError(f"--resume {resume} is not a checkpoint folder (it has no state.pt); pass an "
                        "OUT/checkpoints/step-XXXXXX folder or 'latest'.")
    return folder


def read_checkpoint(folder):
    path = os.path.join(folder, "state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors for damaged or foreign files
        raise UserError(f"{path} is not a readable training checkpoint ({e}); resume from another checkpoint.")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an npo training checkpoint; resume from an OUT/checkpoints/step-XXXXXX folder.")
    for name in state.get("files", {}).values():
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{folder} has no {name}; resume from another checkpoint.")
    return state


def check_resume(saved, now, folder, say):
    """A checkpoint continues only the same run (model, role, method, LoRA shape); other changes are allowed
    with a warning, since they change the training from there on."""
    if saved["model_fingerprint"] != now["model_fingerprint"]:
        raise UserError(f"{folder} was trained on the model {saved['model']}, and {now['model']} has other "
                        f"weights; resume with --model {saved['model']} or start a new run in another --out.")
    if saved["role"] != now["role"] or saved["method"] != now["method"]:
        flags = lambda s: f"--method {s['method']}" + {"delta": " --npo", "eta+delta": " --joint"}.get(s["role"], "")
        raise UserError(f"{folder} was trained with {flags(saved)}, not {flags(now)}; "
                        "resume with the original flags or start a new run in another --out.")
    if any(saved[k] != now[k] for k in ("rank", "lora_alpha", "layers")):
        shape = lambda s: f"rank {s['rank']}, alpha {s['lora_alpha']:g} on {len(s['layers'])} layers"
        raise UserError(f"{folder} holds a LoRA of {shape(saved)}, but this run asks for {shape(now)}; "
                        "resume with the original --rank, --lora-alpha and --targets.")
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k not in IDENTITY and k != "model" and saved.get(k) != now[k]]
    if changed:
        say(f"warning: resuming with changed settings ({'; '.join(changed)}): the run will not replay an "
            "uninterrupted one exactly")


def restore_lora(unet, role, path):
    """Copy the checkpoint's LoRA tensors into the offset, bit for bit, refusing any other set of keys or shapes."""
    saved = checkpoint.read_safetensors(path)
    own = lora.offset_state_dict(unet, role)  # views of the parameters: copying into them sets the LoRA
    if saved.keys() != own.keys() or any(saved[k].shape != v.shape for k, v in own.items()):
        raise UserError(f"{path} does not fit the LoRA of this run (other layers or rank); "
                        "resume with the original --rank, --lora-alpha and --targets.")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])
