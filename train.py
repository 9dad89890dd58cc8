"""Training the offsets: Diffusion-DPO (or SFT) on preference pairs, with every pair swapped for NPO's δ; or
differentiable-reward fine-tuning through the sampler, or RL (DDPO), with R or, for δ, 1 − R.

    python npo.py train --data pairs.jsonl --out runs/dpo            # η, the preference offset
    python npo.py train --data pairs.jsonl --out runs/npo --npo      # δ, the NPO offset (paper eq. 8)
    python npo.py train --method reward --reward shapes:reward --prompts-file p.txt --out runs/r --npo   # eq. 7
    python npo.py train --method ddpo --reward rewards:jpeg_incompressibility --prompts-file p.txt --out runs/rl
    python npo.py train --method reward ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg only
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

SDXL (Podell et al. 2023) conditions the UNet on more than c: its pooled text embedding and each pair's time ids
(the image's original size, the crop's corner, the target size), built as diffusers' SDXL Diffusion-DPO script
builds them (`pair_time_ids`); the VAE then encodes in float32. That script writes L = −log σ(−0.5·β' (d_θ −
d_ref)), so β = β'/2: the authors' SDXL NPO runs (β' = 2000) are --beta-dpo 1000.

The reward method (`reward_micro_step`) samples each example with DDIM + CFG and backpropagates −R through the
decode and the last K denoising steps (DRaFT-K). DDPO (`ddpo_micro_step`) needs only R's scores: each epoch
samples with DDIM at η_ddim = 1, keeps every step's latents and log-probability, and takes PPO steps on the
per-prompt advantages (ddpo.py). All methods share the loop below: one micro-step function per method, then the
same gradient all-reduce, clipping, update, logging and checkpoints. With --train-branch uncond (reward, ddpo) the
trained offset is δ on the unconditional branch only, beside a frozen η (--lora): `branch_weights`.

Every random number of training example i (its t, its ε, the two posterior noises n; for the reward method and
DDPO its prompt and sampling noises) comes from a generator
seeded by (seed, i), and data.batches makes the images and caption of example i a function of (seed, i) too.
So the whole state of a run is its step, its LoRA and its optimizer (for DDPO also the LoRA that sampled the
current epoch and the stat tracker's buffers): a checkpoint of those resumes bit for bit, and 2 ranks with batch B
compute what 1 rank computes with batch 2B.

Files in --out: `lora.safetensors` (the result, kohya format; `eta.safetensors` + `delta.safetensors` with
--joint), `log.jsonl` (one line per logged step),
`checkpoints/step-XXXXXX/` (`lora.safetensors` + `state.pt`, written atomically, the last K kept), and
`validation/step-XXXXXX-K.png` when --validation-prompts is given.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

import data
import ddpo
import images
import lora
import losses
import pipeline
import rewards
import runs
import sampler
import shards
from checkpoint import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# data.py's epoch generators use the spawn keys (epoch,); ours are (NOISE_STREAM, example), a separate stream
NOISE_STREAM = 0x6E6F697365
DDPO_STREAM = 0x6464706F  # DDPO's shuffles: (DDPO_STREAM, epoch, inner epoch) and (…, batch)

# Flags that only some methods read, and the values they take when not given. Given to another method, a flag
# would silently do nothing, so `check_arguments` refuses it (their argparse default is None or False: "not given").
# A flag's default is DEFAULTS' unless METHOD_DEFAULTS gives its method another (DDPO keeps ddpo-pytorch's).
PAIR_METHODS, SAMPLING_METHODS = ("dpo", "sft"), ("reward", "ddpo")
METHOD_FLAGS = {
    "data": PAIR_METHODS, "beta_dpo": ("dpo",), "cache_latents": PAIR_METHODS, "random_crop": PAIR_METHODS,
    "caption_dropout": PAIR_METHODS, "skip_bad_rows": PAIR_METHODS, "num_workers": PAIR_METHODS,
    "ties": PAIR_METHODS, "shuffle_buffer": PAIR_METHODS,
    "reward": SAMPLING_METHODS, "reward_range": SAMPLING_METHODS, "reward_sigmoid": SAMPLING_METHODS,
    "prompts_file": SAMPLING_METHODS, "sample_steps": SAMPLING_METHODS, "guidance": SAMPLING_METHODS,
    "joint": SAMPLING_METHODS, "train_branch": SAMPLING_METHODS, "lora": SAMPLING_METHODS, "grad_steps": ("reward",),
    "ddim_eta": ("ddpo",), "sample_batches": ("ddpo",), "inner_epochs": ("ddpo",), "clip_range": ("ddpo",),
    "adv_clip": ("ddpo",), "timestep_fraction": ("ddpo",),
}
DEFAULTS = {"lr": 5e-6, "beta_dpo": 500.0, "caption_dropout": 0.0, "num_workers": 0, "ties": "drop", "shuffle_buffer": 2,
            "sample_steps": 20, "grad_steps": 1, "guidance": 7.5, "alpha": 1.0, "beta": 1.0, "train_branch": "both",
            "ddim_eta": 1.0, "sample_batches": 2, "inner_epochs": 1, "clip_range": 1e-4, "adv_clip": 5.0,
            "timestep_fraction": 1.0}
METHOD_DEFAULTS = {"ddpo": {"lr": 3e-4, "sample_steps": 50, "guidance": 5.0}}  # ddpo-pytorch's config/base.py


# ----------------------------------------------------------------------------------------------------------
# The command line: `npo.py train` adds these flags to its subparser, in groups.

def add_arguments(p):
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None,
                   help="the frozen base model: a diffusers folder or a single-file .safetensors / .ckpt checkpoint "
                        "(default: the embedded model in weights/)")
    pipeline.add_source_arguments(g)
    g.add_argument("--out", required=True,
                   help="output folder: the LoRA goes to OUT/lora.safetensors, checkpoints to OUT/checkpoints/, "
                        "the log to OUT/log.jsonl")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the frozen base model (the LoRA parameters are float32 always)")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu; under torchrun a CUDA run "
                        "puts rank r on cuda:LOCAL_RANK)")
    _add_offset_arguments(p.add_argument_group("the offset (a LoRA on the frozen UNet)"))
    _add_objective_arguments(p.add_argument_group("the objective"))
    _add_reward_arguments(p.add_argument_group("training through the sampler (--method reward, ddpo)"))
    _add_ddpo_arguments(p.add_argument_group("RL (--method ddpo)"))
    _add_optimizer_arguments(p.add_argument_group("the optimizer"))
    _add_data_arguments(p.add_argument_group("preference pairs (--method dpo, sft)"))
    _add_bookkeeping_arguments(p.add_argument_group("checkpoints, logs and validation"))


def _add_offset_arguments(g):
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8, the authors' NPO setting)")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha; the offset is scaled by alpha / rank (default: alpha = rank, scale 1)")
    g.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS),
                   help="comma-separated layer-name suffixes that get the LoRA "
                        f"(default {','.join(lora.DEFAULT_TARGETS)}: both attentions of every transformer block)")
    g.add_argument("--init-lora", default=None,
                   help="start from this LoRA file instead of a zero offset (its rank, alpha and layers are used)")


def _add_objective_arguments(g):
    g.add_argument("--npo", action="store_true",
                   help="train the NPO offset δ (role 'delta'): dpo/sft swap every pair (eq. 8), reward and ddpo "
                        "maximize 1 − R (eq. 7); without it the run trains the preference offset η (role 'eta')")
    g.add_argument("--method", choices=["dpo", "sft", "reward", "ddpo"], default="dpo",
                   help="dpo: Diffusion-DPO; sft: plain denoising loss on the preferred image (for comparison); "
                        "reward: differentiable-reward fine-tuning through the sampler (DRaFT-K / AlignProp); "
                        "ddpo: RL (DDPO-IS with PPO clipping), for rewards with or without a gradient")
    g.add_argument("--beta-dpo", type=float, default=None,
                   help="β of L = −log σ(β (d_ref − d_θ)), diffusers' SD1.5 convention (Salesforce's β, and the β "
                        "of the −0.5·β in diffusers' SDXL script, are twice this: the authors' SDXL NPO β 2000 is "
                        "1000 here); default 500, the authors' NPO value for SD1.5")


def _add_reward_arguments(g):
    g.add_argument("--reward", default=None,
                   help="module:function of a reward R(images in [0,1], prompts) -> (B,), e.g. rewards:brightness; "
                        "or a learned scorer on your weights: pickscore:PATH, hpsv2:PATH, aesthetic:CLIP_PATH,MLP_PATH, "
                        "clipscore:PATH, imagereward:DIR")
    g.add_argument("--reward-range", default=None,
                   help="LOW,HIGH: map an unbounded reward to [0, 1] (affine, clamped), as 1 − R needs")
    g.add_argument("--reward-sigmoid", type=float, default=None,
                   help="map an unbounded reward to [0, 1] by σ(R / SCALE) instead")
    g.add_argument("--prompts-file", default=None,
                   help="training prompts: a .txt with one per line, or a .jsonl with a \"prompt\" per row")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="DDIM steps of each training sample (default 20; ddpo 50)")
    g.add_argument("--grad-steps", type=int, default=None,
                   help="reward: K, gradients flow through the last K denoising steps only (DRaFT-K; default 1)")
    g.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of the training samples (default 7.5; ddpo 5)")
    g.add_argument("--joint", action="store_true",
                   help="train η (conditional branch) and δ (unconditional branch) at once in the eq. 10 "
                        "sampler, into OUT/eta.safetensors and OUT/delta.safetensors")
    g.add_argument("--train-branch", choices=["both", "uncond"], default=None,
                   help="both (default): the offset runs on both CFG branches, as a fine-tuned model; uncond: train δ "
                        "only where eq. 10 puts it, on the unconditional branch inside CFG, from R (the authors' "
                        "SPO-NPO / VADER-NPO arrangement: δ learns through the (1 − g) of CFG); with --lora ETA")
    g.add_argument("--lora", default=None,
                   help="--train-branch uncond: the preference offset η (a LoRA file), frozen, on the conditional "
                        "branch and at --alpha on the unconditional one (default: none, base + δ)")
    g.add_argument("--alpha", type=float, default=None,
                   help="--joint, or --train-branch uncond with --lora: weight of η on the unconditional branch (default 1)")
    g.add_argument("--beta", type=float, default=None, help="--joint: weight of δ on the unconditional branch (default 1)")


def _add_ddpo_arguments(g):
    g.add_argument("--ddim-eta", type=float, default=None,
                   help="η_ddim of the training samples (default 1): above 0, so that every step has a log-probability")
    g.add_argument("--sample-batches", type=int, default=None,
                   help="batches of --batch-size prompts each rank samples per epoch (default 2), a multiple of "
                        "--grad-accum; an epoch then makes --inner-epochs passes over them, one optimizer step per "
                        "--grad-accum batches")
    g.add_argument("--inner-epochs", type=int, default=None, help="passes over each epoch's samples (default 1)")
    g.add_argument("--clip-range", type=float, default=None,
                   help="PPO's ε: the ratio p_θ/p_old is clipped to [1 − ε, 1 + ε] (default 1e-4, small because "
                        "log p is a mean over the latent)")
    g.add_argument("--adv-clip", type=float, default=None, help="clip the advantages to ±this (default 5)")
    g.add_argument("--timestep-fraction", type=float, default=None,
                   help="fraction of the sampling steps trained on, a random subset per batch (default 1: all)")


def _add_optimizer_arguments(g):
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate, constant after the warmup (default 5e-6; ddpo 3e-4)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup over this many steps")
    g.add_argument("--batch-size", type=int, default=1,
                   help="pairs (or prompts) per rank per micro-step; pairs per optimizer step = batch size × grad accum × ranks")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps whose gradients add up to one optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient's global norm to this (0: no clipping)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="run the frozen base under autocast in bf16 or fp16; the LoRA master weights, the optimizer and "
                        "the loss stay float32, the VAE encodes in float32; fp16 scales the loss dynamically and skips "
                        "steps whose gradients overflow (default no)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet blocks' activations in the backward pass: less memory, about 30%% more time")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps in total, counting those of a resumed run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of everything random: LoRA init, data order, crops, flips, caption dropout, t, ε")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image size in pixels, a multiple of 8 (default: the model's own size)")


def _add_data_arguments(g):
    g.add_argument("--data", default=None,
                   help="preference pairs: a .jsonl file ({prompt, chosen, rejected}), a folder with w/ and l/, "
                        "or a Pick-a-Pic .parquet file")
    g.add_argument("--random-crop", action="store_true",
                   help="crop at a random position (the same for both images of a pair) instead of the center")
    g.add_argument("--caption-dropout", type=float, default=None,
                   help="probability of training a pair with the empty prompt (the unconditional branch of CFG; "
                        "default 0)")
    g.add_argument("--cache-latents", action="store_true",
                   help="VAE-encode each image once per flip and keep the posterior in memory "
                        "(center crops only; costs 2 · 2 · 4 · (R/8)² values per pair)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip pairs whose images are missing or unreadable (counted at the end) instead of stopping")
    g.add_argument("--num-workers", type=int, default=None,
                   help="processes decoding images in the background (default 0; the batches are the same either way)")
    g.add_argument("--ties", choices=["drop", "keep"], default=None,
                   help="Pick-a-Pic ties (label_0 = 0.5): drop them (default, as Salesforce's Diffusion-DPO) or keep "
                        "them with jpg_0 as the winner (as the NPO authors' runs)")
    g.add_argument("--shuffle-buffer", type=int, default=None,
                   help="parquet shards (a folder or glob): shuffle rows within windows of this many row groups "
                        "(default 2; memory holds one window)")


def _add_bookkeeping_arguments(g):
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="write OUT/checkpoints/step-XXXXXX every N steps (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints (0: keep all)")
    g.add_argument("--resume", default=None,
                   help="continue from a checkpoint folder, or 'latest' for the newest one in OUT/checkpoints/ "
                        "(pass the same flags as the interrupted run)")
    g.add_argument("--log-every", type=int, default=10, help="print and log the metrics averaged over every N steps")
    g.add_argument("--validation-prompts", nargs="+", default=None,
                   help="prompts to sample with the current LoRA into OUT/validation/ (one image each)")
    g.add_argument("--validation-every", type=int, default=0,
                   help="sample the validation prompts every N steps (0: only at the end)")
    g.add_argument("--validation-steps", type=int, default=25, help="DDIM steps of the validation images")


def parse_args(argv):
    """The flags of `npo.py train` as a Namespace, for callers other than the command line (the experiment)."""
    parser = argparse.ArgumentParser(prog="npo.py train")
    add_arguments(parser)
    return parser.parse_args(argv)


def _flag(name):
    return "--" + name.replace("_", "-")


def check_arguments(args):
    """Refuse what cannot work or would silently do nothing, then fill in the method-specific defaults."""
    for name, methods in METHOD_FLAGS.items():
        if getattr(args, name) not in (None, False) and args.method not in methods:
            raise UserError(f"{_flag(name)} does nothing with --method {args.method} (it is for --method "
                            f"{' or '.join(methods)}); drop it.")
    _check_branches(args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, METHOD_DEFAULTS.get(args.method, {}).get(name, value))
    _check_numbers(args)
    if args.cache_latents and args.random_crop:
        raise UserError("--cache-latents needs center crops (every random crop is a new image to encode); "
                        "drop --random-crop or --cache-latents.")
    if args.method in SAMPLING_METHODS:
        if not args.reward or not args.prompts_file:
            raise UserError(f"--method {args.method} needs --reward module:function and --prompts-file; "
                            "e.g. --reward rewards:brightness --prompts-file prompts.txt.")
        if args.method == "reward" and args.grad_steps > args.sample_steps:
            raise UserError(f"--grad-steps {args.grad_steps} exceeds --sample-steps {args.sample_steps}; "
                            "K counts the last of the sampling steps.")
    elif not args.data:
        raise UserError(f"--method {args.method} trains on preference pairs; pass --data pairs.jsonl "
                        "(or a w/+l/ folder, or a .parquet file).")
    if args.method == "ddpo":
        _check_ddpo(args)


def _check_branches(args):
    """Which offsets train on which CFG branch: one offset on both, --joint (η and δ), or δ alone on the
    unconditional branch beside a frozen η (--train-branch uncond --lora ETA)."""
    uncond = args.train_branch == "uncond"
    if args.joint and args.npo:
        raise UserError("--joint trains η and δ from the same reward R; drop --npo.")
    if uncond and (args.joint or args.npo):
        raise UserError(f"--train-branch uncond trains δ from R itself (it learns through the (1 − g) of CFG); "
                        f"drop {'--joint' if args.joint else '--npo'}.")
    if args.lora is not None and not uncond:
        raise UserError("--lora is the frozen η beside a δ trained on the unconditional branch; add "
                        "--train-branch uncond, or drop --lora (--init-lora starts the trained offset from a file).")
    if args.lora is not None and not os.path.isfile(args.lora):
        raise UserError(f"--lora {args.lora} does not exist; pass the η LoRA .safetensors file.")
    if args.alpha is not None and not (args.joint or args.lora is not None):
        raise UserError("--alpha weighs η on the unconditional branch, and this run has no η there; drop it, or add "
                        "--joint, or --train-branch uncond with --lora ETA.")
    if args.beta is not None and not args.joint:
        raise UserError("--beta weighs an offset on the unconditional branch, which only --joint "
                        "trains; drop it or add --joint.")


def _check_ddpo(args):
    for flag, value in (("--clip-range", args.clip_range), ("--adv-clip", args.adv_clip), ("--ddim-eta", args.ddim_eta)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive finite number (got {value}).")
    if not 0 < args.timestep_fraction <= 1:
        raise UserError(f"--timestep-fraction must lie in (0, 1] (got {args.timestep_fraction}); it is the share of "
                        "the sampling steps trained on, 1 for all.")
    if int(args.sample_steps * args.timestep_fraction) < 1:
        raise UserError(f"--timestep-fraction {args.timestep_fraction} of {args.sample_steps} sampling steps trains "
                        "on no step; raise it.")
    if args.sample_batches % args.grad_accum:
        raise UserError(f"--sample-batches {args.sample_batches} is not a multiple of --grad-accum "
                        f"{args.grad_accum}; each optimizer step takes --grad-accum of an epoch's sampled batches.")


def _check_numbers(args):
    positive = {"--rank": args.rank, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--steps": args.steps, "--log-every": args.log_every, "--validation-steps": args.validation_steps,
                "--sample-steps": args.sample_steps, "--grad-steps": args.grad_steps,
                "--sample-batches": args.sample_batches, "--inner-epochs": args.inner_epochs}
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


def reward_for(args, prompts):
    """The objective reward and DDPO training maximize: --reward, bounded by --reward-range / --reward-sigmoid when
    given, negated for NPO (1 − R), and checked at every call. It is probed first (one call on random images): a
    reward that cannot score the training prompts, or (for --method reward, which backpropagates through it) one
    with no gradient, is refused before any model loads. DDPO needs only the scores."""
    r = rewards.load(args.reward)
    if args.reward_range and args.reward_sigmoid is not None:
        raise UserError("pass one of --reward-range and --reward-sigmoid, not both.")
    rewards.check_prompts(r, prompts)
    differentiable = rewards.probe(r, prompts, args.resolution or 64)
    if args.method == "reward" and not differentiable:
        raise UserError(f"--method reward backpropagates through the reward, and {args.reward} is not "
                        "differentiable (its scores do not depend on the pixels through autograd); use a "
                        "differentiable reward, or --method ddpo, which needs only the scores.")
    if args.reward_range:
        try:
            low, high = (float(v) for v in args.reward_range.split(","))
        except ValueError:
            raise UserError(f"--reward-range takes LOW,HIGH such as 0,40, not {args.reward_range!r}.")
        r = rewards.affine(r, low, high)
    elif args.reward_sigmoid is not None:
        r = rewards.sigmoid(r, args.reward_sigmoid)
    objective = rewards.negate(r) if args.npo else rewards.checked(r)
    rewards.probe(objective, prompts, args.resolution or 64)  # for NPO: are the scores in [0, 1]?
    return objective


# ----------------------------------------------------------------------------------------------------------
# The run: what is checked before the model loads, then the setup, the loop and the result.

@dataclass
class Run:
    """What the loop of one training run works with."""
    args: argparse.Namespace
    pipe: pipeline.Pipeline
    out: str
    rank: int
    world_size: int
    device: torch.device
    files: dict = field(default_factory=dict)  # {role: result file name}: one offset, or η and δ with --joint
    params: list = field(default_factory=list)  # the trainable LoRA parameters
    optimizer: torch.optim.Optimizer = None
    settings: dict = field(default_factory=dict)
    step: int = 0  # optimizer steps done
    last_saved: int = None  # the step of the newest checkpoint, None before there is one
    resumed_from: str = None  # the checkpoint folder this run continues
    streams: list = None  # each rank's (epoch, position) in a streamed dataset, from the checkpoint resumed
    stream_state: object = None  # () -> this rank's (epoch, position) now, for a streamed dataset; else None
    amp: object = None  # the Amp of --mixed-precision
    # what a method carries from step to step beyond the LoRA and the optimizer, saved with them (DDPO: the
    # policy that sampled the current epoch and the stat tracker's buffers, `ddpo_rollout`); None for the others
    method_state: dict = None

    @property
    def master(self):
        return self.rank == 0  # only rank 0 writes files and prints

    @property
    def ckpt_dir(self):
        return os.path.join(self.out, "checkpoints")

    def say(self, message):
        if self.master:
            print(message, file=sys.stderr, flush=True)


def main(args):
    """Train the offset(s) and write OUT/lora.safetensors (or eta/delta.safetensors with --joint); returns the path
    (a list of two with --joint). After Ctrl-C or SIGTERM the run finishes its step, saves a checkpoint and raises
    SystemExit(130). Bad input raises UserError, before the model loads and before anything is written."""
    check_arguments(args)
    out = os.path.abspath(args.out)
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if args.method in SAMPLING_METHODS:
        source = data.read_prompts(args.prompts_file)
        reward_for(args, source)  # probed and checked now, minutes before the model has loaded
    else:
        source = data.open_pairs(args.data, args.skip_bad_rows, args.ties, args.shuffle_buffer)
        if args.cache_latents and isinstance(source, shards.Shards):
            raise UserError("--cache-latents keeps every image's latents in memory, which a stream of parquet shards "
                            "would fill (each image comes once an epoch); drop --cache-latents.")
        if len(source) < args.batch_size * world_size:
            raise UserError(f"{args.data} has {len(source)} usable pairs, fewer than one batch of "
                            f"{args.batch_size * world_size}; lower --batch-size or add pairs.")
    state, resume_from = find_start(args, out, say=print if rank == 0 else lambda m: None)
    device = pipeline.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    created = runs.prepare_output(out) if rank == 0 else False
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        pipe = pipeline.load_pipeline(os.path.abspath(args.model or pipeline.DEFAULT_MODEL), DTYPES[args.dtype], device,
                                      **pipeline.source_options(args))
        run = Run(args, pipe, out, rank, world_size, device)
        setup(run, state, resume_from)
        return train(run, source)
    except UserError:
        if created:
            runs.remove_if_empty(out)  # a run that never got going leaves no folder behind
        raise
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def find_start(args, out, say):
    """(checkpoint state, its folder) to resume from, or (None, None) for a fresh run; refuses to start a fresh
    run over an earlier one."""
    ckpt_dir = os.path.join(out, "checkpoints")
    resume_from = runs.find_resume(args.resume, ckpt_dir)
    if args.resume == "latest" and resume_from is None:
        say(f"no checkpoint in {ckpt_dir} yet: starting from step 0")
    results = [os.path.join(out, name) for name in result_files(args).values()]
    if resume_from is None and (runs.list_checkpoints(ckpt_dir) or any(map(os.path.exists, results))):
        raise UserError(f"{out} already holds a training run; continue it with --resume latest, "
                        "or pass --out a new folder.")
    return (runs.read_checkpoint(resume_from), resume_from) if resume_from else (None, None)


def result_files(args):
    """The offsets a run trains and the file each ends in: η or δ in lora.safetensors; both with --joint. δ trained
    on the unconditional branch (--train-branch uncond) is δ, from R itself."""
    if args.joint:
        return {"eta": "eta.safetensors", "delta": "delta.safetensors"}
    return {"delta" if args.npo or args.train_branch == "uncond" else "eta": "lora.safetensors"}


def setup(run, state, resume_from):
    """Attach the fp32 LoRA offsets to the frozen base, make the optimizer, and restore a checkpoint's state."""
    args, unet = run.args, run.pipe.unet
    if args.resolution is None:  # the model's own image size
        args.resolution = run.pipe.image_size
    fingerprint = model_fingerprint(unet)  # of the base weights, before any offset is attached
    run.files = result_files(args)
    torch.manual_seed(args.seed)  # lora_down's kaiming init draws from the global generator: the same on every rank
    for role in run.files:
        if args.init_lora:
            lora.load_lora(unet, args.init_lora, role)
            run.params += [p.requires_grad_(True) for p in lora.parameters(unet, role)]
        else:
            run.params += lora.add_offset(unet, role, args.rank, args.lora_alpha, args.targets)
    if args.lora:  # the frozen η beside δ (--train-branch uncond): loaded, never trained or saved
        lora.load_lora(unet, args.lora, "eta")
    run.settings = run_settings(run, fingerprint)
    run.amp = Amp(args.mixed_precision, run.device)
    # AdamW(0.9, 0.999, wd 1e-2) as the Diffusion-DPO and NPO recipes (wd 1e-4 as ddpo-pytorch's for DDPO); the lr
    # is set by hand every step
    decay = 1e-4 if args.method == "ddpo" else 1e-2
    run.optimizer = torch.optim.AdamW(run.params, lr=args.lr, betas=(0.9, 0.999), weight_decay=decay)
    if state is not None:
        runs.check_resume(state["settings"], run.settings, resume_from, run.say)
        for role, name in run.files.items():
            runs.restore_lora(unet, role, os.path.join(resume_from, name))
        run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])  # the loop draws nothing from it; restored for anything that does
        run.step = run.last_saved = state["step"]
        run.resumed_from = resume_from
        run.streams = state["data"].get("streams")
        if run.amp.scaler and state.get("scaler"):
            run.amp.scaler.load_state_dict(state["scaler"])
        run.method_state = state.get("method_state")
        run.say(f"resuming from {resume_from} at step {run.step}")


def run_settings(run, fingerprint):
    """The settings a checkpoint records: those that identify the run (runs.IDENTITY) and those that steer it."""
    args = run.args
    found = {f"{role}:{name}": o for role in run.files for name, o in lora.offsets(run.pipe.unet, role).items()}
    return dict(
        model=os.path.abspath(args.model or pipeline.DEFAULT_MODEL), model_fingerprint=fingerprint,
        role="+".join(run.files), method=args.method,
        rank=Counter(o.rank for o in found.values()).most_common(1)[0][0],
        lora_alpha=Counter(float(o.alpha) for o in found.values()).most_common(1)[0][0],
        layers=sorted(found), beta_dpo=args.beta_dpo, lr=args.lr, warmup_steps=args.warmup_steps,
        global_batch=args.batch_size * args.grad_accum * run.world_size,  # pairs (or prompts) per optimizer step
        seed=args.seed, resolution=args.resolution, random_crop=args.random_crop,
        caption_dropout=args.caption_dropout, max_grad_norm=args.max_grad_norm, dtype=args.dtype,
        data=os.path.abspath(args.data) if args.data else None, reward=args.reward, grad_steps=args.grad_steps,
        sample_steps=args.sample_steps, guidance=args.guidance, train_branch=args.train_branch,
        lora=os.path.abspath(args.lora) if args.lora else None, alpha=args.alpha, beta=args.beta,
        ddim_eta=args.ddim_eta, sample_batches=args.sample_batches, inner_epochs=args.inner_epochs,
        clip_range=args.clip_range, adv_clip=args.adv_clip, timestep_fraction=args.timestep_fraction,
        init_lora=os.path.abspath(args.init_lora) if args.init_lora else None)


def train(run, source):
    """The loop: optimizer steps until --steps, with logging, checkpoints and validation; then the result files."""
    args = run.args
    if args.method == "reward":
        micro_step = reward_micro_step(args, run.pipe, source, run.files, run.device, run.amp)
        what = f"{len(source)} prompts, reward {args.reward}"
    elif args.method == "ddpo":
        micro_step = ddpo_micro_step(run, source)
        what = f"{len(source)} prompts, reward {args.reward}, {args.sample_batches} sampled batches per epoch"
    else:
        micro_step = dpo_micro_step(args, run.pipe, source, run.files, run.step, run.rank, run.world_size, run.device,
                                    stream_start(run, source), run.amp)
        what = repr(source)
    run.stream_state = getattr(micro_step, "stream_state", lambda: None)
    run.say(f"training {'+'.join(run.files)} ({args.method}{', NPO' if args.npo else ''}) on {what}: "
            f"{sum(p.numel() for p in run.params) / 1e6:.2f}M LoRA parameters on "
            f"{len(run.settings['layers'])} layers, {run.settings['global_batch']} examples per step on "
            f"{run.world_size} rank(s), {run.device}, {args.dtype}")
    log = Log(run)
    stop = StopRequest()
    try:
        while run.step < args.steps:
            metrics, stopping = combined_metrics(run, accumulate(run, micro_step), stop.requested)
            lr, grad_norm = update(run, metrics)
            log.add(dict(metrics, grad_norm=grad_norm), lr, force=stopping)
            after_step(run, log, stopping)
    finally:
        stop.restore()
        log.close()
        getattr(micro_step, "close", lambda: None)()  # stops the data loader's worker processes
    return finish(run, source, getattr(micro_step, "counts", lambda: {})())


def accumulate(run, micro_step):
    """Forward and backward over --grad-accum micro-batches (the gradients add up in p.grad); their mean metrics."""
    args, totals = run.args, None
    for micro in range(args.grad_accum):
        first = ((run.step * args.grad_accum + micro) * run.world_size + run.rank) * args.batch_size  # example index
        metrics = micro_step(first, 1 / args.grad_accum)
        values = torch.tensor([metrics[k] for k in sorted(metrics)])
        totals = values if totals is None else totals + values
    return dict(zip(sorted(metrics), (totals / args.grad_accum).tolist()))


def combined_metrics(run, metrics, stop_requested):
    """One gradient and one set of metrics for all ranks: (metrics, whether any rank was asked to stop).

    The mean over ranks of each rank's mean over its examples is the mean over all (equal shares). One flat
    all-reduce of the LoRA gradients; the stop flag travels with the metrics so every rank stops (or raises) at
    the same step instead of waiting forever for the others."""
    stats = torch.tensor([*metrics.values(), float(stop_requested)])
    if run.world_size > 1:
        flat = torch.cat([p.grad.flatten() for p in run.params])
        dist.all_reduce(flat)
        flat /= run.world_size
        for p, g in zip(run.params, flat.split([p.numel() for p in run.params])):
            p.grad.copy_(g.view_as(p))
        stats = stats.to(run.device)
        dist.all_reduce(stats)
        stats = stats.cpu() / run.world_size
    return dict(zip(metrics, stats[:-1].tolist())), bool(stats[-1] > 0)


def update(run, metrics):
    """Clip, check, and apply the gradient: constant lr after a linear warmup (nanoGPT's ramp: never 0 at step 0).
    A non-finite loss or gradient stops the run before it is applied (with fp16, an overflowing gradient skips the
    step instead: `metrics["skipped"]`). Returns (lr, gradient norm)."""
    args = run.args
    grad_norm = run.amp.unscaled_norm(run.optimizer, run.params, args.max_grad_norm)
    metrics["skipped"] = float(run.amp.scaler is not None and not math.isfinite(grad_norm))
    if not (math.isfinite(metrics["loss"]) and (math.isfinite(grad_norm) or metrics["skipped"])):
        newest = runs.last_saved_path(run.ckpt_dir)
        kept = f"the last good checkpoint is {newest}" if newest else "there is no checkpoint yet"
        raise UserError(f"the loss became {metrics['loss']} (gradient norm {grad_norm}) at step {run.step + 1}, "
                        f"so the run stopped without applying it and {kept}; lower --lr (or --beta-dpo) and "
                        "continue with --resume latest.")
    lr = args.lr * min(1.0, (run.step + 1) / (args.warmup_steps + 1))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.amp.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr, grad_norm


def stream_start(run, source):
    """This rank's place to start a streamed dataset (parquet shards): where the checkpoint resumed left it."""
    if not isinstance(source, shards.Shards) or run.streams is None:
        return None
    if len(run.streams) != run.world_size:
        raise UserError(f"{run.resumed_from} streamed the shards on {len(run.streams)} rank(s), and this run has "
                        f"{run.world_size}; resume with {len(run.streams)} rank(s) (each rank has its own place).")
    return tuple(run.streams[run.rank])


def save(run):
    """A checkpoint of the run as it stands: rank 0 writes it; every rank takes part (their places in a streamed
    dataset are gathered), and none goes on before it is written."""
    streams, mine = None, run.stream_state()
    if mine is not None:
        streams = torch.tensor([mine], dtype=torch.long, device=run.device)
        if run.world_size > 1:
            everyone = [torch.zeros_like(streams) for _ in range(run.world_size)]
            dist.all_gather(everyone, streams)
            streams = torch.cat(everyone)
        streams = streams.cpu().tolist()
    if run.master:
        scaler = run.amp.scaler.state_dict() if run.amp.scaler else None
        runs.save_checkpoint(run.ckpt_dir, run.step, run.pipe.unet, run.files, run.optimizer, run.settings,
                             run.args.keep_checkpoints, streams, scaler, run.method_state)
    run.last_saved = run.step
    if run.world_size > 1:
        dist.barrier()  # no rank exits (and makes torchrun kill rank 0) while the checkpoint is written


def after_step(run, log, stopping):
    """Checkpoint (every --checkpoint-every steps, at the end, and when stopping), then validation images."""
    args, step = run.args, run.step
    if (args.checkpoint_every and step % args.checkpoint_every == 0) or stopping or step == args.steps:
        save(run)
    if stopping:
        run.say(f"interrupted: saved {runs.checkpoint_path(run.ckpt_dir, step)}; continue with --resume latest")
        raise SystemExit(130)
    if run.master and args.validation_prompts and (
            step == args.steps or (args.validation_every and step % args.validation_every == 0)):
        log.event("validation", images=validate(run.pipe, args, run.out, step))


def finish(run, source, counts):
    """The result files (rank 0), after a last checkpoint if the final step has none yet."""
    if run.last_saved != run.step:
        save(run)
    if run.master:
        paths = runs.save_results(run.out, run.pipe.unet, run.files, run.settings, run.step)
        skipped = getattr(source, "skipped", 0) + counts.get("bad", 0)
        dropped = [f"skipped {skipped} bad rows"] * bool(skipped) + [f"dropped {counts.get('ties')} ties"] * bool(counts.get("ties"))
        if dropped:
            run.say(f"{' and '.join(dropped)} of {run.args.data}")
        run.say(f"wrote {', '.join(paths)} ({run.step} steps)")
    paths = [os.path.join(run.out, name) for name in run.files.values()]
    if run.world_size > 1:
        dist.barrier()
    return paths[0] if len(paths) == 1 else paths


class Amp:
    """--mixed-precision: the frozen base's forward runs under autocast (bf16 or fp16); the LoRA master weights, the
    optimizer state and the loss stay float32. fp16's narrow range needs a dynamic loss scale (torch.amp.GradScaler):
    the loss is multiplied by S before the backward, the gradients divided by S before clipping, and a step whose
    gradients overflowed is skipped (S halves; after 2000 good steps it doubles)."""

    def __init__(self, mode, device):
        self.dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss):
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscaled_norm(self, optimizer, params, max_norm):
        """The gradients' global norm after unscaling, clipped to `max_norm` (0: no clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")).item()

    def step(self, optimizer):
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)  # skipped when unscale_ found inf / nan gradients
            self.scaler.update()


class Log:
    """Metrics averaged over every --log-every steps: printed (rank 0) and appended to OUT/log.jsonl, with it/s
    and ETA; and events (resume, validation) as lines of their own."""

    def __init__(self, run):
        self.run, self.window, self.start = run, [], time.perf_counter()
        self.file = open(os.path.join(run.out, "log.jsonl"), "a", encoding="utf-8") if run.master else None
        if run.resumed_from:
            self.event("resume", **{"from": run.resumed_from})

    def add(self, metrics, lr, force=False):
        run, args = self.run, self.run.args
        self.window.append(metrics)
        if not (run.step % args.log_every == 0 or run.step == args.steps or force):
            return
        it_s = len(self.window) / (time.perf_counter() - self.start)
        line = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
        line.update(lr=lr, it_per_s=it_s, eta_s=(args.steps - run.step) / it_s, time=time.time())
        shown = {"reward": ("reward",), "ddpo": ("reward", "reward_std", "approx_kl", "clipfrac")}.get(
            args.method, ("implicit_acc", "reward_margin"))
        shown += ("skipped",) * bool(line.get("skipped"))  # fp16 steps whose gradients overflowed
        run.say(f"step {run.step}/{args.steps} | loss {line['loss']:.4f} | "
                + "".join(f"{k} {line[k]:.4g} | " for k in shown)
                + f"lr {lr:.2e} | grad {line['grad_norm']:.3g} | {it_s:.2f} it/s | ETA {format_seconds(line['eta_s'])}")
        self.write({"step": run.step, **line})
        self.window, self.start = [], time.perf_counter()

    def event(self, name, **fields):
        self.write({"event": name, "step": self.run.step, **fields})

    def write(self, entry):
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------------------
# One micro-step of Diffusion-DPO (or SFT): forward and backward of one batch of pairs; returns its metrics.

def dpo_micro_step(args, pipe, dataset, files, step, rank, world_size, device, start_state=None, amp=None):
    (role,) = files
    unet, vae, dtype, amp = pipe.unet, pipe.vae, DTYPES[args.dtype], amp or Amp("no", device)
    schedule = sampler.DDIMConfig.from_dict(pipe.scheduler_config)
    ac = sampler.alphas_cumprod(schedule)  # ᾱ_t, t = 0 … T−1
    if args.gradient_checkpointing:
        checkpoint_unet_blocks(unet)
    # the data: example i of the stream is micro-step i // (B·W), rank (i // B) % W, row i % B
    stream = data.batches(dataset, args.batch_size, args.seed, args.resolution, start_step=step * args.grad_accum,
                          random_crop=args.random_crop, caption_dropout=args.caption_dropout,
                          rank=rank, world_size=world_size, num_workers=args.num_workers, start_state=start_state,
                          sizes=pipe.is_sdxl)
    cache = {} if args.cache_latents else None

    def micro_step(first, weight):
        prompts, preferred, rejected, *sizes = next(stream)
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        # the VAE in its own dtype: float32 for SDXL's (pipeline.vae_dtype), as the SDXL DPO script encodes
        vae_dtype = next(vae.parameters()).dtype
        mean, std = posterior(vae, torch.cat([preferred, rejected]), device, vae_dtype, cache)  # [x_w; x_l]
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
        c = pipe.conditioning(prompts, pair_time_ids(sizes[0], args.resolution) if sizes else None)
        context = pipeline.cat_conditioning(c, c)  # both images of a pair: its text, pooled text and time ids

        with amp.autocast():
            model_pred = pipeline.run_unet(unet, z_t, t, context).float()
            # the reference: the same UNet with the offset switched off. (With gradient checkpointing the backward
            # recomputes the LoRA forward later, outside this block, so at multiplier 1 again.)
            with torch.no_grad(), lora.multipliers(unet, **{role: 0.0}):
                ref_pred = pipeline.run_unet(unet, z_t, t, context).float()
        loss, metrics = losses.dpo_loss(model_pred, ref_pred, target, args.beta_dpo)
        if args.method == "sft":  # SFT logs the same DPO metrics, so the two runs read alike
            loss = losses.sft_loss(model_pred, target)
        amp.backward(loss * weight)
        return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
    micro_step.close = stream.close
    micro_step.stream_state = lambda: getattr(stream, "state", None)  # a sharded dataset's place; else None
    micro_step.counts = lambda: getattr(stream, "counts", {})
    return micro_step


# ----------------------------------------------------------------------------------------------------------
# One micro-step of differentiable-reward fine-tuning (DRaFT-K / AlignProp style), R or, for NPO, 1 − R.

def reward_micro_step(args, pipe, prompts, files, device, amp=None):
    """Sample each example from noise with DDIM and CFG, the offsets on; gradients flow only through the last K
    (--grad-steps) denoising steps, each UNet call of which is checkpointed; decode; loss = −R (δ: −(1 − R)).

    The offsets run on the CFG branches that `branch_weights` gives."""
    unet, vae, dtype, amp = pipe.unet, pipe.vae, DTYPES[args.dtype], amp or Amp("no", device)
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, args.sample_steps)
    objective = reward_for(args, prompts)  # R, or 1 − R with --npo
    size, channels = args.resolution, unet.config.in_channels

    def micro_step(first, weight):
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        chosen = [draw_prompt(prompts, g) for g in gens]
        x = sampler.initial_latents(gens, size, size, channels, device, dtype, vae.downscale)
        pos = pipe.conditioning(chosen, pipe.time_ids(size, size))
        neg = pipe.negative_conditioning(None, pos)  # "", or SDXL's zeros: diffusers without a negative prompt
        guided = pipeline.guided_denoiser(unet, neg, pos, args.guidance, branch_weights(args, files, len(chosen), device))

        def denoise(x, t):  # the UNet under autocast (--mixed-precision); the DDIM update in x's dtype
            with amp.autocast():
                return guided(x, t).to(x.dtype)
        for i, (t, a_t, a_prev) in enumerate(steps):
            if i < len(steps) - args.grad_steps:
                with torch.no_grad():
                    x = sampler.ddim_step(x, denoise(x, t), a_t, a_prev, schedule)
            else:  # one of the last K steps: keep its graph, but only its inputs in memory
                out = torch.utils.checkpoint.checkpoint(denoise, x, t, use_reentrant=False)
                x = sampler.ddim_step(x, out, a_t, a_prev, schedule)
        pixels = vae.decode(x.to(next(vae.parameters()).dtype) / vae.scaling_factor)
        scores = objective((pixels.float() / 2 + 0.5).clamp(0, 1), chosen)
        loss = -scores.mean()
        amp.backward(loss * weight)
        r = (1 - scores) if args.npo else scores  # the reward R itself is logged, also when training 1 − R
        return {"loss": loss.item(), "reward": r.mean().item()}
    return micro_step


# ----------------------------------------------------------------------------------------------------------
# DDPO (Black et al. 2024), RL for rewards with or without a gradient; ddpo.py holds its math. An epoch samples
# --sample-batches batches per rank with DDIM (η_ddim > 0) and CFG, keeping each step's latents and log-probability,
# scores the decoded images, standardises the rewards per prompt, then makes --inner-epochs passes over the batches
# in a shuffled order, one PPO update per --grad-accum batches. The steps stay latents, never graphs: memory is
# that of one UNet forward and backward, whatever the number of sampling steps.

@dataclass
class Rollout:
    """One epoch's samples on this rank, per batch n: latents x_T … x_0 (n, steps + 1, B, C, h, w), in float32 as
    the sampler computed them; the log-probability of each step taken (n, steps, B); the prompt embeddings
    (n, B, 77, D); the clipped advantages (n, B); and the epoch's reward R over all ranks (mean, std)."""
    epoch: int
    latents: torch.Tensor
    log_probs: torch.Tensor
    embeds: torch.Tensor
    advantages: torch.Tensor
    reward: tuple


def ddpo_micro_step(run, prompts):
    """One micro-step of DDPO: the PPO loss of one sampled batch over its trained steps, backward. The epoch's
    rollout is sampled at its first micro-step (also the first after a resume, from the checkpointed policy)."""
    args, pipe, device = run.args, run.pipe, run.device
    if pipe.is_sdxl:
        raise UserError("--method ddpo runs on SD1.x/2.x models; for SDXL train with --method dpo or reward.")
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, args.sample_steps)
    if any(a_prev == 1 for _, _, a_prev in steps):  # σ_t = 0: a deterministic step has no log-probability
        raise UserError("this model's last DDIM step is deterministic (set_alpha_to_one in its scheduler config), "
                        "so DDPO cannot score it; train with a scheduler config whose set_alpha_to_one is false.")
    objective = reward_for(args, prompts)
    updates = args.sample_batches // args.grad_accum  # optimizer steps per pass over an epoch's batches
    trained = int(len(steps) * args.timestep_fraction)  # ddpo-pytorch's num_train_timesteps
    if args.gradient_checkpointing:
        checkpoint_unet_blocks(pipe.unet)
    neg = pipe.encode_prompts([""] * args.batch_size).to(DTYPES[args.dtype])
    rollout = None

    def micro_step(first, weight):
        nonlocal rollout
        index = first // (args.batch_size * run.world_size)  # accumulate's micro-step number, step · A + micro
        step, micro = divmod(index, args.grad_accum)
        epoch, k = divmod(step, updates * args.inner_epochs)
        inner, update = divmod(k, updates)
        if rollout is None or rollout.epoch != epoch:
            rollout = ddpo_rollout(run, prompts, objective, steps, schedule, epoch)
        # the batches of a pass in a shuffled order, and a subset of the steps of each: seeded by the epoch and the
        # batch, not the rank, so that W ranks with batch B train exactly as one with batch W·B
        n = int(torch.randperm(args.sample_batches, generator=stream_generator(args.seed, DDPO_STREAM, epoch, inner))
                [update * args.grad_accum + micro])
        chosen = torch.randperm(len(steps), generator=stream_generator(args.seed, DDPO_STREAM, epoch, inner, n))
        denoise = pipeline.guided_denoiser(pipe.unet, neg, rollout.embeds[n], args.guidance,
                                           branch_weights(args, run.files, args.batch_size, device))
        totals = Counter()
        for j in chosen[:trained].tolist():
            t, a_t, a_prev = steps[j]
            x = rollout.latents[n, j]
            mean, sigma = sampler.ddim_posterior(x, denoise(x.to(DTYPES[args.dtype]), t).float(), a_t, a_prev,
                                                 schedule, args.ddim_eta)
            log_prob = ddpo.step_log_prob(rollout.latents[n, j + 1], mean, sigma)
            loss, metrics = ddpo.ppo_loss(log_prob, rollout.log_probs[n, j], rollout.advantages[n], args.clip_range)
            (loss * weight / trained).backward()
            totals.update(loss=loss.item() / trained, **{k: v.item() / trained for k, v in metrics.items()})
        return dict(totals, reward=rollout.reward[0], reward_std=rollout.reward[1])
    return micro_step


def ddpo_rollout(run, prompts, objective, steps, schedule, epoch):
    """Sample, decode and score this rank's batches of `epoch`; the advantages from all ranks' rewards.

    The policy that samples is the LoRA at the epoch's start. A run resumed inside the epoch samples with that
    policy again (kept in the checkpoint's method state, with the stat tracker as the epoch found it), so it
    sees the same rollout, bit for bit, as the run it continues."""
    args, unet = run.args, run.pipe.unet
    saved = run.method_state
    resumed = saved is not None and saved["epoch"] == epoch  # a run resumed inside this epoch
    policy = saved["policy"] if resumed else offset_values(unet, run.files)
    tracker = saved["tracker"] if resumed else saved["tracker_after"] if saved else {}  # as the last epoch left it
    batches, size = args.sample_batches, args.batch_size * run.world_size
    with offsets_at(unet, policy):
        samples = [ddpo_sample(run, prompts, objective, steps, schedule,
                               ((epoch * batches + n) * run.world_size + run.rank) * args.batch_size)
                   for n in range(batches)]
    latents, log_probs, embeds, scores = (torch.stack(v) for v in zip(*samples))
    # all ranks' scores in example order: batch n of rank r holds examples ((epoch · N + n) · W + r) · B + j
    everyone = gather(run, scores).permute(1, 0, 2).reshape(-1)
    first = epoch * batches * size
    chosen = [draw_prompt(prompts, example_generator(args.seed, first + i)) for i in range(batches * size)]
    stats = ddpo.PerPromptStatTracker(state=tracker)
    advantages = torch.as_tensor(stats.update(chosen, everyone.double().cpu().numpy()), dtype=torch.float32)
    advantages = advantages.clamp(-args.adv_clip, args.adv_clip).view(batches, run.world_size, -1)[:, run.rank]
    run.method_state = {"epoch": epoch, "policy": policy, "tracker": tracker, "tracker_after": stats.state()}
    r = (1 - everyone) if args.npo else everyone  # the reward R itself is logged, also when training 1 − R
    return Rollout(epoch, latents, log_probs, embeds, advantages.to(run.device),
                   (r.mean().item(), r.std(correction=0).item()))


@torch.no_grad()
def ddpo_sample(run, prompts, objective, steps, schedule, first):
    """One batch of examples first, first + 1, …: DDIM + CFG from x_T with η_ddim = --ddim-eta, each step
    x_{t−1} = μ + σ_t z and its log-probability under N(μ, σ_t²); then decode and score. Prompt, x_T and every z of
    an example come from its own generator. Returns (latents, log-probs, prompt embeddings, scores)."""
    args, pipe, device, dtype = run.args, run.pipe, run.device, DTYPES[run.args.dtype]
    gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
    chosen = [draw_prompt(prompts, g) for g in gens]
    x = sampler.initial_latents(gens, args.resolution, args.resolution, pipe.unet.config.in_channels, device,
                                torch.float32, pipe.vae.downscale)
    neg, pos = (pipe.encode_prompts(p).to(dtype) for p in ([""] * len(chosen), chosen))
    denoise = pipeline.guided_denoiser(pipe.unet, neg, pos, args.guidance,
                                       branch_weights(args, run.files, len(chosen), device))
    latents, log_probs = [x], []
    for t, a_t, a_prev in steps:
        mean, sigma = sampler.ddim_posterior(x, denoise(x.to(dtype), t).float(), a_t, a_prev, schedule, args.ddim_eta)
        x = mean + sigma * sampler.randn(x.shape, gens, device)
        latents.append(x)
        log_probs.append(ddpo.step_log_prob(x, mean, sigma))
    pixels = pipe.vae.decode(x.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)
    scores = objective((pixels.float() / 2 + 0.5).clamp(0, 1), chosen).float().to(device)
    return torch.stack(latents), torch.stack(log_probs), pos, scores


def gather(run, x):
    """`x` of every rank, stacked in rank order (W, ...): one all_gather (x itself on one rank)."""
    if run.world_size == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(run.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


def offset_values(unet, roles):
    """{role: {key: tensor}}, a copy of the trained offsets' values (the policy of a DDPO epoch)."""
    return {role: {k: v.detach().clone() for k, v in lora.offset_state_dict(unet, role).items()} for role in roles}


@contextlib.contextmanager
def offsets_at(unet, values):
    """The offsets hold `values` ({role: {key: tensor}}) inside the block and their own values again after it."""
    own = offset_values(unet, values)
    _copy_offsets(unet, values)
    try:
        yield
    finally:
        _copy_offsets(unet, own)


def _copy_offsets(unet, values):
    with torch.no_grad():
        for role, tensors in values.items():
            for k, v in lora.offset_state_dict(unet, role).items():  # views of the parameters
                v.copy_(tensors[k])


# ----------------------------------------------------------------------------------------------------------
# The pieces of one step.

def pair_time_ids(sizes, resolution):
    """SDXL's time ids of each pair (B, 6), as diffusers' SDXL Diffusion-DPO script builds them: the original (H, W)
    of the image, the crop's (top, left) in the resized image, and the target (R, R). The script takes the first
    image's size (it resizes the second to it); here the preferred image's, the same for pairs of one size."""
    return torch.cat([sizes, torch.tensor([resolution, resolution]).expand(len(sizes), 2)], dim=1)

def example_generator(seed, index):
    """The generator of training example `index` (its t, ε and posterior noises; its prompt and sampling noises):
    a function of (seed, index) only, so a resumed run and any number of ranks draw the same numbers for the same
    example."""
    return stream_generator(seed, NOISE_STREAM, index)


def stream_generator(seed, *key):
    """A torch generator seeded by (seed, key): numpy's SeedSequence keeps the streams of different keys apart."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_prompt(prompts, generator):
    """A training prompt of reward or DDPO training, uniformly, from the example's generator (its first draw)."""
    return prompts[int(torch.randint(len(prompts), (1,), generator=generator))]


def branch_weights(args, files, batch, device):
    """The LoRA multipliers of the [unconditional; conditional] rows of the training sampler's CFG:
    one offset: θ + offset on both branches, as the fine-tuned model samples;
    --joint: eq. 10, η at [α, 1] and δ at [β, 0] (pipeline.npo_multipliers), both trained;
    --train-branch uncond: eq. 10 with η frozen at [α, 1] and δ at [1, 0], so δ is trained only where it runs, on
    the unconditional branch, and its gradient reaches it only through the (1 − g) of ε_neg + g·(ε_pos − ε_neg)."""
    if args.joint:
        return pipeline.npo_multipliers(batch, args.alpha, args.beta, device)
    if args.train_branch == "uncond":
        return pipeline.npo_multipliers(batch, args.alpha, 1.0, device)
    return {role: 1.0 for role in files}


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
def validate(pipe, args, out, step):
    """Sample the validation prompts with the LoRA as it stands, as `npo.py sample` would use this file: η on
    both CFG branches (α = 1); δ on the negative branch only (base + NPO, β = 1). Fixed seeds, so the images of
    successive steps compare. Returns the PNGs' paths relative to OUT."""
    folder = os.path.join(out, "validation")
    os.makedirs(folder, exist_ok=True)
    prompts = args.validation_prompts
    pictures = pipeline.generate(pipe, prompts, [args.seed + k for k in range(len(prompts))],
                                 steps=args.validation_steps, height=args.resolution, width=args.resolution)
    paths = []
    for k, picture in enumerate(images.to_pil(pictures)):
        paths.append(os.path.join(folder, f"step-{step:06d}-{k}.png"))
        images.save_png(picture, paths[-1])
    return [os.path.relpath(p, out) for p in paths]


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


def model_fingerprint(unet):
    """A short hash of the base UNet: every key and shape, and every 4099th weight rounded to bfloat16 (so a
    float32 and a bfloat16 load of one model agree, and a fine-tune or merge of the same architecture differs)."""
    h = hashlib.sha256()
    for name, t in unet.state_dict().items():
        h.update(f"{name}{tuple(t.shape)};".encode())
        h.update(t.detach().flatten()[::4099].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
