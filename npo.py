"""npo: Diffusion-NPO (negative preference optimization) on a hand-written Stable Diffusion.

    python npo.py sample --prompt "a red circle" --lora dpo.safetensors --npo npo.safetensors
    python npo.py train --data pairs.jsonl --out runs/npo --npo          # train δ (Diffusion-DPO, pairs swapped)
    python npo.py experiment --out results  # the paper's experiment in miniature, on the embedded model
    python npo.py info --model PATH        # what a model folder holds, loaded strictly

This file is the command line only: one argparse with subcommands, each a thin shell over functions the tests call
directly (pipeline.py: loading and eq. 10; train.py: training; experiment.py: the experiment).
"""
import argparse
import os
import sys
import time

import torch

import data
import experiment
import images
import lora
import pipeline
import sampler
import train
from checkpoint import UserError
from pipeline import DEFAULT_MODEL

# ----------------------------------------------------------------------------------------------------------
# The command line.

def cmd_info(args):
    pipe = pipeline.load_pipeline(args.model)
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if pipe.is_sdxl else ()):
        print(f"{name:15s} {pipeline.count_parameters(getattr(pipe, name)) / 1e6:8.1f}M parameters")
    print(f"scheduler       {pipe.scheduler_config or 'SD defaults'}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def check_writable(out, pictures):
    """Fail before any compute if the output cannot be written: a .png path for one picture, else a folder."""
    if out.lower().endswith(".png"):
        if pictures != 1:
            raise UserError(f"--out {out} is one file but this run makes {pictures} pictures; pass a folder instead.")
        folder = os.path.dirname(os.path.abspath(out))
    else:
        folder = out
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {out} ({e.strerror}); pick a writable --out.")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"the output folder {folder} does not exist or is not writable; pick a writable --out.")


def parse_floats(text, flag):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers such as 0,0.5,1, not {text!r}.")


class Progress:
    """Step i/N, images done, elapsed time and ETA, on stderr."""

    def __init__(self, total_images):
        self.total, self.done, self.start = total_images, 0, time.time()
        self.tty = sys.stderr.isatty()

    def step(self, i, n, batch):
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


def a1111_parameters(args, job, size):
    """A1111's PNG `parameters` text: the prompt, the negative prompt, then `Key: value` settings."""
    settings = {"Steps": args.steps, "Sampler": "DDIM", "CFG scale": args.guidance, "Seed": job["seed"],
                "Size": f"{size[0]}x{size[1]}", "Model": os.path.basename(os.path.normpath(args.model)),
                "DDIM eta": args.ddim_eta}
    if args.lora:
        settings["Lora"] = os.path.basename(args.lora)
    if args.npo:
        settings["NPO"] = os.path.basename(args.npo)
    if args.lora or args.npo:
        settings.update({"NPO alpha": job["alpha"], "NPO beta": job["beta"]})
    settings["NPO mode"] = args.mode
    return f"{job['prompt']}\nNegative prompt: {args.negative_prompt or ''}\n" + ", ".join(f"{k}: {v}" for k, v in settings.items())


def check_sample_arguments(args):
    """Everything a user can get wrong, checked before the model loads; fills in α and β. Returns the sweeps."""
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
    for path, flag in ((args.lora, "--lora"), (args.npo, "--npo")):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist; pass a LoRA .safetensors file.")
    sweep_a = parse_floats(args.sweep_alpha, "--sweep-alpha") if args.sweep_alpha else None
    sweep_b = parse_floats(args.sweep_beta, "--sweep-beta") if args.sweep_beta else None
    # α weighs η and β weighs δ on the unconditional branch: without that offset they would do nothing
    for flag, value, offset, needs in (("--alpha", args.alpha, args.lora, "--lora"), ("--beta", args.beta, args.npo, "--npo"),
                                       ("--sweep-alpha", args.sweep_alpha, args.lora, "--lora"),
                                       ("--sweep-beta", args.sweep_beta, args.npo, "--npo")):
        if value is not None and offset is None:
            raise UserError(f"{flag} weighs the offset given with {needs}, and there is none; drop {flag} or "
                            f"pass {needs}.")
    if args.compare and not args.npo:
        raise UserError("--compare shows the effect of δ; pass the NPO offset with --npo.")
    args.alpha = 1.0 if args.alpha is None else args.alpha
    args.beta = 1.0 if args.beta is None else args.beta
    for name, values in (("alpha", sweep_a or [args.alpha]), ("beta", sweep_b or [args.beta])):
        if any(not 0 <= v <= 1 for v in values):
            warn(f"{name} outside [0, 1] extrapolates beyond the paper's range (eq. 10).")
    if args.dtype == "float16" and args.device == "cpu":
        raise UserError("--dtype float16 is not supported on CPU; use bfloat16 or float32.")
    return sweep_a, sweep_b


def plan_jobs(args, prompts, sweep_a, sweep_b):
    """The images to make, in output order, each a dict(prompt, seed, alpha, beta)."""
    if sweep_a is not None or sweep_b is not None:  # per prompt, an α × β grid at one seed
        return [dict(prompt=p, seed=args.seed, alpha=a, beta=b)
                for p in prompts for a in sweep_a or [args.alpha] for b in sweep_b or [args.beta]]
    if args.compare:  # per prompt, without δ (β = 0, α = 1: plain CFG with η) and with it
        return [dict(prompt=p, seed=args.seed + k, alpha=a, beta=b)
                for k, p in enumerate(prompts) for a, b in ((1.0, 0.0), (args.alpha, args.beta))]
    return [dict(prompt=p, seed=args.seed + i, alpha=args.alpha, beta=args.beta)
            for i, p in enumerate(q for q in prompts for _ in range(args.n))]


def run_jobs(pipe, args, jobs, progress):
    """Generate every job in batches of --batch-size; returns PIL images in job order. In merged mode a batch
    shares one (α, β), whose two weight sets are built once and reused while it stays the same."""
    pictures, unets, unets_key = [], None, None
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        alpha, beta = [j["alpha"] for j in batch], [j["beta"] for j in batch]
        if args.mode == "merged":
            if len(set(zip(alpha, beta))) > 1:
                for job in batch:
                    pictures += run_jobs(pipe, argparse.Namespace(**{**vars(args), "batch_size": 1}), [job], progress)
                continue
            alpha, beta = alpha[0], beta[0]
            if unets_key != (alpha, beta):
                unets, unets_key = pipeline.merged_unets(pipe.unet, alpha, beta), (alpha, beta)
        out = pipeline.generate(pipe, [j["prompt"] for j in batch], [j["seed"] for j in batch], args.negative_prompt,
                                args.steps, args.guidance, args.ddim_eta, alpha, beta, args.height, args.width,
                                args.mode, unets, callback=lambda i, n, t: progress.step(i, n, len(batch)),
                                original_size=args.original_size, crop_top_left=args.crop_top_left or (0, 0),
                                target_size=args.target_size)
        pictures += images.to_pil(out)
        progress.images_done(len(batch))
    return pictures


def write_pictures(args, prompts, jobs, pictures, sweeps, size):
    """Save the images (or, with --compare / --sweep-*, one labelled grid per prompt); returns the paths."""
    def destination(name):
        return args.out if args.out.lower().endswith(".png") else os.path.join(args.out, name)

    written = []
    if sweeps[0] is not None or sweeps[1] is not None:
        alphas, betas = sweeps[0] or [args.alpha], sweeps[1] or [args.beta]
        per = len(alphas) * len(betas)
        for k, p in enumerate(prompts):
            grid = images.labelled_grid(pictures[k * per:(k + 1) * per], len(alphas), len(betas),
                                        [f"α={a:g}" for a in alphas], [f"β={b:g}" for b in betas], title=p[:80])
            written.append(destination(f"sweep-{k:04d}.png"))
            images.save_png(grid, written[-1], a1111_parameters(args, jobs[k * per], size))
    elif args.compare:
        for k, p in enumerate(prompts):
            grid = images.labelled_grid(pictures[2 * k:2 * k + 2], 1, 2, (),
                                        ["without NPO", f"with NPO (α={args.alpha:g}, β={args.beta:g})"], title=p[:80])
            written.append(destination(f"compare-{k:04d}-seed{jobs[2 * k]['seed']}.png"))
            images.save_png(grid, written[-1], a1111_parameters(args, jobs[2 * k + 1], size))
    else:
        for k, (job, picture) in enumerate(zip(jobs, pictures)):
            written.append(destination(f"{k:05d}-seed{job['seed']}.png"))
            images.save_png(picture, written[-1], a1111_parameters(args, job, size))
    return written


def load_for_sampling(args, prompts):
    """The pipeline with η (--lora) and δ (--npo) attached, checked against --steps and the prompts."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = pipeline.load_pipeline(args.model, dtype, args.device)
    if args.steps > sampler.DDIMConfig.from_dict(pipe.scheduler_config).num_train_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's {pipe.scheduler_config.get('num_train_timesteps', 1000)} "
                        "training timesteps; use fewer steps.")
    if args.lora:
        lora.load_lora(pipe.unet, args.lora, "eta")
    if args.npo:
        lora.load_lora(pipe.unet, args.npo, "delta")
    check_model_arguments(args, pipe)
    for p in set(prompts) | {args.negative_prompt or ""}:
        if pipe.tokenizer.count_tokens(p) > pipe.tokenizer.max_length:
            warn(f"prompt is longer than {pipe.tokenizer.max_length} tokens and is truncated: {p[:60]!r}...")
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)  # merged mode compiles its two weight sets (pipeline.merged_unets)
    return pipe


def check_model_arguments(args, pipe):
    """What depends on the model: the default CFG scale (7.5; SDXL 5), and SDXL's size flags, refused for SD1/2."""
    if args.guidance is None:
        args.guidance = pipe.default_guidance
    sizes = [f for f in ("original_size", "crop_top_left", "target_size") if getattr(args, f) is not None]
    if sizes and not pipe.is_sdxl:
        raise UserError(f"--{sizes[0].replace('_', '-')} is SDXL's size conditioning and {args.model} is not an SDXL "
                        "model; drop it.")


def cmd_sample(args):
    sweeps = check_sample_arguments(args)
    prompts = data.read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    jobs = plan_jobs(args, prompts, *sweeps)
    grids = sweeps != (None, None) or args.compare
    check_writable(args.out, len(prompts) if grids else len(jobs))
    pipe = load_for_sampling(args, prompts)
    progress = Progress(len(jobs))
    pictures = run_jobs(pipe, args, jobs, progress)
    if progress.tty:
        print(file=sys.stderr)
    size = (args.width or pipe.image_size, args.height or pipe.image_size)
    written = write_pictures(args, prompts, jobs, pictures, sweeps, size)
    print(f"wrote {len(written)} image{'s' * (len(written) != 1)} to {args.out}", file=sys.stderr)
    return written


def cmd_train(args):
    return train.main(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="npo.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="load a model folder strictly and print its parts")
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers model folder (default: the embedded model in weights/)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="generate images with NPO guidance (eq. 10 of the paper)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers model folder (default: the embedded model in weights/)")
    p.add_argument("--prompt", default="a red circle", help="the prompt (ignored with --prompts-file)")
    p.add_argument("--prompts-file", help="a .txt file with one prompt per line, or a .jsonl file with a \"prompt\" per row")
    p.add_argument("--negative-prompt", default=None,
                   help="the negative prompt c' of the unconditional branch (default: none, which is the empty prompt; "
                        "for SDXL zeros, as diffusers, while --negative-prompt \"\" encodes the empty prompt)")
    p.add_argument("--lora", help="the preference offset η (LoRA .safetensors, kohya or diffusers/peft format)")
    p.add_argument("--npo", help="the NPO offset δ (LoRA .safetensors), used on the unconditional branch")
    p.add_argument("--alpha", type=float, default=None, help="weight of η on the unconditional branch (eq. 10; default 1)")
    p.add_argument("--beta", type=float, default=None, help="weight of δ on the unconditional branch (eq. 10; default 1)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale g: ε = ε_neg + g·(ε_pos − ε_neg) (default 7.5; 5 for SDXL, as the authors)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM stochasticity η_ddim (0 deterministic, 1 DDPM-like)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet forward (default 1)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"),
                   help="SDXL's size conditioning: the original image size (default: --height --width)")
    p.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"),
                   help="SDXL's size conditioning: the crop's top-left corner (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"),
                   help="SDXL's size conditioning: the target image size (default: --height --width)")
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
    p.add_argument("--out", default="out", help="a .png path for one image, or a folder (default: out/)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train the offset η, or with --npo the NPO offset δ (Diffusion-DPO, SFT or a reward)")
    train.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("experiment", help="the paper's protocol in miniature on the embedded model (EXPERIMENT.md)")
    experiment.add_arguments(p)
    p.set_defaults(func=experiment.main)
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
