"""The machinery of a training run, shared by every method: the run's state (`Run`), starting or resuming it
(`find_start`, `setup`), data parallelism (torchrun: one gradient all-reduce per step, `combined_metrics`), mixed
precision (`Amp`), the log (`Log`), Ctrl-C (`StopRequest`), checkpoints (`save`; the files are runs.py's), validation
images, and the seeded generators that make every example's random numbers a function of (seed, example).
train.py's loop drives these; the method modules (method_*.py) use the generators and helpers at the end.
"""
import contextlib
import dataclasses
import hashlib
import json
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

from . import guided
from . import images
from . import logplot
from . import lora
from . import pipeline
from . import runs
from . import sampler
from .checkpoint import UserError
from .trainconfig import TrainConfig

# data.py's epoch generators use the spawn keys (epoch,); ours are (NOISE_STREAM, example), a separate stream
NOISE_STREAM = 0x6E6F697365


@dataclass
class Run:
    """What the loop of one training run works with."""
    config: TrainConfig
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
    amp: object = None  # the Amp of --mixed-precision (made from the config when not given)
    # what a method carries from step to step beyond the LoRA and the optimizer, saved with them (DDPO: the
    # policy that sampled the current epoch and the stat tracker's buffers, `method_ddpo.sample_epoch`); None for the others
    method_state: dict = None
    given: dict = None  # the settings as given, which OUT/settings.json keeps (trainconfig.settings_to_save)

    def __post_init__(self):
        if self.amp is None:
            self.amp = Amp(self.config.mixed_precision, self.device)

    @property
    def master(self):
        return self.rank == 0  # only rank 0 writes files and prints

    @property
    def ckpt_dir(self):
        return os.path.join(self.out, "checkpoints")

    def say(self, message):
        if self.master:
            print(message, file=sys.stderr, flush=True)


def find_start(config, out, say):
    """(checkpoint state, its folder) to resume from, or (None, None) for a fresh run; refuses to start a fresh
    run over an earlier one."""
    ckpt_dir = os.path.join(out, "checkpoints")
    resume_from = runs.find_resume(config.resume, ckpt_dir)
    if config.resume == "latest" and resume_from is None:
        say(f"no checkpoint in {ckpt_dir} yet: starting from step 0")
    results = [os.path.join(out, name) for name in result_files(config).values()]
    if resume_from is None and (runs.list_checkpoints(ckpt_dir) or any(map(os.path.exists, results))):
        raise UserError(f"{out} already holds a training run; continue it with --resume latest, "
                        "or pass --out a new folder.")
    return (runs.read_checkpoint(resume_from), resume_from) if resume_from else (None, None)


def result_files(config):
    """The offsets a run trains and the file each ends in: η or δ in lora.safetensors; both with --joint. δ trained
    on the unconditional branch (--train-branch uncond) is δ, from R itself."""
    if config.joint:
        return {"eta": "eta.safetensors", "delta": "delta.safetensors"}
    return {"delta" if config.npo or config.train_branch == "uncond" else "eta": "lora.safetensors"}


def setup(run, state, resume_from):
    """Attach the fp32 LoRA offsets to the frozen base, make the optimizer, and restore a checkpoint's state."""
    config, unet = run.config, run.pipe.unet
    if config.resolution is None:  # the model's own image size
        config.resolution = run.pipe.image_size
    fingerprint = model_fingerprint(unet)  # of the base weights, before any offset is attached
    run.files = result_files(config)
    torch.manual_seed(config.seed)  # lora_down's kaiming init draws from the global generator: the same on every rank
    for role in run.files:
        if config.init_lora:
            lora.load_lora(unet, config.init_lora, role)
            run.params += [p.requires_grad_(True) for p in lora.parameters(unet, role)]
        else:
            run.params += lora.add_offset(unet, role, config.rank, config.lora_alpha, config.targets)
    if config.lora:  # the frozen η beside δ (--train-branch uncond): loaded, never trained or saved
        lora.load_lora(unet, config.lora, "eta")
    run.settings = run_settings(run, fingerprint)
    # AdamW(0.9, 0.999, wd 1e-2) as the Diffusion-DPO and NPO recipes (wd 1e-4 as ddpo-pytorch's for DDPO); the lr
    # is set by hand every step
    decay = 1e-4 if config.method in ("ddpo", "spo") else 1e-2  # SPO's adam_weight_decay too
    run.optimizer = torch.optim.AdamW(run.params, lr=config.lr, betas=(0.9, 0.999), weight_decay=decay)
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
    config = run.config
    found = {f"{role}:{name}": o for role in run.files for name, o in lora.offsets(run.pipe.unet, role).items()}
    return dict(
        model=os.path.abspath(config.model or pipeline.DEFAULT_MODEL), model_fingerprint=fingerprint,
        role="+".join(run.files), method=config.method,
        rank=Counter(o.rank for o in found.values()).most_common(1)[0][0],
        lora_alpha=Counter(float(o.alpha) for o in found.values()).most_common(1)[0][0],
        layers=sorted(found), beta_dpo=config.beta_dpo, lr=config.lr, warmup_steps=config.warmup_steps,
        global_batch=config.batch_size * config.grad_accum * run.world_size,  # pairs (or prompts) per optimizer step
        seed=config.seed, resolution=config.resolution, random_crop=config.random_crop,
        caption_dropout=config.caption_dropout, max_grad_norm=config.max_grad_norm, dtype=config.dtype,
        data=os.path.abspath(config.data) if config.data else None, reward=config.reward, grad_steps=config.grad_steps,
        sample_steps=config.sample_steps, guidance=config.guidance, train_branch=config.train_branch,
        lora=os.path.abspath(config.lora) if config.lora else None, alpha=config.alpha, beta=config.beta,
        ddim_eta=config.ddim_eta, sample_batches=config.sample_batches, inner_epochs=config.inner_epochs,
        clip_range=config.clip_range, adv_clip=config.adv_clip, timestep_fraction=config.timestep_fraction,
        init_lora=os.path.abspath(config.init_lora) if config.init_lora else None,
        # table 7's options; None when off, as in checkpoints older than them (so resuming those warns of nothing)
        perturb_prompts=config.perturb_prompts or None, corrupt=config.corrupt,
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name.startswith("spo_")})


def model_fingerprint(unet):
    """A short hash of the base UNet: every key and shape, and every 4099th weight rounded to bfloat16 (so a
    float32 and a bfloat16 load of one model agree, and a fine-tune or merge of the same architecture differs)."""
    h = hashlib.sha256()
    for name, t in unet.state_dict().items():
        h.update(f"{name}{tuple(t.shape)};".encode())
        h.update(t.detach().flatten()[::4099].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun): every rank runs the same loop on its own examples; rank 0 writes the files.

def init_distributed(device, world_size, local_rank):
    """Join the process group of a run of several ranks (NCCL on CUDA, rank r on cuda:LOCAL_RANK; else gloo);
    returns this rank's device."""
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def end_distributed(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(run):
    if run.world_size > 1:
        dist.barrier()


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


def gather(run, x):
    """`x` of every rank, stacked in rank order (W, ...): one all_gather (x itself on one rank)."""
    if run.world_size == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(run.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


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
        if run.given is not None:
            runs.save_settings(run.out, run.given)
        scaler = run.amp.scaler.state_dict() if run.amp.scaler else None
        runs.save_checkpoint(run.ckpt_dir, run.step, run.pipe.unet, run.files, run.optimizer, run.settings,
                             run.config.keep_checkpoints, streams, scaler, run.method_state)
    run.last_saved = run.step
    if run.world_size > 1:
        dist.barrier()  # no rank exits (and makes torchrun kill rank 0) while the checkpoint is written


# ----------------------------------------------------------------------------------------------------------
# Mixed precision, the log, Ctrl-C and validation.

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

    def __init__(self, run, shown):
        self.run, self.shown, self.window, self.start = run, shown, [], time.perf_counter()
        self.file = open(os.path.join(run.out, "log.jsonl"), "a", encoding="utf-8") if run.master else None
        if run.resumed_from:
            self.event("resume", **{"from": run.resumed_from})

    def add(self, metrics, lr, force=False):
        run, config = self.run, self.run.config
        self.window.append(metrics)
        if not (run.step % config.log_every == 0 or run.step == config.steps or force):
            return
        it_s = len(self.window) / (time.perf_counter() - self.start)
        line = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
        line.update(lr=lr, it_per_s=it_s, eta_s=(config.steps - run.step) / it_s, time=time.time())
        shown = self.shown + ("skipped",) * bool(line.get("skipped"))  # fp16 steps whose gradients overflowed
        run.say(f"step {run.step}/{config.steps} | loss {line['loss']:.4f} | "
                + "".join(f"{k} {line[k]:.4g} | " for k in shown)
                + f"lr {lr:.2e} | grad {line['grad_norm']:.3g} | {it_s:.2f} it/s | ETA {format_seconds(line['eta_s'])}")
        self.write({"step": run.step, **line})
        self.window, self.start = [], time.perf_counter()

    def plot(self):
        """OUT/log.png: the loss and the metrics printed beside it, over the steps (logplot.py)."""
        if self.file:
            logplot.write(self.run.out, ("loss",) + self.shown)

    def event(self, name, **fields):
        self.write({"event": name, "step": self.run.step, **fields})

    def write(self, entry):
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


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


@torch.no_grad()
def validate(pipe, config, out, step):
    """Sample the validation prompts with the LoRA as it stands, as `npo.py sample` would use this file: η on
    both CFG branches (α = 1); δ on the negative branch only (base + NPO, β = 1). Fixed seeds, so the images of
    successive steps compare. Returns the PNGs' paths relative to OUT."""
    folder = os.path.join(out, "validation")
    os.makedirs(folder, exist_ok=True)
    prompts = config.validation_prompts
    pictures = guided.generate(pipe, prompts, [config.seed + k for k in range(len(prompts))],
                                 steps=config.validation_steps, height=config.resolution, width=config.resolution)
    paths = []
    for k, picture in enumerate(images.to_pil(pictures)):
        paths.append(os.path.join(folder, f"step-{step:06d}-{k}.png"))
        images.save_png(picture, paths[-1])
    return [os.path.relpath(p, out) for p in paths]


# ----------------------------------------------------------------------------------------------------------
# What the methods share: the seeded generators of each example, CFG's branch weights, gradient checkpointing, the
# DDIM steps of RL.

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


def branch_weights(config, files, batch, device):
    """The LoRA multipliers of the [unconditional; conditional] rows of the training sampler's CFG:
    one offset: θ + offset on both branches, as the fine-tuned model samples;
    --joint: eq. 10, η at [α, 1] and δ at [β, 0] (guided.npo_multipliers), both trained;
    --train-branch uncond: eq. 10 with η frozen at [α, 1] and δ at [1, 0], so δ is trained only where it runs, on
    the unconditional branch, and its gradient reaches it only through the (1 − g) of ε_neg + g·(ε_pos − ε_neg)."""
    if config.joint:
        return guided.npo_multipliers(batch, config.alpha, config.beta, device)
    if config.train_branch == "uncond":
        return guided.npo_multipliers(batch, config.alpha, 1.0, device)
    return {role: 1.0 for role in files}


def logprob_steps(schedule, n):
    """(DDIM config, its n steps (t, ᾱ_t, ᾱ_prev)) as DDPO and SPO sample and score them: the steps of the model's
    DDIM config `schedule` (pipe.ddim_config()), except that the last one goes to ᾱ_prev = ᾱ_0 even where the config
    says set_alpha_to_one (or, as an Euler config that diffusers saved for an SDXL folder, does not say, leaving
    DDIMScheduler's default, true). ᾱ_prev = 1 would give σ_t = 0: a deterministic step, with no log-probability.
    ᾱ_0 is the reference code's rule: ddpo-pytorch's and SPO's ddim_step_with_logprob clamp the previous timestep
    t − T/n at 0, so their last step always reads ᾱ_0 (the final ᾱ is never used). With set_alpha_to_one false (SD's
    configs, SDXL base's) nothing changes; otherwise only the last step does: x_0 is drawn with a small σ_t (0.021
    from t = 1 on SD's schedule) around √ᾱ_0 x̂_0 + …, where DDIM would land on x̂_0 itself."""
    schedule = dataclasses.replace(schedule, set_alpha_to_one=False)
    return schedule, sampler.ddim_steps(schedule, n)


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
