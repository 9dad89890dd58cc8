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

SDXL (Podell et al. 2023) conditions the UNet on more than c: its pooled text embedding and each pair's time ids
(the image's original size, the crop's corner, the target size), built as diffusers' SDXL Diffusion-DPO script
builds them (`pair_time_ids`); the VAE then encodes in float32. That script writes L = −log σ(−0.5·β' (d_θ −
d_ref)), so β = β'/2: the authors' SDXL NPO runs (β' = 2000) are --beta-dpo 1000.

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
import argparse
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
import images
import lora
import losses
import pipeline
import rewards
import runs
import sampler
from checkpoint import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# data.py's epoch generators use the spawn keys (epoch,); ours are (NOISE_STREAM, example), a separate stream
NOISE_STREAM = 0x6E6F697365

# Flags that only some methods read, and the values they take when not given. Given to another method, a flag
# would silently do nothing, so `check_arguments` refuses it (their argparse default is None or False: "not given").
PAIR_METHODS, REWARD_METHODS = ("dpo", "sft"), ("reward",)
METHOD_FLAGS = {
    "data": PAIR_METHODS, "beta_dpo": ("dpo",), "cache_latents": PAIR_METHODS, "random_crop": PAIR_METHODS,
    "caption_dropout": PAIR_METHODS, "skip_bad_rows": PAIR_METHODS, "num_workers": PAIR_METHODS,
    "reward": REWARD_METHODS, "reward_range": REWARD_METHODS, "reward_sigmoid": REWARD_METHODS,
    "prompts_file": REWARD_METHODS, "sample_steps": REWARD_METHODS, "grad_steps": REWARD_METHODS,
    "guidance": REWARD_METHODS, "joint": REWARD_METHODS,
}
DEFAULTS = {"beta_dpo": 500.0, "caption_dropout": 0.0, "num_workers": 0, "sample_steps": 20, "grad_steps": 1,
            "guidance": 7.5, "alpha": 1.0, "beta": 1.0}


# ----------------------------------------------------------------------------------------------------------
# The command line: `npo.py train` adds these flags to its subparser, in groups.

def add_arguments(p):
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None,
                   help="diffusers model folder of the frozen base model (default: the embedded model in weights/)")
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
    _add_reward_arguments(p.add_argument_group("reward training (--method reward)"))
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
                   help="train the NPO offset δ (role 'delta'): dpo/sft swap every pair (eq. 8), reward maximizes "
                        "1 − R (eq. 7); without it the run trains the preference offset η (role 'eta')")
    g.add_argument("--method", choices=["dpo", "sft", "reward"], default="dpo",
                   help="dpo: Diffusion-DPO; sft: plain denoising loss on the preferred image (for comparison); "
                        "reward: differentiable-reward fine-tuning through the sampler (DRaFT-K / AlignProp)")
    g.add_argument("--beta-dpo", type=float, default=None,
                   help="β of L = −log σ(β (d_ref − d_θ)), diffusers' SD1.5 convention (Salesforce's β, and the β "
                        "of the −0.5·β in diffusers' SDXL script, are twice this: the authors' SDXL NPO β 2000 is "
                        "1000 here); default 500, the authors' NPO value for SD1.5")


def _add_reward_arguments(g):
    g.add_argument("--reward", default=None,
                   help="module:function of a reward R(images in [0,1], prompts) -> (B,), e.g. rewards:brightness")
    g.add_argument("--reward-range", default=None,
                   help="LOW,HIGH: map an unbounded reward to [0, 1] (affine, clamped), as 1 − R needs")
    g.add_argument("--reward-sigmoid", type=float, default=None,
                   help="map an unbounded reward to [0, 1] by σ(R / SCALE) instead")
    g.add_argument("--prompts-file", default=None,
                   help="prompts of reward training: a .txt with one per line, or a .jsonl with a \"prompt\" per row")
    g.add_argument("--sample-steps", type=int, default=None, help="DDIM steps of each training sample (default 20)")
    g.add_argument("--grad-steps", type=int, default=None,
                   help="K: gradients flow through the last K denoising steps only (DRaFT-K; default 1)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale of the training samples (default 7.5)")
    g.add_argument("--joint", action="store_true",
                   help="train η (conditional branch) and δ (unconditional branch) at once in the eq. 10 "
                        "sampler, into OUT/eta.safetensors and OUT/delta.safetensors")
    g.add_argument("--alpha", type=float, default=None, help="--joint: weight of η on the unconditional branch (default 1)")
    g.add_argument("--beta", type=float, default=None, help="--joint: weight of δ on the unconditional branch (default 1)")


def _add_optimizer_arguments(g):
    g.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate, constant after the warmup (default 5e-6)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup over this many steps")
    g.add_argument("--batch-size", type=int, default=1,
                   help="pairs per rank per micro-step; pairs per optimizer step = batch size × grad accum × ranks")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps whose gradients add up to one optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient's global norm to this (0: no clipping)")
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
    for name in ("alpha", "beta"):
        if getattr(args, name) is not None and not args.joint:
            raise UserError(f"{_flag(name)} weighs an offset on the unconditional branch, which only --joint "
                            "trains; drop it or add --joint.")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_numbers(args)
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
    elif not args.data:
        raise UserError(f"--method {args.method} trains on preference pairs; pass --data pairs.jsonl "
                        "(or a w/+l/ folder, or a .parquet file).")


def _check_numbers(args):
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


def reward_for(args, prompts):
    """The objective reward training maximizes: --reward, bounded by --reward-range / --reward-sigmoid when given,
    negated for NPO (1 − R), and checked at every call. It is probed first (one call on random images): a reward
    with no gradient, or one that cannot score the training prompts, is refused before any model loads."""
    r = rewards.load(args.reward)
    if args.reward_range and args.reward_sigmoid is not None:
        raise UserError("pass one of --reward-range and --reward-sigmoid, not both.")
    rewards.check_prompts(r, prompts)
    if not rewards.probe(r, prompts, args.resolution or 64):
        raise UserError(f"--method reward backpropagates through the reward, and {args.reward} is not "
                        "differentiable (its scores do not depend on the pixels through autograd); use a "
                        "differentiable reward.")
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
    if args.method == "reward":
        source = data.read_prompts(args.prompts_file)
        reward_for(args, source)  # probed and checked now, minutes before the model has loaded
    else:
        source = data.open_pairs(args.data, skip_bad_rows=args.skip_bad_rows)
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
        pipe = pipeline.load_pipeline(os.path.abspath(args.model or pipeline.DEFAULT_MODEL), DTYPES[args.dtype], device)
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
    """The offsets a run trains and the file each ends in: η or δ in lora.safetensors; both with --joint."""
    if args.joint:
        return {"eta": "eta.safetensors", "delta": "delta.safetensors"}
    return {"delta" if args.npo else "eta": "lora.safetensors"}


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
    run.settings = run_settings(run, fingerprint)
    # AdamW(0.9, 0.999, wd 1e-2) as the Diffusion-DPO and NPO recipes; the lr is set by hand every step
    run.optimizer = torch.optim.AdamW(run.params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    if state is not None:
        runs.check_resume(state["settings"], run.settings, resume_from, run.say)
        for role, name in run.files.items():
            runs.restore_lora(unet, role, os.path.join(resume_from, name))
        run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])  # the loop draws nothing from it; restored for anything that does
        run.step = run.last_saved = state["step"]
        run.resumed_from = resume_from
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
        sample_steps=args.sample_steps, guidance=args.guidance,
        init_lora=os.path.abspath(args.init_lora) if args.init_lora else None)


def train(run, source):
    """The loop: optimizer steps until --steps, with logging, checkpoints and validation; then the result files."""
    args = run.args
    if args.method == "reward":
        micro_step = reward_micro_step(args, run.pipe, source, run.files, run.device)
        what = f"{len(source)} prompts, reward {args.reward}"
    else:
        micro_step = dpo_micro_step(args, run.pipe, source, run.files, run.step, run.rank, run.world_size, run.device)
        what = repr(source)
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
    return finish(run, source)


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
    A non-finite loss or gradient stops the run before it is applied. Returns (lr, gradient norm)."""
    args = run.args
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm or float("inf")).item()
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
        newest = runs.last_saved_path(run.ckpt_dir)
        kept = f"the last good checkpoint is {newest}" if newest else "there is no checkpoint yet"
        raise UserError(f"the loss became {metrics['loss']} (gradient norm {grad_norm}) at step {run.step + 1}, "
                        f"so the run stopped without applying it and {kept}; lower --lr (or --beta-dpo) and "
                        "continue with --resume latest.")
    lr = args.lr * min(1.0, (run.step + 1) / (args.warmup_steps + 1))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr, grad_norm


def after_step(run, log, stopping):
    """Checkpoint (every --checkpoint-every steps, at the end, and when stopping), then validation images."""
    args, step = run.args, run.step
    if (args.checkpoint_every and step % args.checkpoint_every == 0) or stopping or step == args.steps:
        if run.master:
            runs.save_checkpoint(run.ckpt_dir, step, run.pipe.unet, run.files, run.optimizer, run.settings,
                                 args.keep_checkpoints)
        run.last_saved = step
        if run.world_size > 1:
            dist.barrier()  # no rank exits (and makes torchrun kill rank 0) while the checkpoint is written
    if stopping:
        run.say(f"interrupted: saved {runs.checkpoint_path(run.ckpt_dir, step)}; continue with --resume latest")
        raise SystemExit(130)
    if run.master and args.validation_prompts and (
            step == args.steps or (args.validation_every and step % args.validation_every == 0)):
        log.event("validation", images=validate(run.pipe, args, run.out, step))


def finish(run, source):
    """The result files (rank 0), after a last checkpoint if the final step has none yet."""
    if run.master:
        if run.last_saved != run.step:
            runs.save_checkpoint(run.ckpt_dir, run.step, run.pipe.unet, run.files, run.optimizer, run.settings,
                                 run.args.keep_checkpoints)
        paths = runs.save_results(run.out, run.pipe.unet, run.files, run.settings, run.step)
        if getattr(source, "skipped", 0):
            run.say(f"skipped {source.skipped} bad rows of {run.args.data}")
        run.say(f"wrote {', '.join(paths)} ({run.step} steps)")
    paths = [os.path.join(run.out, name) for name in run.files.values()]
    if run.world_size > 1:
        dist.barrier()
    return paths[0] if len(paths) == 1 else paths


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
        shown = ("reward",) if args.method == "reward" else ("implicit_acc", "reward_margin")
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
                          rank=rank, world_size=world_size, num_workers=args.num_workers, sizes=pipe.is_sdxl)
    cache = {} if args.cache_latents else None

    def micro_step(first, weight):
        prompts, preferred, rejected, *sizes = next(stream)
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        # the VAE in its own dtype: float32 for SDXL's (pipeline.sdxl_vae_dtype), as the SDXL DPO script encodes
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

        model_pred = pipeline.run_unet(unet, z_t, t, context)
        # the reference: the same UNet with the offset switched off. (With gradient checkpointing the backward
        # recomputes the LoRA forward later, outside this block, so at multiplier 1 again.)
        with torch.no_grad(), lora.multipliers(unet, **{role: 0.0}):
            ref_pred = pipeline.run_unet(unet, z_t, t, context)
        loss, metrics = losses.dpo_loss(model_pred, ref_pred, target, args.beta_dpo)
        if args.method == "sft":  # SFT logs the same DPO metrics, so the two runs read alike
            loss = losses.sft_loss(model_pred, target)
        (loss * weight).backward()
        return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
    micro_step.close = stream.close
    return micro_step


# ----------------------------------------------------------------------------------------------------------
# One micro-step of differentiable-reward fine-tuning (DRaFT-K / AlignProp style), R or, for NPO, 1 − R.

def reward_micro_step(args, pipe, prompts, files, device):
    """Sample each example from noise with DDIM and CFG, the offsets on; gradients flow only through the last K
    (--grad-steps) denoising steps, each UNet call of which is checkpointed; decode; loss = −R (δ: −(1 − R)).

    One offset: θ + offset on both CFG branches, as the sampler of the fine-tuned model. --joint: eq. 10, η on
    both branches and δ on the unconditional one only (pipeline.npo_multipliers), both learning from R."""
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[args.dtype]
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, args.sample_steps)
    objective = reward_for(args, prompts)  # R, or 1 − R with --npo
    size, channels = args.resolution, unet.config.in_channels

    def micro_step(first, weight):
        gens = [example_generator(args.seed, first + j) for j in range(args.batch_size)]
        chosen = [prompts[int(torch.randint(len(prompts), (1,), generator=g))] for g in gens]
        x = sampler.initial_latents(gens, size, size, channels, device, dtype, vae.downscale)
        pos = pipe.conditioning(chosen, pipe.time_ids(size, size))
        neg = pipe.negative_conditioning(None, pos)  # "", or SDXL's zeros: diffusers without a negative prompt
        if args.joint:
            weights = pipeline.npo_multipliers(len(chosen), args.alpha, args.beta, device)
        else:
            weights = {role: 1.0 for role in files}
        denoise = pipeline.guided_denoiser(unet, neg, pos, args.guidance, weights)
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
        (loss * weight).backward()
        r = (1 - scores) if args.npo else scores  # the reward R itself is logged, also when training 1 − R
        return {"loss": loss.item(), "reward": r.mean().item()}
    return micro_step


# ----------------------------------------------------------------------------------------------------------
# The pieces of one step.

def pair_time_ids(sizes, resolution):
    """SDXL's time ids of each pair (B, 6), as diffusers' SDXL Diffusion-DPO script builds them: the original (H, W)
    of the image, the crop's (top, left) in the resized image, and the target (R, R). The script takes the first
    image's size (it resizes the second to it); here the preferred image's, the same for pairs of one size."""
    return torch.cat([sizes, torch.tensor([resolution, resolution]).expand(len(sizes), 2)], dim=1)

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
