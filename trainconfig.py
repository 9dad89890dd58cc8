"""What a training run is told: `TrainConfig`, the one way code calls training (`train.train(config)`), the flags
of `npo.py train` that fill it, and the checks that refuse what cannot work before any model loads.

    config = TrainConfig(out="runs/npo", data="pairs.jsonl", npo=True, steps=500)    # from code
    config = parse_args(["--out", "runs/npo", "--data", "pairs.jsonl", "--npo"])     # from flags: the same config

A field left at None is "not given": a method that does not read it refuses it (a flag given to another method would
silently do nothing), and `check` fills in the method's default (DEFAULTS, or METHOD_DEFAULTS for DDPO, which keeps
ddpo-pytorch's). The flags carry no defaults of their own (argparse.SUPPRESS): a flag not given leaves the field's.
"""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

import lora
import pipeline
import rewards
import runs
from checkpoint import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("dpo", "sft", "reward", "ddpo", "spo")  # train.METHODS maps each to its module

# Flags that only some methods read. Given to another method, a flag would silently do nothing, so `check` refuses
# it. A flag's default is DEFAULTS' unless METHOD_DEFAULTS gives its method another.
PAIR_METHODS, SAMPLING_METHODS = ("dpo", "sft"), ("reward", "ddpo", "spo")
METHOD_FLAGS = {
    "data": PAIR_METHODS, "beta_dpo": ("dpo",), "cache_latents": PAIR_METHODS, "random_crop": PAIR_METHODS,
    "caption_dropout": PAIR_METHODS, "skip_bad_rows": PAIR_METHODS, "num_workers": PAIR_METHODS,
    "ties": PAIR_METHODS, "shuffle_buffer": PAIR_METHODS,
    "reward": SAMPLING_METHODS, "reward_range": SAMPLING_METHODS, "reward_sigmoid": SAMPLING_METHODS,
    "prompts_file": SAMPLING_METHODS, "sample_steps": SAMPLING_METHODS, "guidance": SAMPLING_METHODS,
    "joint": ("reward", "ddpo"), "train_branch": SAMPLING_METHODS, "lora": SAMPLING_METHODS, "grad_steps": ("reward",),
    "ddim_eta": ("ddpo", "spo"), "sample_batches": ("ddpo",), "inner_epochs": ("ddpo",), "clip_range": ("ddpo",),
    "adv_clip": ("ddpo",), "timestep_fraction": ("ddpo",),
    **{name: ("spo",) for name in ("spo_candidates", "spo_threshold", "spo_score_scale", "spo_plain_steps",
                                   "spo_beta", "spo_clip")},
}
DEFAULTS = {"lr": 5e-6, "beta_dpo": 500.0, "caption_dropout": 0.0, "num_workers": 0, "ties": "drop", "shuffle_buffer": 2,
            "sample_steps": 20, "grad_steps": 1, "guidance": 7.5, "alpha": 1.0, "beta": 1.0, "train_branch": "both",
            "ddim_eta": 1.0, "sample_batches": 2, "inner_epochs": 1, "clip_range": 1e-4, "adv_clip": 5.0,
            "timestep_fraction": 1.0, "rank": 8, "spo_candidates": 4, "spo_threshold": 0.3, "spo_score_scale": 1.0,
            "spo_plain_steps": 4, "spo_beta": 10.0, "spo_clip": 0.1}
METHOD_DEFAULTS = {"ddpo": {"lr": 3e-4, "sample_steps": 50, "guidance": 5.0},  # ddpo-pytorch's config/base.py
                   "spo": {"lr": 6e-5, "guidance": 5.0, "rank": 4}}  # SPO's SD1.5 config


@dataclass
class TrainConfig:
    """One training run's settings: a field per flag of `npo.py train` (--beta-dpo is `beta_dpo`). None: not given
    (see DEFAULTS). `check` fills in and validates; the run itself sets `resolution` to the model's size if None."""
    out: str = None  # output folder (required)
    # the model and where it runs
    model: str = None  # None: the embedded model
    vae: str = None
    text_encoder: str = None
    prediction_type: str = None
    ema: bool = False
    dtype: str = "float32"
    device: str = None  # None: cuda if available, else cpu
    # the offset
    rank: int = None  # None: 8 (spo: 4)
    lora_alpha: float = None  # None: alpha = rank
    targets: str = ",".join(lora.DEFAULT_TARGETS)
    init_lora: str = None
    # the objective
    npo: bool = False
    method: str = "dpo"
    beta_dpo: float = None
    # training through the sampler (reward, ddpo)
    reward: str = None
    reward_range: str = None
    reward_sigmoid: float = None
    prompts_file: str = None
    sample_steps: int = None
    grad_steps: int = None
    guidance: float = None
    joint: bool = False
    train_branch: str = None
    lora: str = None
    alpha: float = None
    beta: float = None
    # RL (ddpo)
    ddim_eta: float = None
    sample_batches: int = None
    inner_epochs: int = None
    clip_range: float = None
    adv_clip: float = None
    timestep_fraction: float = None
    # SPO (spo)
    spo_candidates: int = None
    spo_threshold: float = None
    spo_score_scale: float = None
    spo_plain_steps: int = None
    spo_beta: float = None
    spo_clip: float = None
    # the optimizer
    lr: float = None
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    steps: int = 2000
    seed: int = 0
    resolution: int = None  # None: the model's own image size
    # preference pairs (dpo, sft)
    data: str = None
    random_crop: bool = False
    caption_dropout: float = None
    cache_latents: bool = False
    skip_bad_rows: bool = False
    num_workers: int = None
    ties: str = None
    shuffle_buffer: int = None
    # checkpoints, logs and validation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = None
    log_every: int = 10
    validation_prompts: list = None
    validation_every: int = 0
    validation_steps: int = 25


def parse_args(argv):
    """The flags of `npo.py train` (without the subcommand) as a TrainConfig."""
    parser = argparse.ArgumentParser(prog="npo.py train")
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv))


def from_namespace(namespace):
    """The TrainConfig of parsed flags: the fields the namespace holds (the flags given), defaults for the rest.
    With --resume, the settings the run saved (OUT/settings.json) stand in for the flags not given."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(namespace, f.name)}
    if given.get("resume"):
        saved, out = runs.saved_settings(given["resume"], given.get("out"))
        # (a --method that differs from the run's keeps none of the other method's flags: the resume check then
        # says that this is another run)
        method = given.get("method", saved.get("method", TrainConfig.method))
        saved = {k: v for k, v in saved.items() if k in FIELDS and method in METHOD_FLAGS.get(k, (method,))}
        given = {**saved, "out": out, **given}
    return TrainConfig(**given)


def settings_to_save(config):
    """The config as given (before `check` fills in the defaults), as OUT/settings.json keeps it: paths absolute,
    so that `--resume OUT` works from any folder; without `resume`, which is how a run starts, not what it is."""
    saved = dataclasses.asdict(config)
    for name in ("out", "model", "vae", "text_encoder", "init_lora", "prompts_file", "lora", "data"):
        if saved[name]:
            saved[name] = os.path.abspath(saved[name])
    del saved["resume"]
    return saved


# ----------------------------------------------------------------------------------------------------------
# The command line: `npo.py train` adds these flags to its subparser, in groups.

def add_arguments(p):
    p.argument_default = argparse.SUPPRESS  # a flag not given leaves the TrainConfig field's default
    g = p.add_argument_group("model and output")
    g.add_argument("--model", help="the frozen base model: a diffusers folder or a single-file .safetensors / .ckpt "
                                   "checkpoint")
    pipeline.add_source_arguments(g)
    g.add_argument("--out", help="output folder: the LoRA goes to OUT/lora.safetensors, checkpoints to "
                                 "OUT/checkpoints/, the settings to OUT/settings.json, the log to OUT/log.jsonl and "
                                 "its plot to OUT/log.png (required, unless --resume names the run)")
    g.add_argument("--dtype", choices=sorted(DTYPES),
                   help="dtype of the frozen base model (the LoRA parameters are float32 always)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (under torchrun a CUDA run puts rank r on cuda:LOCAL_RANK)")
    _add_offset_arguments(p.add_argument_group("the offset (a LoRA on the frozen UNet)"))
    _add_objective_arguments(p.add_argument_group("the objective"))
    _add_reward_arguments(p.add_argument_group("training through the sampler (--method reward, ddpo)"))
    _add_ddpo_arguments(p.add_argument_group("RL (--method ddpo)"))
    _add_spo_arguments(p.add_argument_group("step-aware preference optimization (--method spo)"))
    _add_optimizer_arguments(p.add_argument_group("the optimizer"))
    _add_data_arguments(p.add_argument_group("preference pairs (--method dpo, sft)"))
    _add_bookkeeping_arguments(p.add_argument_group("checkpoints, logs and validation"))
    for action in p._actions:  # every flag's help ends with its default, from the one place defaults live
        if action.dest in FIELDS and action.dest != "out":
            action.help += f" (default: {default_text(action.dest)})"


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# What "not given" means for the fields whose default is None and that no method fills in
UNSET = {"model": "the embedded model in weights/", "device": "cuda if available, else cpu",
         "lora_alpha": "alpha = rank, scale 1", "resolution": "the model's own size", "lora": "none, base + δ",
         "resume": "none, a fresh run"}


def default_text(name):
    """A field's default as --help shows it; a method-dependent one names each method's value."""
    if name in DEFAULTS:
        others = [f"; --method {m}: {d[name]:g}" for m, d in METHOD_DEFAULTS.items() if name in d]
        value = DEFAULTS[name]
        return (f"{value:g}" if isinstance(value, float) else str(value)) + "".join(others)
    value = FIELDS[name].default
    if value is None:
        return UNSET.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _add_offset_arguments(g):
    g.add_argument("--rank", type=int, help="LoRA rank r (8 is the authors' NPO setting, 4 SPO's)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha; the offset is scaled by alpha / rank")
    g.add_argument("--targets", help="comma-separated layer-name suffixes that get the LoRA (the default names both "
                                     "attentions of every transformer block)")
    g.add_argument("--init-lora", help="start from this LoRA file instead of a zero offset (its rank, alpha and "
                                       "layers are used)")


def _add_objective_arguments(g):
    g.add_argument("--npo", action="store_true",
                   help="train the NPO offset δ (role 'delta'): dpo/sft swap every pair (eq. 8), reward and ddpo "
                        "maximize 1 − R (eq. 7); without it the run trains the preference offset η (role 'eta')")
    g.add_argument("--method", choices=METHODS,
                   help="dpo: Diffusion-DPO; sft: plain denoising loss on the preferred image (for comparison); "
                        "reward: differentiable-reward fine-tuning through the sampler (DRaFT-K / AlignProp); "
                        "ddpo: RL (DDPO-IS with PPO clipping), for rewards with or without a gradient; spo: step-aware preference "
                        "optimization, pairs of candidates ranked by a reward at each sampling step")
    g.add_argument("--beta-dpo", type=float,
                   help="β of L = −log σ(β (d_ref − d_θ)), diffusers' SD1.5 convention (Salesforce's β, and the β "
                        "of the −0.5·β in diffusers' SDXL script, are twice this: the authors' SDXL NPO β 2000 is "
                        "1000 here); 500 is the authors' NPO value for SD1.5")


def _add_reward_arguments(g):
    g.add_argument("--reward",
                   help="module:function of a reward R(images in [0,1], prompts) -> (B,), e.g. rewards:brightness; "
                        "or a learned scorer on your weights: pickscore:PATH, hpsv2:PATH, aesthetic:CLIP_PATH,MLP_PATH, "
                        "clipscore:PATH")
    g.add_argument("--reward-range", help="LOW,HIGH: map an unbounded reward to [0, 1] (affine, clamped), as 1 − R needs")
    g.add_argument("--reward-sigmoid", type=float, help="map an unbounded reward to [0, 1] by σ(R / SCALE) instead")
    g.add_argument("--prompts-file",
                   help="training prompts: a .txt with one per line, or a .jsonl with a \"prompt\" per row")
    g.add_argument("--sample-steps", type=int, help="DDIM steps of each training sample")
    g.add_argument("--grad-steps", type=int,
                   help="reward: K, gradients flow through the last K denoising steps only (DRaFT-K)")
    g.add_argument("--guidance", type=float, help="CFG scale of the training samples")
    g.add_argument("--joint", action="store_true",
                   help="train η (conditional branch) and δ (unconditional branch) at once in the eq. 10 "
                        "sampler, into OUT/eta.safetensors and OUT/delta.safetensors")
    g.add_argument("--train-branch", choices=["both", "uncond"],
                   help="both: the offset runs on both CFG branches, as a fine-tuned model; uncond: train δ "
                        "only where eq. 10 puts it, on the unconditional branch inside CFG, from R (the authors' "
                        "SPO-NPO / VADER-NPO arrangement: δ learns through the (1 − g) of CFG); with --lora ETA")
    g.add_argument("--lora", help="--train-branch uncond: the preference offset η (a LoRA file), frozen, on the "
                                  "conditional branch and at --alpha on the unconditional one")
    g.add_argument("--alpha", type=float,
                   help="--joint, or --train-branch uncond with --lora: weight of η on the unconditional branch")
    g.add_argument("--beta", type=float, help="--joint: weight of δ on the unconditional branch")


def _add_ddpo_arguments(g):
    g.add_argument("--ddim-eta", type=float,
                   help="η_ddim of the training samples: above 0, so that every step has a log-probability")
    g.add_argument("--sample-batches", type=int,
                   help="batches of --batch-size prompts each rank samples per epoch, a multiple of --grad-accum; an "
                        "epoch then makes --inner-epochs passes over them, one optimizer step per --grad-accum batches")
    g.add_argument("--inner-epochs", type=int, help="passes over each epoch's samples")
    g.add_argument("--clip-range", type=float, help="PPO's ε: the ratio p_θ/p_old is clipped to [1 − ε, 1 + ε] "
                                                    "(small because log p is a mean over the latent)")
    g.add_argument("--adv-clip", type=float, help="clip the advantages to ±this")
    g.add_argument("--timestep-fraction", type=float,
                   help="fraction of the sampling steps trained on, a random subset per batch (1: all)")


def _add_spo_arguments(g):
    g.add_argument("--spo-candidates", type=int,
                   help="k, the candidates x_{t−1} drawn from each shared x_t (4 is SPO's SD1.5 setting, 2 its SDXL one)")
    g.add_argument("--spo-threshold", type=float,
                   help="keep (best, worst) when their softmaxed scores differ by more than this, in [0, 1) (0.3 is "
                        "SPO's SD1.5 setting, 0.4 its SDXL one): a pair forms when scale·(s_best − s_worst) > "
                        "2·atanh(threshold)")
    g.add_argument("--spo-score-scale", type=float,
                   help="multiply the scores by this before the softmax (1 is SPO's rule for logit-scale scorers such "
                        "as pickscore:, 100·cos; a reward in [0, 1] needs a hundred or more)")
    g.add_argument("--spo-plain-steps", type=int,
                   help="sampling steps before the first candidates (SPO's divert_start_step)")
    g.add_argument("--spo-beta", type=float, help="β of L = −log σ(β (log r_w − log r_l))")
    g.add_argument("--spo-clip", type=float, help="ε: each ratio p_θ/p_ref is clamped to [1 − ε, 1 + ε]")


def _add_optimizer_arguments(g):
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant after the warmup")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warmup over this many steps")
    g.add_argument("--batch-size", type=int, help="pairs (or prompts) per rank per micro-step; pairs per optimizer "
                                                  "step = batch size × grad accum × ranks")
    g.add_argument("--grad-accum", type=int, help="micro-steps whose gradients add up to one optimizer step")
    g.add_argument("--max-grad-norm", type=float, help="clip the gradient's global norm to this (0: no clipping)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="run the frozen base under autocast in bf16 or fp16; the LoRA master weights, the optimizer "
                        "and the loss stay float32, the VAE encodes in float32; fp16 scales the loss dynamically and "
                        "skips steps whose gradients overflow")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet blocks' activations in the backward pass: less memory, about 30%% more time")
    g.add_argument("--steps", type=int, help="optimizer steps in total, counting those of a resumed run")
    g.add_argument("--seed", type=int,
                   help="seed of everything random: LoRA init, data order, crops, flips, caption dropout, t, ε")
    g.add_argument("--resolution", type=int, help="training image size in pixels, a multiple of 8")


def _add_data_arguments(g):
    g.add_argument("--data", help="preference pairs: a .jsonl file ({prompt, chosen, rejected}), a folder with w/ "
                                  "and l/, or a Pick-a-Pic .parquet file")
    g.add_argument("--random-crop", action="store_true",
                   help="crop at a random position (the same for both images of a pair) instead of the center")
    g.add_argument("--caption-dropout", type=float,
                   help="probability of training a pair with the empty prompt (the unconditional branch of CFG)")
    g.add_argument("--cache-latents", action="store_true",
                   help="VAE-encode each image once per flip and keep the posterior in memory "
                        "(center crops only; costs 2 · 2 · 4 · (R/8)² values per pair)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip pairs whose images are missing or unreadable (counted at the end) instead of stopping")
    g.add_argument("--num-workers", type=int,
                   help="processes decoding images in the background (the batches are the same either way)")
    g.add_argument("--ties", choices=["drop", "keep"],
                   help="Pick-a-Pic ties (label_0 = 0.5): drop them (as Salesforce's Diffusion-DPO) or keep them "
                        "with jpg_0 as the winner (as the NPO authors' runs)")
    g.add_argument("--shuffle-buffer", type=int, help="parquet shards (a folder or glob): shuffle rows within "
                                                      "windows of this many row groups (memory holds one window)")


def _add_bookkeeping_arguments(g):
    g.add_argument("--checkpoint-every", type=int,
                   help="write OUT/checkpoints/step-XXXXXX every N steps (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=int, help="keep the last K checkpoints (0: keep all)")
    g.add_argument("--resume", help="continue a run with the settings it saved (OUT/settings.json): the run folder "
                                    "OUT, one of its checkpoint folders, or 'latest' for the newest checkpoint in "
                                    "--out; a flag given beside it changes that setting, or is refused if it would "
                                    "make another run")
    g.add_argument("--log-every", type=int, help="print and log the metrics averaged over every N steps")
    g.add_argument("--validation-prompts", nargs="+",
                   help="prompts to sample with the current LoRA into OUT/validation/ (one image each)")
    g.add_argument("--validation-every", type=int,
                   help="sample the validation prompts every N steps (0: only at the end)")
    g.add_argument("--validation-steps", type=int, help="DDIM steps of the validation images")


# ----------------------------------------------------------------------------------------------------------
# The checks: what cannot work or would silently do nothing is refused in one sentence, before the model loads.

def _flag(name):
    return "--" + name.replace("_", "-")


def check(config):
    """Refuse what cannot work or would silently do nothing, then fill in the method-specific defaults."""
    if not config.out:
        raise UserError("pass --out, the folder the run writes to (or --resume with a run folder to continue it).")
    for name, methods in METHOD_FLAGS.items():
        if getattr(config, name) not in (None, False) and config.method not in methods:
            raise UserError(f"{_flag(name)} does nothing with --method {config.method} (it is for --method "
                            f"{' or '.join(methods)}); drop it.")
    _check_branches(config)
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, METHOD_DEFAULTS.get(config.method, {}).get(name, value))
    _check_numbers(config)
    if config.cache_latents and config.random_crop:
        raise UserError("--cache-latents needs center crops (every random crop is a new image to encode); "
                        "drop --random-crop or --cache-latents.")
    if config.method in SAMPLING_METHODS:
        if not config.reward or not config.prompts_file:
            raise UserError(f"--method {config.method} needs --reward module:function and --prompts-file; "
                            "e.g. --reward rewards:brightness --prompts-file prompts.txt.")
        if config.method == "reward" and config.grad_steps > config.sample_steps:
            raise UserError(f"--grad-steps {config.grad_steps} exceeds --sample-steps {config.sample_steps}; "
                            "K counts the last of the sampling steps.")
    elif not config.data:
        raise UserError(f"--method {config.method} trains on preference pairs; pass --data pairs.jsonl "
                        "(or a w/+l/ folder, or a .parquet file).")
    if config.method == "ddpo":
        _check_ddpo(config)
    if config.method == "spo":
        _check_spo(config)


def _check_branches(config):
    """Which offsets train on which CFG branch: one offset on both, --joint (η and δ), or δ alone on the
    unconditional branch beside a frozen η (--train-branch uncond --lora ETA)."""
    uncond = config.train_branch == "uncond"
    if config.joint and config.npo:
        raise UserError("--joint trains η and δ from the same reward R; drop --npo.")
    if uncond and (config.joint or config.npo):
        raise UserError(f"--train-branch uncond trains δ from R itself (it learns through the (1 − g) of CFG); "
                        f"drop {'--joint' if config.joint else '--npo'}.")
    if config.lora is not None and not uncond:
        raise UserError("--lora is the frozen η beside a δ trained on the unconditional branch; add "
                        "--train-branch uncond, or drop --lora (--init-lora starts the trained offset from a file).")
    if config.lora is not None and not os.path.isfile(config.lora):
        raise UserError(f"--lora {config.lora} does not exist; pass the η LoRA .safetensors file.")
    if config.alpha is not None and not (config.joint or config.lora is not None):
        raise UserError("--alpha weighs η on the unconditional branch, and this run has no η there; drop it, or add "
                        "--joint, or --train-branch uncond with --lora ETA.")
    if config.beta is not None and not config.joint:
        raise UserError("--beta weighs an offset on the unconditional branch, which only --joint "
                        "trains; drop it or add --joint.")


def _check_ddpo(config):
    for flag, value in (("--clip-range", config.clip_range), ("--adv-clip", config.adv_clip), ("--ddim-eta", config.ddim_eta)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive finite number (got {value}).")
    if not 0 < config.timestep_fraction <= 1:
        raise UserError(f"--timestep-fraction must lie in (0, 1] (got {config.timestep_fraction}); it is the share of "
                        "the sampling steps trained on, 1 for all.")
    if int(config.sample_steps * config.timestep_fraction) < 1:
        raise UserError(f"--timestep-fraction {config.timestep_fraction} of {config.sample_steps} sampling steps trains "
                        "on no step; raise it.")
    if config.sample_batches % config.grad_accum:
        raise UserError(f"--sample-batches {config.sample_batches} is not a multiple of --grad-accum "
                        f"{config.grad_accum}; each optimizer step takes --grad-accum of an epoch's sampled batches.")


def _check_spo(config):
    if config.spo_candidates < 2:
        raise UserError(f"--spo-candidates must be at least 2 (got {config.spo_candidates}); a pair needs two candidates.")
    if not 0 <= config.spo_threshold < 1:
        raise UserError(f"--spo-threshold must lie in [0, 1) (got {config.spo_threshold}); it bounds a difference of two "
                        "softmaxed scores.")
    for flag, value in (("--spo-score-scale", config.spo_score_scale), ("--spo-beta", config.spo_beta),
                        ("--ddim-eta", config.ddim_eta)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive finite number (got {value}).")
    if not 0 < config.spo_clip < 1:
        raise UserError(f"--spo-clip must lie in (0, 1) (got {config.spo_clip}); the ratios are clamped to [1 − ε, 1 + ε].")
    if not 0 <= config.spo_plain_steps < config.sample_steps:
        raise UserError(f"--spo-plain-steps must lie in [0, --sample-steps) (got {config.spo_plain_steps} of "
                        f"{config.sample_steps}); SPO needs at least one step with candidates.")


def _check_numbers(config):
    positive = {"--rank": config.rank, "--batch-size": config.batch_size, "--grad-accum": config.grad_accum,
                "--steps": config.steps, "--log-every": config.log_every, "--validation-steps": config.validation_steps,
                "--sample-steps": config.sample_steps, "--grad-steps": config.grad_steps,
                "--sample-batches": config.sample_batches, "--inner-epochs": config.inner_epochs}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value}).")
    not_negative = {"--warmup-steps": config.warmup_steps, "--max-grad-norm": config.max_grad_norm,
                    "--checkpoint-every": config.checkpoint_every, "--keep-checkpoints": config.keep_checkpoints,
                    "--validation-every": config.validation_every, "--num-workers": config.num_workers}
    for flag, value in not_negative.items():
        if value < 0:
            raise UserError(f"{flag} must not be negative (got {value}).")
    for flag, value in (("--lr", config.lr), ("--beta-dpo", config.beta_dpo)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive finite number (got {value}).")
    if not 0.0 <= config.caption_dropout <= 1.0:
        raise UserError(f"--caption-dropout must be a probability in [0, 1] (got {config.caption_dropout}); pass e.g. 0.1.")
    if config.resolution is not None and (config.resolution < 8 or config.resolution % 8):
        raise UserError(f"--resolution {config.resolution} is not a positive multiple of 8; pass e.g. 512.")


def reward_objective(config, prompts):
    """The objective reward and DDPO training maximize: --reward, bounded by --reward-range / --reward-sigmoid when
    given, negated for NPO (1 − R), and checked at every call. It is probed first (one call on random images): a
    reward that cannot score the training prompts, or (for --method reward, which backpropagates through it) one
    with no gradient, is refused before any model loads. DDPO needs only the scores."""
    r = rewards.load(config.reward)
    if config.reward_range and config.reward_sigmoid is not None:
        raise UserError("pass one of --reward-range and --reward-sigmoid, not both.")
    rewards.check_prompts(r, prompts)
    differentiable = rewards.probe(r, prompts, config.resolution or 64)
    if config.method == "reward" and not differentiable:
        raise UserError(f"--method reward backpropagates through the reward, and {config.reward} is not "
                        "differentiable (its scores do not depend on the pixels through autograd); use a "
                        "differentiable reward, or --method ddpo, which needs only the scores.")
    if config.reward_range:
        try:
            low, high = (float(v) for v in config.reward_range.split(","))
        except ValueError:
            raise UserError(f"--reward-range takes LOW,HIGH such as 0,40, not {config.reward_range!r}.")
        r = rewards.affine(r, low, high)
    elif config.reward_sigmoid is not None:
        r = rewards.sigmoid(r, config.reward_sigmoid)
    objective = rewards.negate(r) if config.npo else rewards.checked(r)
    rewards.probe(objective, prompts, config.resolution or 64)  # for NPO: are the scores in [0, 1]?
    return objective


