"""npo: Diffusion-NPO (negative preference optimization) on a hand-written Stable Diffusion.

    python npo.py sample --prompt "a red circle" --lora dpo.safetensors --npo npo.safetensors
    python npo.py train --data pairs.jsonl --out runs/npo --npo          # train δ (Diffusion-DPO, pairs swapped)
    python npo.py evaluate out/base out/npo --scorer pickscore:PickScore_v1 --out report   # tables 1-3, fig. 7
    python npo.py experiment --out results  # the paper's experiment in miniature, on the embedded model
    python npo.py reproduce recipes/table1-sd15.json --weights DIR --out repro   # one command per table (1, 2; fig. 7)
    python npo.py info --model PATH        # what a model folder or single file holds, loaded strictly
    python npo.py extract-lora --base SD15 --tuned ft.safetensors --rank 64 --out eta.safetensors   # η as a LoRA

This file is the command line only: one argparse with subcommands, each a thin shell over functions the tests call
directly (pipeline.py: loading and eq. 10; train.py: training; evaluate.py: scoring samples; experiment.py: the
experiment).
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch

import checkpoint
import data
import distributed
import evaluate
import experiment
import extract
import guided
import guiders
import images
import lora
import pipeline
import prompt_syntax
import reproduce
import sampler
import train
import trainconfig
from checkpoint import UserError, finite_float
from pipeline import DEFAULT_MODEL

# ----------------------------------------------------------------------------------------------------------
# The command line.

def cmd_info(args):
    pipe = pipeline.load_pipeline(args.model, variant=args.variant, **pipeline.source_options(args))
    print(pipe.origin)
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if pipe.is_sdxl else ()):
        print(f"{name:15s} {pipeline.count_parameters(getattr(pipe, name)) / 1e6:8.1f}M parameters")
    print(f"scheduler       {pipe.scheduler_config or 'SD defaults'}")


def warn(message):
    if distributed.world()[0] == 0:  # once, not once per torchrun rank
        print(f"warning: {message}", file=sys.stderr)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


def check_writable(out, pictures):
    """Fail before any compute if the output cannot be written: a .png path for one picture, else a folder. Nothing
    is created here: `output_folder` makes the folder when the first picture is written, so a failed run leaves
    none behind."""
    if not out.strip():
        raise UserError("--out is empty; pass a folder, e.g. --out out/.")
    if out.lower().endswith(IMAGE_SUFFIXES):
        raise UserError(f"--out {out} looks like an image file, but --out is a folder (or a .png file name for one "
                        "picture); pass e.g. --out out/.")
    if out.lower().endswith(".png"):
        if pictures != 1:
            raise UserError(f"--out {out} is one file but this run makes {pictures} pictures; pass a folder instead.")
        if os.path.isdir(out):
            raise UserError(f"--out {out} is a folder, not a .png file; pass a folder name without .png.")
        folder = os.path.dirname(os.path.abspath(out))
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"--out {out} is an existing file, but --out is a folder (or a .png file name for one "
                            "picture); pass a folder.")
        folder = out
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder will be made inside its nearest existing parent
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"the output folder {folder} cannot be made or written ({existing} is not a writable "
                        "folder); pick a writable --out.")


def output_folder(out):
    """The folder the pictures go to, made now (when the first is written); `out` is a folder or a .png path."""
    folder = os.path.dirname(os.path.abspath(out)) if out.lower().endswith(".png") else out
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder} ({e.strerror}); pick a writable --out.")
    return folder


def next_number(folder, prefix=""):
    """1 + the highest N of the files `prefix`N-... or `prefix`N.png in `folder` (0 if none): a new run numbers on
    after the last picture, as A1111 does, so it never overwrites an earlier run's."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)[-.]")
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    return max(numbers, default=-1) + 1


def parse_floats(text, flag):
    """A comma list of finite numbers (--sweep-alpha 0,0.5,1)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} takes comma-separated finite numbers such as 0,0.5,1, not {text!r}.")
    return values


class Progress:
    """Step i/N, images done, elapsed time and ETA, on stderr."""

    def __init__(self, total_images, show=True):
        self.total, self.done, self.start, self.show = total_images, 0, time.time(), show
        self.tty = sys.stderr.isatty()

    def step(self, i, n, batch):
        if not self.show:  # a torchrun rank other than 0
            return
        if not self.tty and (i + 1) % max(1, n // 5) and i + 1 != n:
            return  # logs get a few lines per batch, a terminal every step
        elapsed = time.time() - self.start
        fraction = (self.done + batch * (i + 1) / n) / self.total
        eta = elapsed / fraction - elapsed if fraction > 0 else 0
        end = "\r" if self.tty else "\n"
        print(f"step {i + 1}/{n}, images {self.done}/{self.total} done, {elapsed:.1f}s elapsed, ETA {eta:.1f}s",
              end=end, file=sys.stderr, flush=True)

    def images_done(self, k):
        self.done += k


def a1111_hashes(args):
    """A1111's `Model hash` and `Lora hashes`, by which civitai recognises the files a picture was made with:

        Model hash:  the first 10 hex digits of the SHA-256 of the model file (civitai's "AutoV2"); none for a
                     diffusers folder, which is not one file and which civitai does not list
        Lora hashes: "name: hash, ..." for each LoRA (η's and δ's), hash the first 12 hex digits of the SHA-256 of
                     the safetensors tensor data, after the header (kohya's "addnet" hash, civitai's "AutoV3"; of the
                     whole file for another format), name the file's stem without ':' and ',' (as A1111 writes it)

    Each file is read once per run, here (a checkpoint takes seconds), never once per image."""
    hashes = {}
    if os.path.isfile(args.model):
        hashes["Model hash"] = checkpoint.sha256_file(args.model)[:10]
    if args.npo_model and os.path.isfile(args.npo_model):  # the same hash, for a single-file NPO model
        hashes["NPO model hash"] = checkpoint.sha256_file(args.npo_model)[:10]
    loras = dict.fromkeys([path for path, _ in args.lora] + ([args.npo] if args.npo else []))
    if loras:
        names = [os.path.splitext(os.path.basename(p))[0].replace(":", "").replace(",", "") for p in loras]
        short = [checkpoint.sha256_file(p, tensor_data_only=p.lower().endswith(".safetensors"))[:12] for p in loras]
        hashes["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in zip(names, short))
    return hashes


def a1111_quote(value):
    """A setting's value as A1111 writes it: as is, or JSON-quoted when it holds ',', ':' or a newline, which would
    otherwise end the value (or the settings line) for A1111's and civitai's parsers."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(args, job, size):
    """A1111's PNG `parameters` text: the prompt, the negative prompt, then `Key: value` settings (the hashes of
    `a1111_hashes`, which `load_for_sampling` puts in args.hashes)."""
    hashes = args.hashes
    settings = {"Steps": args.steps, "Sampler": sampler.SAMPLERS[args.sampler], "CFG scale": args.guidance,
                "Seed": job["seed"], "Size": f"{size[0]}x{size[1]}"}
    if "Model hash" in hashes:  # before the name, in A1111's order
        settings["Model hash"] = hashes["Model hash"]
    settings["Model"] = os.path.basename(os.path.normpath(args.model))
    if args.sampler == "ddim":
        settings["DDIM eta"] = args.ddim_eta
    if args.clip_skip > 1:
        settings["Clip skip"] = args.clip_skip
    if job.get("chunks") and job["chunks"][0] != job["chunks"][1]:
        settings["Pad conds"] = True  # A1111's key for padding the shorter text with empty chunks, as we did
    if args.lora:
        settings["Lora"] = "; ".join(f"{lora_label(path)}:{w:g}" for path, w in args.lora)
    if args.eta_model:
        settings["NPO eta model"] = os.path.basename(os.path.normpath(args.eta_model))
    if args.npo:
        settings["NPO"] = lora_label(args.npo)
    if args.npo_model:
        if "NPO model hash" in hashes:
            settings["NPO model hash"] = hashes["NPO model hash"]
        settings["NPO model"] = os.path.basename(os.path.normpath(args.npo_model))
    if args.lora or args.npo or args.eta_model or args.npo_model:
        settings.update({"NPO alpha": job["alpha"], "NPO beta": job["beta"]})
    if "Lora hashes" in hashes:
        settings["Lora hashes"] = hashes["Lora hashes"]
    dense = [name for name, path in (("eta", args.eta_model), ("delta", args.npo_model)) if path]
    settings["NPO mode"] = f"dense {'+'.join(dense)}" if dense else args.mode
    settings.update(guiders.png_settings(args))
    return f"{job['prompt']}\nNegative prompt: {job['negative'] or ''}\n" + \
        ", ".join(f"{k}: {a1111_quote(v)}" for k, v in settings.items())


def sweep_parameters(args, job, size, alphas, betas):
    """An α × β grid's PNG `parameters`, as A1111's X/Y/Z plot writes a grid's: the first cell's settings, then the
    axes, X the columns (β), Y the rows (α); cell (i, j) is that image at α = Y value i, β = X value j (one seed)."""
    def listed(values):  # quoted, as A1111 quotes a value with commas, so that its parser reads it as one value
        return json.dumps(", ".join(f"{v:g}" for v in values))
    axes = {"Script": "X/Y/Z plot", "X Type": "NPO beta", "X Values": listed(betas),
            "Y Type": "NPO alpha", "Y Values": listed(alphas)}
    return a1111_parameters(args, job, size) + "".join(f", {k}: {v}" for k, v in axes.items())


def parse_lora(text):
    """`--lora PATH[:WEIGHT]` -> (path, weight). The weight is the text after the last ':' when that is a number
    and the whole text is not an existing file; so `C:\\loras\\a.safetensors` and `my:lora.safetensors` are paths,
    `a.safetensors:0.8` is weight 0.8, and `C:\\loras\\a.safetensors:0.8` both."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not os.path.isfile(text):
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise UserError(f"--lora {text}: the weight {weight} is not a finite number; pass e.g. {path}:0.8.")
        return path, value
    return text, 1.0


def run_lora(path, role, flag):
    """A LoRA flag's path, where a training run's folder, or one of its checkpoints (OUT/checkpoints/step-XXXXXX,
    the paper's table 4), stands for its LoRA file of `role`: delta.safetensors or eta.safetensors of a --joint run,
    else lora.safetensors."""
    if path is None or not os.path.isdir(path):
        return path
    for name in (f"{role}.safetensors", "lora.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(f"{flag} {path} is a folder without {role}.safetensors or lora.safetensors; pass a LoRA file, a "
                    "training run's folder or one of its checkpoints/step-XXXXXX folders.")


def lora_label(path):
    """A LoRA's name in the PNG parameters: its file name, after its checkpoint folder's (step-000500/lora.safetensors)
    when it is one of a training run's checkpoints, so that pictures of different checkpoints say which."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{os.path.basename(path)}" if re.fullmatch(r"step-\d+", folder) else os.path.basename(path)


def check_sample_arguments(args):
    """Everything a user can get wrong, checked before the model loads; fills in α and β. Returns the sweeps."""
    args.guider = guiders.from_arguments(args)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} {value} is not a positive multiple of 8; use e.g. 512.")
    for flag in ("original_size", "target_size", "crop_top_left"):
        value = getattr(args, flag)
        if value is not None and min(value) < (0 if flag == "crop_top_left" else 1):
            raise UserError(f"--{flag.replace('_', '-')} {value[0]} {value[1]} is not a size in pixels; pass e.g. 1024 1024.")
    for flag in ("n", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)}).")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance {args.guidance:g} is negative, which would push images away from the prompt; "
                        "pass 0 or more (7.5 is SD's usual scale; 1 or less samples the prompt's branch alone).")
    args.lora = [(run_lora(path, "eta", "--lora"), w) for path, w in map(parse_lora, args.lora or [])]
    args.npo = run_lora(args.npo, "delta", "--npo")
    for path, flag in [(path, "--lora") for path, _ in args.lora] + [(args.npo, "--npo")]:
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist; pass a LoRA .safetensors file.")
    if args.clip_skip < 1:
        raise UserError(f"--clip-skip {args.clip_skip}: A1111's clip skip counts from 1 (the last layer, no skip); "
                        "pass 1, or 2 for the penultimate layer.")
    if args.sampler != "ddim" and args.ddim_eta:
        raise UserError(f"--ddim-eta is DDIM's noise and does nothing with --sampler {args.sampler}; drop it or use "
                        "--sampler ddim.")
    check_eta_model_arguments(args)
    check_npo_model_arguments(args)
    sweep_a = parse_floats(args.sweep_alpha, "--sweep-alpha") if args.sweep_alpha else None
    sweep_b = parse_floats(args.sweep_beta, "--sweep-beta") if args.sweep_beta else None
    # α weighs η and β weighs δ on the unconditional branch: without that offset they would do nothing
    eta = args.lora or args.eta_model
    delta = args.npo or args.npo_model
    for flag, value, offset, needs in (("--alpha", args.alpha, eta, "--lora"),
                                       ("--beta", args.beta, delta, "--npo or --npo-model"),
                                       ("--sweep-alpha", args.sweep_alpha, eta, "--lora"),
                                       ("--sweep-beta", args.sweep_beta, args.npo, "--npo")):
        if value is not None and not offset:
            raise UserError(f"{flag} weighs the offset given with {needs}, and there is none; drop {flag} or "
                            f"pass {needs}.")
    if args.compare and not args.npo:
        raise UserError("--compare shows the effect of δ; pass the NPO offset with --npo.")
    args.alpha = 1.0 if args.alpha is None else args.alpha
    args.beta = 1.0 if args.beta is None else args.beta
    if args.guidance_method == "autoguidance" and args.guider is None:  # the paper's: θ itself on ε_neg, eq. 10 at 0, 0
        args.alpha, args.beta = 0.0, 0.0
    for name, values in (("alpha", sweep_a or [args.alpha]), ("beta", sweep_b or [args.beta])):
        if any(not 0 <= v <= 1 for v in values):
            warn(f"{name} outside [0, 1] extrapolates beyond the paper's range (eq. 10).")
    if args.dtype == "float16" and args.device == "cpu":
        raise UserError("--dtype float16 is not supported on CPU; use bfloat16 or float32.")
    return sweep_a, sweep_b


def check_eta_model_arguments(args):
    """--eta-model (a fully fine-tuned η) excludes a LoRA η and the merged mode, which it is already."""
    if args.eta_model is None:
        return
    if not os.path.exists(args.eta_model):
        raise UserError(f"--eta-model {args.eta_model} does not exist; pass a fine-tuned model's folder, unet/ folder "
                        "or single-file checkpoint.")
    if args.lora:
        raise UserError("--lora and --eta-model both give η; pass one of them.")
    if args.mode == "merged":
        raise UserError("--eta-model always runs two weight sets (θ_ft and θ + α·η), as --mode merged does; drop --mode.")


def check_npo_model_arguments(args):
    """--npo-model (a whole NPO-tuned UNet as δ) excludes a LoRA δ, the merged mode (which it is already) and more than
    one β (each β would need its own dense weight set)."""
    if args.npo_model is None:
        return
    if not os.path.exists(args.npo_model):
        raise UserError(f"--npo-model {args.npo_model} does not exist; pass an NPO model's folder, unet/ folder or "
                        "single-file checkpoint.")
    if args.npo:
        raise UserError("--npo and --npo-model both give δ; pass one of them.")
    if args.mode == "merged":
        raise UserError("--npo-model always runs two weight sets (θ + η and θ + α·η + β·δ), as --mode merged does; "
                        "drop --mode.")
    if args.sweep_beta or args.compare:
        raise UserError(f"{'--sweep-beta' if args.sweep_beta else '--compare'} samples several β, and with --npo-model "
                        "each β is a dense weight set of its own (θ + β·(θ_δ − θ)); run once per --beta instead.")


def plan_jobs(args, rows, sweep_a, sweep_b):
    """The images to make, in output order, each a dict(prompt, negative, seed, alpha, beta); `rows` are the
    (prompt, negative prompt) pairs."""
    if sweep_a is not None or sweep_b is not None:  # per prompt, an α × β grid at one seed
        return [dict(prompt=p, negative=n, seed=args.seed, alpha=a, beta=b)
                for p, n in rows for a in sweep_a or [args.alpha] for b in sweep_b or [args.beta]]
    if args.compare:  # per prompt, without δ (β = 0, α = 1: plain CFG with η) and with it
        return [dict(prompt=p, negative=n, seed=args.seed + k, alpha=a, beta=b)
                for k, (p, n) in enumerate(rows) for a, b in ((1.0, 0.0), (args.alpha, args.beta))]
    return [dict(prompt=p, negative=n, seed=args.seed + i, alpha=args.alpha, beta=args.beta)
            for i, (p, n) in enumerate(row for row in rows for _ in range(args.n))]


def run_jobs(pipe, args, work, progress):
    """Generate every batch of jobs in `work` (cut by `batches`); returns PIL images in job order. In merged mode a
    batch shares one (α, β), whose two weight sets are built once and reused while it stays the same."""
    pictures, unets, unets_key = [], None, None
    for batch in work:
        alpha, beta = [j["alpha"] for j in batch], [j["beta"] for j in batch]
        if args.mode == "merged":
            if len(set(zip(alpha, beta))) > 1:
                for job in batch:
                    pictures += run_jobs(pipe, args, [[job]], progress)
                continue
            alpha, beta = alpha[0], beta[0]
            if unets_key != (alpha, beta):
                unets, unets_key = guided.merged_unets(pipe.unet, alpha, beta), (alpha, beta)
        out = guided.generate(pipe, [j["prompt"] for j in batch], [j["seed"] for j in batch],
                                negative_rows(batch), args.steps, args.guidance, args.ddim_eta, alpha, beta,
                                args.height, args.width, args.mode, unets,
                                callback=lambda i, n, t: progress.step(i, n, len(batch)), sampler=args.sampler,
                                clip_skip=args.clip_skip - 1,  # A1111's N is diffusers' N − 1
                                original_size=args.original_size, crop_top_left=args.crop_top_left or (0, 0),
                                target_size=args.target_size, guider=args.guider)
        pictures += images.to_pil(out)
        progress.images_done(len(batch))
    return pictures


def count_chunks(pipe, jobs):
    """--prompt-syntax a1111: each job's (prompt, negative prompt) counts of 77-token chunks, kept in the job as
    "chunks". SDXL's zeros for no negative prompt fit any length (A1111 zeros it too)."""
    counts = {}
    for job in jobs:
        texts = [job["prompt"], job["negative"] or ""]
        for text in texts:
            if text not in counts:
                counts[text] = prompt_syntax.count_chunks(pipe.tokenizer, text)
        zeros = job["negative"] is None and pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
        job["chunks"] = (counts[texts[0]], counts[texts[0 if zeros else 1]])


def batches(jobs, size):
    """Consecutive jobs in batches of at most `size`. Jobs counted by `count_chunks` are batched only with jobs of
    the same length and the same kind of negative prompt: rows of a batch are padded to its longest, and an image
    must not depend on its batch mates."""
    def key(job):
        return job.get("chunks") and (max(job["chunks"]), job["negative"] is None)
    batch = []
    for job in jobs:
        if batch and (len(batch) == size or key(job) != key(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def write_pictures(args, prompts, jobs, pictures, sweeps, size):
    """Save the images (or, with --compare / --sweep-*, one labelled grid per prompt); returns the paths. In a folder
    the files are numbered on from the highest number of their kind already there (`next_number`):
    NNNNN-seedS.png, compare-NNNN-seedS.png, sweep-NNNN.png; an image's N is that first number + its job's "index",
    so that each torchrun rank can write its share of `jobs`."""
    folder = output_folder(args.out)

    def destination(prefix, name):
        return args.out if args.out.lower().endswith(".png") else os.path.join(folder, prefix + name)

    written = []
    if sweeps[0] is not None or sweeps[1] is not None:
        alphas, betas = sweeps[0] or [args.alpha], sweeps[1] or [args.beta]
        per, first = len(alphas) * len(betas), next_number(folder, "sweep-")
        for k, p in enumerate(prompts):
            grid = images.labelled_grid(pictures[k * per:(k + 1) * per], len(alphas), len(betas),
                                        [f"α={a:g}" for a in alphas], [f"β={b:g}" for b in betas], title=p)
            written.append(destination("sweep-", f"{first + k:04d}.png"))
            images.save_png(grid, written[-1], sweep_parameters(args, jobs[k * per], size, alphas, betas))
    elif args.compare:
        first = next_number(folder, "compare-")
        for k, p in enumerate(prompts):
            grid = images.labelled_grid(pictures[2 * k:2 * k + 2], 1, 2, (),
                                        ["without NPO", f"with NPO (α={args.alpha:g}, β={args.beta:g})"], title=p)
            written.append(destination("compare-", f"{first + k:04d}-seed{jobs[2 * k]['seed']}.png"))
            images.save_png(grid, written[-1], a1111_parameters(args, jobs[2 * k + 1], size))
    else:
        # rank 0's listing numbers every rank's files: each waits in `broadcast` until it is made, so none has
        # written a file yet that rank 0 could count
        first = distributed.broadcast(next_number(folder))
        for job, picture in zip(jobs, pictures):
            written.append(destination("", f"{first + job['index']:05d}-seed{job['seed']}.png"))
            images.save_png(picture, written[-1], a1111_parameters(args, job, size))
    return written


def negative_rows(batch):
    """The batch's negative prompts for `guided.generate`: None when no image has one (SDXL's zeros), else one each."""
    negatives = [j["negative"] for j in batch]
    return None if all(n is None for n in negatives) else [n or "" for n in negatives]


def load_for_sampling(args, texts, alpha):
    """The pipeline with η (--lora, summed, or --eta-model, then at `alpha` on the negative branch) and δ (--npo)
    attached, checked against --steps, --clip-skip and the prompt and negative prompt `texts`."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = pipeline.load_pipeline(args.model, dtype, args.device, args.variant, **pipeline.source_options(args))
    if pipe.origin.startswith("single file"):
        print(pipe.origin, file=sys.stderr)  # which family and prediction type were read, and how
    if args.scheduler_config:
        pipe.scheduler_config = pipeline.read_scheduler_config(args.scheduler_config)
    cfg = sampler.sampler_config(args.sampler, pipe.scheduler_config, not pipe.is_sdxl)
    if args.steps > cfg.num_train_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's {cfg.num_train_timesteps} training timesteps; "
                        "use fewer steps.")
    sampler.check_steps(args.sampler, pipe.scheduler_config, args.steps, not pipe.is_sdxl)  # before any compute
    layers = pipe.text_encoder.config.num_hidden_layers
    if args.clip_skip > layers:
        raise UserError(f"--clip-skip {args.clip_skip} is more than this text encoder's {layers} layers; use 1 to {layers}.")
    if args.lora:
        guided.load_offset(pipe, args.lora, "eta")
    if args.npo:
        guided.load_offset(pipe, [(args.npo, 1.0)], "delta")
    if args.npo_model:  # before η's θ + α·η is made of θ, which δ = θ_δ − θ needs
        guided.attach_npo_model(pipe, args.npo_model, args.beta, args.eta_model, alpha)
    elif args.eta_model:
        guided.attach_eta_model(pipe, args.eta_model, alpha)
    check_model_arguments(args, pipe)
    pipe.prompt_syntax = args.prompt_syntax
    for p in set(texts) - {None}:
        if args.prompt_syntax == "plain" and pipe.tokenizer.count_tokens(p) > pipe.tokenizer.max_length:
            warn(f"prompt is longer than {pipe.tokenizer.max_length} tokens and is truncated (--prompt-syntax a1111 "
                 f"reads it whole): {p[:60]!r}...")
    args.hashes = a1111_hashes(args)  # once per run, for every picture's parameters
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)  # merged mode compiles its two weight sets (guided.merged_unets)
        for name in ("eta_unet", "npo_unet"):
            if getattr(pipe, name) is not None:
                setattr(pipe, name, torch.compile(getattr(pipe, name)))
    return pipe


def check_model_arguments(args, pipe):
    """What depends on the model: the default CFG scale (7.5; SDXL 5), and SDXL's size flags, refused for SD1/2."""
    if args.guidance is None:
        args.guidance = pipe.default_guidance
    if args.guider is not None:  # the layer names against this UNet's blocks
        flag = "--seg-layers" if args.guider.method == "seg" else "--auto-layers"
        guiders.named_blocks(pipe.unet, args.guider.layers, flag)
    sizes = [f for f in ("original_size", "crop_top_left", "target_size") if getattr(args, f) is not None]
    if sizes and not pipe.is_sdxl:
        raise UserError(f"--{sizes[0].replace('_', '-')} is SDXL's size conditioning and {args.model} is not an SDXL "
                        "model; drop it.")
    if pipe.is_sdxl and args.clip_skip != 1:
        raise UserError("--clip-skip is for SD1.x/2.x text encoders; SDXL already reads the penultimate layer, so "
                        "drop it.")


def plan_sample(args, sweeps):
    """(rows, jobs, whether the default prompt stands in) of a run, checked before the model loads: the (prompt,
    negative prompt) rows, the jobs of `plan_jobs`, each with its "index" in the one-process order, and --out."""
    default_prompt = args.prompt is None and not args.prompts_file
    rows = data.read_prompts(args.prompts_file, negatives=True) if args.prompts_file else \
        [(DEFAULT_PROMPT if default_prompt else args.prompt, None)]
    rows = [(p, args.negative_prompt if n is None else n) for p, n in rows]  # a row's own negative prompt wins
    if args.prompt_syntax == "a1111":  # a weight that is not a number is refused before the model loads
        for text in {t for row in rows for t in row if t}:
            prompt_syntax.parse_attention(text)
    jobs = plan_jobs(args, rows, *sweeps)
    for i, job in enumerate(jobs):
        job["index"] = i  # its file is number first + i, whichever process makes it
    if args.eta_model and len({j["alpha"] for j in jobs}) > 1:
        raise UserError("with --eta-model every image must share one α, because the base weights become θ + α·η in "
                        "place (one extra weight set, not one per α); drop --sweep-alpha, or --compare with α ≠ 1.")
    grids = sweeps != (None, None) or args.compare
    if grids and distributed.world()[1] > 1:
        raise UserError("--compare and --sweep-* make one grid per prompt in one process; run them without torchrun.")
    check_writable(args.out, len(rows) if grids else len(jobs))
    return rows, jobs, default_prompt


def cmd_sample(args):
    """Sample the planned jobs in batches of --batch-size and write them. Under torchrun (`distributed`) rank r of N
    generates batches r, r + N, ... of the one-process run, cut as that run cuts them (an image's last bits depend on
    the batch it is made in: the shapes of the matmuls), and writes each under the number that run gives it: the
    same files."""
    sweeps = check_sample_arguments(args)
    rows, jobs, default_prompt = plan_sample(args, sweeps)
    with distributed.processes(str(pipeline.resolve_device(args.device))) as (rank, ranks, device):
        args.device = device  # cuda:LOCAL_RANK under torchrun
        pipe = load_for_sampling(args, [text for row in rows for text in row], jobs[0]["alpha"])
        if default_prompt and rank == 0:  # said once the run is sure to start, so that an error stays the one line
            print(f"no --prompt given: sampling the default prompt {DEFAULT_PROMPT!r} (pass --prompt TEXT or "
                  "--prompts-file FILE)", file=sys.stderr)
        if args.prompt_syntax == "a1111":
            count_chunks(pipe, jobs)
        work = distributed.share(batches(jobs, args.batch_size), rank, ranks)
        progress = Progress(sum(map(len, work)), show=rank == 0)  # rank 0's share stands for the whole
        pictures = run_jobs(pipe, args, work, progress)
        if progress.tty and progress.show:
            print(file=sys.stderr)
        size = (args.width or pipe.image_size, args.height or pipe.image_size)
        mine = [job for batch in work for job in batch]
        written = write_pictures(args, [p for p, _ in rows], mine, pictures, sweeps, size)
        if ranks > 1:  # every rank returns every path, in job order
            parts = distributed.gather([(job["index"], path) for job, path in zip(mine, written)])
            written = [path for _, path in sorted(pair for part in parts for pair in part)]
    if rank == 0:
        print(f"wrote {len(written)} image{'s' * (len(written) != 1)} to {args.out}", file=sys.stderr)
    return written


def cmd_train(args):
    return train.train(trainconfig.from_namespace(args))


def cmd_evaluate(args):
    """Score the folders; under torchrun each rank scores its share of the batches and rank 0 writes the report."""
    with distributed.processes(str(pipeline.resolve_device(args.device))) as (rank, _, device):
        evaluate.evaluate(args.folders, args.scorer, args.out, args.batch_size, device)
    if rank == 0:
        print(f"wrote {os.path.join(args.out, 'results.json')} and results.md", file=sys.stderr)


def layer_progress():
    """extract-lora's progress on stderr: layer i/N, elapsed time and the ETA from the share of the SVD work done;
    redrawn in place on a terminal, a line every twentieth of the layers in a log."""
    start, tty = time.time(), sys.stderr.isatty()

    def report(i, n, layer, share):
        if not tty and i % -(-n // 20) and i != n:  # every ⌈n/20⌉-th layer
            return
        elapsed = time.time() - start
        print(f"SVD of layer {i}/{n} ({layer}), {elapsed:.1f}s elapsed, ETA {elapsed / share - elapsed:.1f}s",
              end="\r" if tty else "\n", file=sys.stderr, flush=True)
    return report


def cmd_extract_lora(args):
    """η = θ_ft − θ as a kohya LoRA file: per layer the best rank-r approximation (extract.extract_offset); prints the
    relative error per block and overall, to choose r."""
    folder = os.path.dirname(os.path.abspath(args.out))
    if not args.out.endswith(".safetensors") or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {args.out} must be a .safetensors file in a writable folder.")
    if args.rank < 1 or (args.conv_rank is not None and args.conv_rank < 1):
        raise UserError(f"--rank and --conv-rank must be at least 1 (got {args.rank}, {args.conv_rank}).")
    device = pipeline.resolve_device(args.device)
    base = pipeline.load_unet(args.base)
    tuned = pipeline.load_unet(args.tuned)
    guided.check_same_architecture(base, tuned, f"--tuned {args.tuned}")
    stats = extract.extract_offset(base, tuned, "eta", args.rank, args.conv_rank, args.targets, device, layer_progress())
    if sys.stderr.isatty():
        print(file=sys.stderr)
    errors = extract.relative_errors(stats)
    per_layer = {name: round((r / n) ** 0.5, 6) for name, (r, n) in stats.items()}
    lora.save_lora(base, "eta", args.out, role="eta", base_model=args.base, metadata={
        "npo_source_base": args.base, "npo_source_tuned": args.tuned, "npo_rank": args.rank,
        "npo_conv_rank": args.conv_rank or args.rank, "npo_relative_error": f"{errors['overall']:.6f}",
        "npo_relative_errors": json.dumps(per_layer)})
    print(f"relative error ‖ΔW − ΔW_r‖ / ‖ΔW‖ of {len(stats)} layers at rank {args.rank}:")
    for block, error in errors.items():
        print(f"  {block:14s} {error:.4f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return errors


DEFAULT_PROMPT = "a red circle"  # one of the embedded model's captions (weights/README.md)
MODEL_HELP = ("a diffusers model folder, or a single-file SD1.x / SD2.x / SDXL checkpoint (.safetensors, or .ckpt read "
              "without running code) (default: the embedded model in weights/)")


def add_offset_arguments(p):
    """The sample flags of eq. 10: η (--lora or --eta-model), δ (--npo or --npo-model), and their α and β."""
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help="the preference offset η (LoRA .safetensors, kohya or diffusers/peft, text-encoder keys "
                        "included); repeat it to sum several, each times its weight (default 1). WEIGHT is what "
                        "follows the last ':' when that is a number and PATH[:WEIGHT] is not itself a file")
    p.add_argument("--eta-model", help="a fully fine-tuned model as η = θ_ft − θ (its folder, unet/ folder or single "
                                       "file): ε_pos runs θ_ft, ε_neg θ + α·η + β·δ; without δ it is eq. 4's weight merge")
    p.add_argument("--npo", help="the NPO offset δ (LoRA .safetensors), used on the unconditional branch")
    p.add_argument("--npo-model", help="a whole NPO-tuned model as δ = θ_δ − θ (its folder, unet/ folder or single "
                                       "file): ε_neg runs θ + α·η + β·δ in a weight set of its own; one --beta per run")
    p.add_argument("--alpha", type=finite_float, help="weight of η on the unconditional branch (eq. 10; default 1)")
    p.add_argument("--beta", type=finite_float, help="weight of δ on the unconditional branch (eq. 10; default 1)")


def add_sample_arguments(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    pipeline.add_source_arguments(p)
    p.add_argument("--variant", help="read the weight files of a variant, e.g. fp16: *.fp16.safetensors")
    p.add_argument("--scheduler-config", help="a scheduler_config.json (or a folder with one) to use instead of the "
                                              "model's scheduler/, e.g. to change timestep_spacing")
    p.add_argument("--prompt", help=f"the prompt (ignored with --prompts-file; without either, {DEFAULT_PROMPT!r}, "
                                    "which the command says it uses)")
    p.add_argument("--prompts-file", help="a .txt file with one prompt per line, a .jsonl file with a \"prompt\" (and "
                                          "optionally a \"negative_prompt\") per row, or a Pick-a-Pic .parquet "
                                          "file (its unique captions)")
    p.add_argument("--negative-prompt", default=None,
                   help="the negative prompt c' of the unconditional branch (default: none, which is the empty prompt; "
                        "for SDXL zeros, as diffusers, while --negative-prompt \"\" encodes the empty prompt; a JSONL "
                        "row's own negative_prompt wins)")
    add_offset_arguments(p)
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="CFG scale g ≥ 0: ε = ε_neg + g·(ε_pos − ε_neg); g ≤ 1 samples the prompt's branch alone, "
                        "θ + η, without CFG, as diffusers (default 7.5; 5 for SDXL, as the authors)")
    add_sampler_arguments(p)
    guiders.add_arguments(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and activations (float16 on CUDA only; LoRA offsets stay float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step, faster after)")
    p.add_argument("--mode", choices=["batched", "merged"], default="batched",
                   help="batched: one forward of [x_t; x_t] with per-row LoRA weights (one copy of θ); "
                        "merged: the authors' two merged UNets, two passes per step (a reference)")
    p.add_argument("--compare", action="store_true", help="per prompt, a side-by-side image without and with NPO at one seed")
    p.add_argument("--sweep-alpha", help="comma-separated α values for a labelled α × β grid at one seed (fig. 9)")
    p.add_argument("--sweep-beta", help="comma-separated β values for the α × β grid")
    p.add_argument("--out", default="out",
                   help="a folder (default: out/), made when the first image is written, or a .png path for one image. "
                        "In a folder, files are numbered on from the last one there, as A1111 does: NNNNN-seedS.png "
                        "(compare-NNNN-seedS.png, sweep-NNNN.png for grids), so no run overwrites another")
    # the files' A1111 hashes for the PNG parameters (load_for_sampling fills them); the guider (guiders.from_arguments)
    p.set_defaults(hashes={}, guider=None)


def add_sampler_arguments(p):
    """The sampler, its steps and the picture's size, the settings A1111 users paste."""
    p.add_argument("--sampler", choices=list(sampler.SAMPLERS), default="ddim",
                   help="ddim; dpmpp-2m: DPM-Solver++ (2M), diffusers' DPMSolverMultistepScheduler defaults, the "
                        "paper's evaluation sampler (25 steps); dpmpp-2m-karras: the same on Karras sigmas (A1111's "
                        "\"DPM++ 2M Karras\"); euler-a: Euler ancestral (\"Euler a\"); euler. Each runs as its diffusers "
                        "scheduler built from the model's scheduler config (default: ddim)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--ddim-eta", type=finite_float, default=0.0, help="DDIM stochasticity η_ddim (0 deterministic, 1 DDPM-like)")
    p.add_argument("--clip-skip", type=int, default=1, help="A1111's clip skip: 1 conditions on the text encoder's last "
                                                          "layer, 2 on the penultimate (diffusers' clip_skip=1), ...")
    p.add_argument("--prompt-syntax", choices=["plain", "a1111"], default="plain",
                   help="how prompts are read (sampling only; training reads them plainly). plain: diffusers' "
                        "(default), brackets are text and a prompt is cut at 77 tokens. a1111: A1111's: (word) "
                        "weighs 1.1, [word] 1/1.1, (word:1.3) 1.3, \\( is a bracket; prompts of any length, in "
                        "chunks of 75 tokens (BREAK starts a new chunk); prompt and negative prompt padded to as "
                        "many chunks (A1111's \"Pad prompt/negative prompt\" setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--n", "--images-per-prompt", type=int, default=1,
                   help="images per prompt (default 1); under torchrun spell it --images-per-prompt, or put -- before "
                        "npo.py: torchrun reads --n as an abbreviation of its own --nnodes / --nproc-per-node")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet forward (default 1)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"),
                   help="SDXL's size conditioning: the original image size (default: --height --width)")
    p.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"),
                   help="SDXL's size conditioning: the crop's top-left corner (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"),
                   help="SDXL's size conditioning: the target image size (default: --height --width)")


def add_evaluate_arguments(p):
    p.add_argument("folders", nargs="+", metavar="DIR",
                   help="two or more folders written by npo.py sample, with the same prompts and seeds")
    p.add_argument("--scorer", action="append", required=True, metavar="SPEC",
                   help="pickscore:PATH, hpsv2:PATH, aesthetic:CLIP_PATH,MLP_PATH, clipscore:PATH, imagereward:DIR, spm:PATH (at t = 0), or a module:function "
                        "reward; repeat for several (the PATH is all after the first ':')")
    p.add_argument("--out", required=True, help="report folder: results.json and results.md")
    p.add_argument("--batch-size", type=int, default=8, help="images per scorer forward (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")


def build_parser():
    parser = argparse.ArgumentParser(prog="npo.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="load a model strictly and print its parts")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    pipeline.add_source_arguments(p)
    p.add_argument("--variant", help="read the weight files of a variant, e.g. fp16: *.fp16.safetensors")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="generate images with NPO guidance (eq. 10 of the paper)")
    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train the offset η, or with --npo the NPO offset δ (Diffusion-DPO, SFT, a reward, or RL: DDPO)")
    trainconfig.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score folders of samples with preference scorers: mean scores and win rates at "
                                        "identical prompt and seed (the paper's tables 1-3, fig. 7)")
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("extract-lora", help="a full fine-tune's η = θ_ft − θ as a LoRA file (truncated SVD per layer)")
    p.add_argument("--base", required=True, help="the base model θ: a diffusers folder, unet/ folder or single file")
    p.add_argument("--tuned", required=True, help="the fine-tuned model θ_ft, of the same architecture")
    p.add_argument("--rank", type=int, required=True, help="the rank r of each layer's offset")
    p.add_argument("--conv-rank", type=int, help="the rank of 3x3 conv layers among --targets (default: --rank)")
    p.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS),
                   help=f"comma-separated layer-name suffixes, as in training (default {','.join(lora.DEFAULT_TARGETS)})")
    p.add_argument("--out", required=True, help="the LoRA .safetensors file to write (kohya format)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where each layer's weights are subtracted and its SVD runs: cpu, cuda, cuda:1, mps (its SVD "
                        "step on the CPU); the two models stay in CPU memory (default: cuda if available)")
    p.set_defaults(func=cmd_extract_lora)

    p = sub.add_parser("experiment", help="the paper's protocol in miniature on the embedded model (EXPERIMENT.md)")
    experiment.add_arguments(p)
    p.set_defaults(func=experiment.main)

    p = sub.add_parser("reproduce", help="sample and score a table of the paper from a recipe (recipes/): table 1's "
                                         "means and fig. 7's win rates; run again to continue an interrupted run")
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.main)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
