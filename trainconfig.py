"""What a training run is told: `TrainConfig`, the one way code calls training (`train.train(config)`), the flags
of `npo.py train` that fill it, and the checks that refuse what cannot work before any model loads.

    config = TrainConfig(out="runs/npo", data="pairs.jsonl", npo=True, steps=500)    # from code
    config = parse_args(["--out", "runs/npo", "--data", "pairs.jsonl", "--npo"])     # from flags: the same config

A field left at None is "not given": a method that does not read it refuses it (a flag given to another method would
silently do nothing), and `check` fills in the method's default: DEFAULTS, under METHOD_DEFAULTS (DDPO keeps
ddpo-pytorch's, SPO its SD1.5 config's), under MODEL_DEFAULTS where the model is SDXL (SPO's SDXL config). The flags
carry no defaults of their own (argparse.SUPPRESS): a flag not given leaves the field's.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from . import data
from . import lora
from . import pipeline
from . import rewards
from . import runs
from . import singlefile
from .checkpoint import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("dpo", "sft", "reward", "ddpo", "spo")  # train.METHODS maps each to its module

# Flags that only some methods read. Given to another method, a flag would silently do nothing, so `check` refuses
# it. A flag's default is DEFAULTS' unless METHOD_DEFAULTS gives its method another.
PAIR_METHODS, SAMPLING_METHODS = ("dpo", "sft"), ("reward", "ddpo", "spo")
METHOD_FLAGS = {
    "data": PAIR_METHODS, "beta_dpo": ("dpo",), "cache_latents": PAIR_METHODS, "random_crop": PAIR_METHODS,
    "caption_dropout": PAIR_METHODS, "skip_bad_rows": PAIR_METHODS, "num_workers": PAIR_METHODS,
    "ties": PAIR_METHODS, "shuffle_buffer": PAIR_METHODS, "perturb_prompts": PAIR_METHODS, "corrupt": PAIR_METHODS,
    "reward": SAMPLING_METHODS, "reward_range": SAMPLING_METHODS, "reward_sigmoid": SAMPLING_METHODS,
    "prompts_file": SAMPLING_METHODS, "sample_steps": SAMPLING_METHODS, "guidance": SAMPLING_METHODS,
    "joint": ("reward", "ddpo"), "train_branch": SAMPLING_METHODS, "lora": SAMPLING_METHODS, "grad_steps": ("reward",),
    "ddim_eta": ("ddpo", "spo"), "sample_batches": ("ddpo",), "inner_epochs": ("ddpo",), "clip_range": ("ddpo",),
    "adv_clip": ("ddpo",), "timestep_fraction": ("ddpo",),
    **{name: ("spo",) for name in ("spo_candidates", "spo_threshold", "spo_score_scale", "spo_plain_steps",
                                   "spo_inner_steps", "spo_beta", "spo_clip")},
}
DEFAULTS = {"lr": 5e-6, "beta_dpo": 500.0, "caption_dropout": 0.0, "num_workers": 0, "ties": "drop", "shuffle_buffer": 2,
            "sample_steps": 20, "grad_steps": 1, "guidance": 7.5, "alpha": 1.0, "beta": 1.0, "train_branch": "both",
            "ddim_eta": 1.0, "sample_batches": 2, "inner_epochs": 1, "clip_range": 1e-4, "adv_clip": 5.0,
            "timestep_fraction": 1.0, "rank": 8, "spo_candidates": 4, "spo_threshold": 0.3, "spo_score_scale": 1.0,
            "spo_plain_steps": 4, "spo_inner_steps": 0, "spo_beta": 10.0, "spo_clip": 0.1}
METHOD_DEFAULTS = {"ddpo": {"lr": 3e-4, "sample_steps": 50, "guidance": 5.0},  # ddpo-pytorch's config/base.py
                   "spo": {"lr": 6e-5, "guidance": 5.0, "rank": 4}}  # SPO's SD1.5 config
# Over METHOD_DEFAULTS where --model is SDXL: RockeyCoss/SPO's configs/spo_sdxl_4k-prompts_num-sam-2_3-is_…py, which
# changes its basic_config.py's rank, lr, threshold and num_inner_step and keeps its 2 candidates (SD1.5's sets 4)
MODEL_DEFAULTS = {("spo", "sdxl"): {"rank": 64, "lr": 1e-5, "spo_inner_steps": 3, "spo_threshold": 0.4,
                                    "spo_candidates": 2}}


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
    spo_inner_steps: int = None
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
    # the appendix's table 7: NPO on corrupted data (dpo, sft)
    perturb_prompts: bool = False
    corrupt: str = None
    # checkpoints, logs and validation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = None
    log_every: int = 10
    validation_prompts: list = None
    validation_every: int = 0
    validation_steps: int = 25


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


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
# The checks: what cannot work or would silently do nothing is refused in one sentence, before the model loads.

def _flag(name):
    return "--" + name.replace("_", "-")


def check(config):
    """Refuse what cannot work or would silently do nothing, then fill in the method- and model-specific defaults.
    Returns {field: value} of the model-specific ones it filled in (SDXL's), for the run to say."""
    if not config.out:
        raise UserError("pass --out, the folder the run writes to (or --resume with a run folder to continue it).")
    for name, methods in METHOD_FLAGS.items():
        if getattr(config, name) not in (None, False) and config.method not in methods:
            raise UserError(f"{_flag(name)} does nothing with --method {config.method} (it is for --method "
                            f"{' or '.join(methods)}); drop it.")
    _check_branches(config)
    method_defaults, model_defaults = METHOD_DEFAULTS.get(config.method, {}), {}
    if (config.method, "sdxl") in MODEL_DEFAULTS and is_sdxl_model(config.model):
        model_defaults = MODEL_DEFAULTS[config.method, "sdxl"]
    taken = {name: value for name, value in model_defaults.items() if getattr(config, name) is None}
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, model_defaults.get(name, method_defaults.get(name, value)))
    _check_numbers(config)
    _check_corruption(config)
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
    return taken


def is_sdxl_model(path):
    """Whether --model is SDXL, read before it loads: a folder by pipeline.is_sdxl_folder, a single file by its keys
    (an SDXL UNet has the "text_time" embedding, label_emb). None is the embedded model, SD1-shaped; a path that is
    not there says so when it loads."""
    if path is None or not os.path.exists(path):
        return False
    if os.path.isdir(path):
        return pipeline.is_sdxl_folder(path)
    keys = []
    singlefile.read_tensors(path, lambda names: keys.extend(names) or [])  # the names only: no tensor is read
    return any(k.startswith(singlefile.UNET + "label_emb.") for k in keys)


def _check_corruption(config):
    """Table 7's options (appendix II.3): each must do something, and --corrupt must name a corruption we have."""
    if config.perturb_prompts and config.batch_size < 2:
        raise UserError("--perturb-prompts shuffles the captions within each rank's batch, and a batch of one pair "
                        "has nothing to shuffle; pass --batch-size 2 or more.")
    if config.corrupt is not None:
        data.parse_corruption(config.corrupt)
        if not config.npo:
            raise UserError("--corrupt degrades the images δ learns toward (the losers, which NPO's swap makes "
                            "preferred; the paper's table 7 corrupts only NPO's data); add --npo.")


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
    if config.spo_inner_steps < 0:
        raise UserError(f"--spo-inner-steps must not be negative (got {config.spo_inner_steps}); 0 trains each pair on "
                        "its branch step alone (SPO's SD1.5 setting), 3 on that and the next 3 (its SDXL one).")
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


