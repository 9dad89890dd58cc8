"""`npo.py sample`: prompts × seeds planned into jobs, sampled with NPO guidance (guided.py) in batches, and written as
PNGs that carry their settings the way A1111 writes them (`parameters`, with the model's and the LoRAs' hashes), into
a folder numbered on from its last image as A1111 does; or, with --compare / --sweep-*, as labelled grids. On a video
model (--frames, --fps) each video is a folder of frames and an animated WebP (videos.py). Under torchrun the batches
are shared among the ranks and the files are those of one process (distributed.py).
"""
import json
import math
import os
import re
import sys
import time

import torch

from . import checkpoint
from . import data
from . import distributed
from . import guided
from . import guiders
from . import images
from . import pipeline
from . import prompt_syntax
from . import sampler
from . import video
from . import videos
from .checkpoint import UserError

DEFAULT_PROMPT = "a red circle"  # one of the embedded model's captions (weights/README.md)

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
    if args.frames:  # a video's: its frame count and the preview's (for VideoCrafter2 also the conditioning's) fps
        settings.update({"Frames": args.frames, "FPS": args.fps})
    if "Model hash" in hashes:  # before the name, in A1111's order
        settings["Model hash"] = hashes["Model hash"]
    settings["Model"] = os.path.basename(os.path.normpath(args.model))
    if args.sampler == "ddim":
        settings["DDIM eta"] = args.ddim_eta or 0.0  # None until the model's default is known
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
    for flag in ("n", "batch_size", "steps", "frames", "fps", "decode_chunk"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
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
                                target_size=args.target_size, guider=args.guider, frames=args.frames, fps=args.fps,
                                decode_chunk=args.decode_chunk)
        pictures += videos.to_frames(out) if args.frames else images.to_pil(out)
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
            name = f"{first + job['index']:05d}-seed{job['seed']}"
            if args.frames:  # a video: NNNNN-seedS/FFF.png and NNNNN-seedS.webp
                written.append(videos.save_video(picture, folder, name, a1111_parameters(args, job, size), args.fps))
                continue
            written.append(destination("", name + ".png"))
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
    check_video_arguments(args, pipe)  # before any offset or dense model is attached to a UNet it cannot fit
    if args.scheduler_config:
        pipe.scheduler_config = pipeline.read_scheduler_config(args.scheduler_config)
    fix_old = not (pipe.is_sdxl or pipe.is_video)  # StableDiffusionPipeline's fix of old configs, not theirs
    cfg = sampler.sampler_config(args.sampler, pipe.scheduler_config, fix_old)
    if args.steps > cfg.num_train_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's {cfg.num_train_timesteps} training timesteps; "
                        "use fewer steps.")
    sampler.check_steps(args.sampler, pipe.scheduler_config, args.steps, fix_old)  # before any compute
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
    for p in [t for t in dict.fromkeys(texts) if t is not None]:  # each once, in the order given
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
    """What depends on the model: the default CFG scale (7.5; SDXL 5), size and DDIM η (a model's own sampling
    defaults, `Pipeline.defaults`: VideoCrafter2's 320×512 at η 1), and SDXL's size flags, refused for SD1/2."""
    if args.guidance is None:
        args.guidance = pipe.default_guidance
    args.height = args.height or pipe.defaults.get("height")  # else the model's square image_size, in generate
    args.width = args.width or pipe.defaults.get("width")
    if args.ddim_eta is None:  # η is DDIM's alone: other samplers keep 0
        args.ddim_eta = float(pipe.defaults.get("ddim_eta", 0.0)) if args.sampler == "ddim" else 0.0
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


def check_video_arguments(args, pipe):
    """--frames, --fps and --decode-chunk are a video model's, refused for an image model; for a video model they
    default to the model's (`Pipeline.default_frames`, `default_fps`; else 16 frames, 8 fps; 8 frames per VAE
    call, `video.DECODE_CHUNK`), and what does not make videos is refused: a .png --out, --compare and --sweep-*
    grids, SEG and autoguidance's block skip, a dense --eta-model / --npo-model."""
    if not pipe.is_video:
        for flag in ("frames", "fps", "decode-chunk"):
            if getattr(args, flag.replace("-", "_")) is not None:
                raise UserError(f"--{flag} is for video models and {args.model} is an image model; drop --{flag}.")
        return
    args.frames = args.frames or pipe.default_frames or 16  # ModelScope's clips are 16 frames
    args.fps = args.fps or pipe.default_fps or videos.DEFAULT_FPS
    args.decode_chunk = args.decode_chunk or video.DECODE_CHUNK
    refused = [(args.out.lower().endswith(".png"), f"--out {args.out} names one PNG, but a video is a folder of "
                "frames and a .webp; pass a folder"),
               (args.compare or args.sweep_alpha or args.sweep_beta, "--compare and --sweep-* make grids of "
                "images, not videos; run once per α or β instead"),
               (args.guider is not None, f"{'--guidance-method seg' if args.guidance_method == 'seg' else '--auto-layers'}"
                " perturbs blocks of an image UNet and is not supported for video models; drop it"),
               (args.eta_model or args.npo_model, "--eta-model and --npo-model are not supported for video models; "
                "pass η and δ as LoRAs (--lora, --npo)")]
    for wrong, message in refused:
        if wrong:
            raise UserError(f"{message}.")


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


def run(args):
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
        kind = "video" if args.frames else "image"
        print(f"wrote {len(written)} {kind}{'s' * (len(written) != 1)} to {args.out}", file=sys.stderr)
    return written
