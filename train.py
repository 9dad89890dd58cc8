"""Training the offsets: `train(config)` runs one training and writes its LoRA file(s). It is what `npo.py train` calls
(trainconfig.py turns the flags into a TrainConfig), and what code calls:

    import train, trainconfig
    train.train(trainconfig.TrainConfig(out="runs/npo", data="pairs.jsonl", npo=True))   # δ by Diffusion-DPO (eq. 8)

    python npo.py train --data pairs.jsonl --out runs/dpo            # η, the preference offset
    python npo.py train --data pairs.jsonl --out runs/npo --npo      # δ, the NPO offset (paper eq. 8)
    python npo.py train --method reward --reward shapes:reward --prompts-file p.txt --out runs/r --npo   # eq. 7
    python npo.py train --method ddpo --reward rewards:jpeg_incompressibility --prompts-file p.txt --out runs/rl
    python npo.py train --method reward ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg only
    torchrun --nproc_per_node 8 npo.py train ...                     # data-parallel, same flags
    python npo.py train ... --resume latest                          # continue an interrupted run

Each method is one module with the same three functions (METHODS below); everything else is shared:
    method_dpo.py     --method dpo, sft: Diffusion-DPO on preference pairs, each pair swapped for NPO's δ
    method_reward.py  --method reward: differentiable-reward fine-tuning through the sampler (DRaFT-K), R or 1 − R
    method_ddpo.py    --method ddpo: RL (DDPO with PPO's clipping), R or 1 − R
    method_spo.py     --method spo: step-aware preference optimization, pairs as ranked or swapped
A method's `read_inputs(config, world_size)` reads and checks its inputs (the pairs, or the prompts and the reward)
before the model loads; `micro_step(run, inputs)` returns the function that does the forward and backward of one
micro-batch and returns its metrics; `describe(config, inputs)` says what it trains on. This file holds the loop
they share: gradient accumulation, the all-reduce over ranks, clipping, the update, logging, checkpoints,
validation, the result files. machinery.py holds the run's parts (resume, DDP, mixed precision, the log). Adding a
method (SPO next) is adding its module and its line in METHODS (and its flags in trainconfig.py).

Every random number of training example i (its t, its ε, its posterior noises; for the sampling methods its prompt
and sampling noises) comes from a generator seeded by (seed, i) (`machinery.example_generator`), and data.batches
makes the images and caption of example i a function of (seed, i) too. So the whole state of a run is its step, its
LoRA and its optimizer (for DDPO also the LoRA that sampled the current epoch and the stat tracker's buffers): a
checkpoint of those resumes bit for bit, and 2 ranks with batch B compute what 1 rank computes with batch 2B.

Files in --out: `lora.safetensors` (the result, kohya format; `eta.safetensors` + `delta.safetensors` with
--joint), `settings.json` (the settings as given, so that `--resume OUT` alone continues the run), `log.jsonl` (one
line per logged step) and `log.png` (its plot, redrawn at every checkpoint),
`checkpoints/step-XXXXXX/` (`lora.safetensors` + `state.pt`, written atomically, the last K kept), and
`validation/step-XXXXXX-K.png` when --validation-prompts is given.
"""
import math
import os

import torch

from . import distributed
from . import machinery
from . import method_ddpo
from . import method_dpo
from . import method_reward
from . import method_spo
from . import pipeline
from . import runs
from . import trainconfig
from .checkpoint import UserError
from .trainconfig import DTYPES

METHODS = {"dpo": method_dpo, "sft": method_dpo, "reward": method_reward, "ddpo": method_ddpo, "spo": method_spo}


def train(config):
    """Train the offset(s) of `config` (a trainconfig.TrainConfig) and write OUT/lora.safetensors (or
    eta/delta.safetensors with --joint); returns the path (a list of two with --joint). After Ctrl-C or SIGTERM the
    run finishes its step, saves a checkpoint and raises SystemExit(130). Bad input raises UserError, before the
    model loads and before anything is written."""
    given = trainconfig.settings_to_save(config)  # before `check` fills in the defaults
    sdxl_defaults = trainconfig.check(config)
    method = METHODS[config.method]
    out = os.path.abspath(config.out)
    rank, world_size, local_rank = distributed.world()
    if sdxl_defaults and rank == 0:
        print(f"an SDXL model: --method {config.method}'s SDXL defaults for the flags not given: "
              + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in sdxl_defaults.items()))
    inputs = method.read_inputs(config, world_size)
    state, resume_from = machinery.find_start(config, out, say=print if rank == 0 else lambda m: None)
    device = pipeline.resolve_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = runs.record(out) if rank == 0 else None
    created = runs.prepare_output(out) if rank == 0 else False
    device = machinery.init_distributed(device, world_size, local_rank)
    try:
        pipe = pipeline.load_pipeline(os.path.abspath(config.model or pipeline.DEFAULT_MODEL), DTYPES[config.dtype],
                                      device, **pipeline.source_options(config))
        if pipe.is_video and config.method != "reward":  # the other methods sample and train on images
            raise UserError(f"--method {config.method} trains image models, and {config.model} is a video model; "
                            "train it with --method reward (VADER), or pass an image model.")
        run = machinery.Run(config, pipe, out, rank, world_size, device, given=given)
        machinery.setup(run, state, resume_from)
        result = loop(run, method, inputs)
        machinery.barrier(run)  # no rank tears the group down while another is still in a collective
        return result
    except BaseException:  # bad input met on the way (a bad row), an error, a second Ctrl-C
        if rank == 0:
            runs.roll_back(out, created, before)  # nothing of a run that failed before its first checkpoint is left
        raise
    finally:
        machinery.end_distributed(world_size)


def loop(run, method, inputs):
    """Optimizer steps until --steps, with logging, checkpoints and validation; then the result files."""
    config = run.config
    micro_step = method.micro_step(run, inputs)
    run.stream_state = getattr(micro_step, "stream_state", lambda: None)
    run.say(f"training {'+'.join(run.files)} ({config.method}{', NPO' if config.npo else ''}) on "
            f"{method.describe(config, inputs)}: {sum(p.numel() for p in run.params) / 1e6:.2f}M LoRA parameters on "
            f"{len(run.settings['layers'])} layers, {run.settings['global_batch']} examples per step on "
            f"{run.world_size} rank(s), {run.device}, {config.dtype}")
    log = machinery.Log(run, method.SHOWN)
    stop = machinery.StopRequest()
    try:
        while run.step < config.steps:
            metrics, stopping = machinery.combined_metrics(run, accumulate(run, micro_step), stop.requested)
            lr, grad_norm = update(run, metrics)
            log.add(dict(metrics, grad_norm=grad_norm), lr, force=stopping)
            after_step(run, log, stopping)
    finally:
        stop.restore()
        log.close()
        getattr(micro_step, "close", lambda: None)()  # stops the data loader's worker processes
    return finish(run, getattr(micro_step, "summary", lambda: None)())


def accumulate(run, micro_step):
    """Forward and backward over --grad-accum micro-batches (the gradients add up in p.grad); their mean metrics."""
    config, totals = run.config, None
    for micro in range(config.grad_accum):
        first = ((run.step * config.grad_accum + micro) * run.world_size + run.rank) * config.batch_size  # example
        metrics = micro_step(first, 1 / config.grad_accum)
        values = torch.tensor([metrics[k] for k in sorted(metrics)])
        totals = values if totals is None else totals + values
    return dict(zip(sorted(metrics), (totals / config.grad_accum).tolist()))


def update(run, metrics):
    """Clip, check, and apply the gradient: constant lr after a linear warmup (nanoGPT's ramp: never 0 at step 0).
    A non-finite loss or gradient stops the run before it is applied (with fp16, an overflowing gradient skips the
    step instead: `metrics["skipped"]`). Returns (lr, gradient norm)."""
    config = run.config
    grad_norm = run.amp.unscaled_norm(run.optimizer, run.params, config.max_grad_norm)
    metrics["skipped"] = float(run.amp.scaler is not None and not math.isfinite(grad_norm))
    if not (math.isfinite(metrics["loss"]) and (math.isfinite(grad_norm) or metrics["skipped"])):
        newest = runs.last_saved_path(run.ckpt_dir)
        kept = f"the last good checkpoint is {newest}" if newest else "there is no checkpoint yet"
        raise UserError(f"the loss became {metrics['loss']} (gradient norm {grad_norm}) at step {run.step + 1}, "
                        f"so the run stopped without applying it and {kept}; lower --lr (or --beta-dpo) and "
                        "continue with --resume latest.")
    lr = config.lr * min(1.0, (run.step + 1) / (config.warmup_steps + 1))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.amp.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr, grad_norm


def after_step(run, log, stopping):
    """Checkpoint (every --checkpoint-every steps, at the end, and when stopping), then validation images."""
    config, step = run.config, run.step
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or stopping or step == config.steps:
        machinery.save(run)
        log.plot()
    if stopping:
        run.say(f"interrupted: saved {runs.checkpoint_path(run.ckpt_dir, step)}; continue with --resume latest")
        raise SystemExit(130)
    if run.master and config.validation_prompts and (
            step == config.steps or (config.validation_every and step % config.validation_every == 0)):
        log.event("validation", images=machinery.validate(run.pipe, config, run.out, step))


def finish(run, summary=None):
    """The result files (rank 0), after a last checkpoint if the final step has none yet. `summary`: the method's
    word on its inputs (rows skipped or dropped), said before the result."""
    if run.last_saved != run.step:
        machinery.save(run)
    if run.master:
        paths = runs.save_results(run.out, run.pipe.unet, run.files, run.settings, run.step)
        if summary:
            run.say(summary)
        run.say(f"wrote {', '.join(paths)} ({run.step} steps)")
    paths = [os.path.join(run.out, name) for name in run.files.values()]
    machinery.barrier(run)
    return paths[0] if len(paths) == 1 else paths
