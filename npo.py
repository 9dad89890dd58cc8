"""npo: Diffusion-NPO (negative preference optimization) on a hand-written Stable Diffusion.

    python npo.py sample --prompt "a red circle" --lora dpo.safetensors --npo npo.safetensors
    python npo.py train --data pairs.jsonl --out runs/npo --npo          # train δ (Diffusion-DPO, pairs swapped)
    python npo.py experiment --out results  # the paper's experiment in miniature, on the embedded model
    python npo.py info --model PATH        # what a model folder holds, loaded strictly

The library half of this file loads a diffusers model folder into our own modules (`load_pipeline`);
the CLI half is one argparse with subcommands that call functions the tests call directly.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import checkpoint
import clip
import lora
import sampler
import train
import unet
from checkpoint import UserError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion model, as plain modules."""
    unet: unet.UNet2DCondition
    vae: unet.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: clip.CLIPTokenizer
    scheduler_config: dict = field(default_factory=dict)
    path: str = ""

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Text -> the text encoder's last hidden state (B, 77, D), the UNet's cross-attention context."""
        ids = self.tokenizer(prompts).to(self.text_encoder_device)
        return self.text_encoder(ids)

    @property
    def text_encoder_device(self):
        return next(self.text_encoder.parameters()).device


def load_pipeline(path, dtype=torch.float32, device="cpu", variant=None):
    """Load a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

    Every part loads strictly into our modules; `variant="fp16"` reads `*.fp16.safetensors`."""
    if not os.path.exists(path):
        raise UserError(f"model path {path} does not exist; pass --model a diffusers model folder.")
    if not os.path.isdir(path):
        raise UserError(f"model path {path} is a file; pass --model a diffusers model folder "
                        "(with unet/, vae/, text_encoder/, tokenizer/).")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, part)):
            raise UserError(f"{path} has no {part}/ folder; pass --model a diffusers model folder "
                            "(with unet/, vae/, text_encoder/, tokenizer/).")
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    return Pipeline(
        unet=unet.load_unet(os.path.join(path, "unet"), dtype, device, variant),
        vae=unet.load_vae(os.path.join(path, "vae"), dtype, device, variant),
        text_encoder=clip.load_text_encoder(os.path.join(path, "text_encoder"), dtype, device, variant),
        tokenizer=clip.load_tokenizer(os.path.join(path, "tokenizer")),
        scheduler_config=checkpoint.read_json(scheduler_path) if os.path.exists(scheduler_path) else {},
        path=path,
    )


# ----------------------------------------------------------------------------------------------------------
# NPO guidance (sec. 3.2 of the paper): one small function per idea.

def npo_multipliers(batch, alpha, beta, device="cpu"):
    """Eq. 10 as LoRA multipliers for one batched forward of [x_t (negative rows); x_t (positive rows)].

    The negative / unconditional rows run θ + α·η + β·δ, the positive rows θ + η:
        η: [α]*B + [1]*B,   δ: [β]*B + [0]*B.
    α = β = 1 is the authors' default; β = 0 is the weight-merge baseline (eq. 4); α = 1, δ absent is plain CFG.
    α and β may also hold one value per image (a sweep over α × β in one batch)."""
    ones = torch.ones(batch, device=device)
    alpha, beta = (torch.as_tensor(v, dtype=torch.float32, device=device).expand(batch) for v in (alpha, beta))
    return {"eta": torch.cat([alpha, ones]), "delta": torch.cat([beta, 0 * ones])}


def npo_denoiser(unet, neg_embeds, pos_embeds, guidance, alpha=1.0, beta=1.0):
    """The guided ε(x_t, t) of NPO with one copy of θ: a batched forward whose LoRA multipliers differ per row."""
    context = torch.cat([neg_embeds, pos_embeds])
    present = set(lora.offset_names(unet))
    weights = {k: v for k, v in npo_multipliers(len(pos_embeds), alpha, beta, pos_embeds.device).items() if k in present}

    def denoise(x, t):
        with lora.multipliers(unet, **weights):
            eps_neg, eps_pos = unet(torch.cat([x, x]), t, context).chunk(2)
        return sampler.cfg_combine(eps_neg, eps_pos, guidance)
    return denoise


def merged_unets(unet, alpha=1.0, beta=1.0):
    """The authors' way, kept as a reference: two full weight sets, θ+η for ε_pos and θ+α·η+β·δ for ε_neg."""
    present = set(lora.offset_names(unet))

    def build(weights):
        state = lora.merged_state_dict(unet, {k: v for k, v in weights.items() if k in present})
        model = checkpoint.build_on_meta(lambda: type(unet)(unet.config))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)
    return build({"eta": alpha, "delta": beta}), build({"eta": 1.0})


def merged_denoiser(unet_neg, unet_pos, neg_embeds, pos_embeds, guidance):
    """Two passes per step, one per weight set (what the authors' code runs)."""
    def denoise(x, t):
        return sampler.cfg_combine(unet_neg(x, t, neg_embeds), unet_pos(x, t, pos_embeds), guidance)
    return denoise


@torch.no_grad()
def generate(pipe, prompts, seeds, negative_prompt="", steps=50, guidance=7.5, ddim_eta=0.0, alpha=1.0, beta=1.0,
             height=None, width=None, mode="batched", unets=None, callback=None):
    """Prompts -> images (B, 3, H, W) in [-1, 1], with NPO guidance from the offsets named "eta" / "delta" on the UNet.

    Image i starts from `initial_latents(seeds[i])`, as diffusers' pipeline with a list of seeded CPU generators.
    mode "batched" (default): one forward of [x_t; x_t] per step with per-row LoRA multipliers (one copy of θ).
    mode "merged": the authors' two weight sets and two passes (pass `unets=merged_unets(...)` to reuse them).
    guidance <= 1 runs the positive branch alone (θ+η), as diffusers does."""
    scale = pipe.vae.downscale
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    cfg = sampler.pipeline_config(pipe.scheduler_config)
    dtype, device = next(pipe.unet.parameters()).dtype, next(pipe.unet.parameters()).device
    pos = pipe.encode_prompts(list(prompts)).to(dtype)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = sampler.initial_latents(gens, height, width, pipe.unet.config.in_channels, device, dtype, scale)
    if guidance <= 1:
        with lora.multipliers(pipe.unet, **{k: 1.0 if k == "eta" else 0.0 for k in lora.offset_names(pipe.unet)}):
            denoise = lambda x, t: pipe.unet(x, t, pos)  # noqa: E731
            latents = sampler.ddim_sample(denoise, latents, cfg, steps, ddim_eta, gens, callback)
    else:
        neg = pipe.encode_prompts([negative_prompt] * len(prompts)).to(dtype)
        if mode == "merged":
            unet_neg, unet_pos = unets or merged_unets(pipe.unet, alpha, beta)
            denoise = merged_denoiser(unet_neg, unet_pos, neg, pos, guidance)
        else:
            denoise = npo_denoiser(pipe.unet, neg, pos, guidance, alpha, beta)
        latents = sampler.ddim_sample(denoise, latents, cfg, steps, ddim_eta, gens, callback)
    return pipe.vae.decode(latents.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)


# ----------------------------------------------------------------------------------------------------------
# Images: tensors -> PIL, labelled grids, PNGs that carry their settings, written atomically.

def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (rounded as diffusers' numpy_to_pil does)."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def labelled_grid(images, rows, cols, row_labels=(), col_labels=(), title=None):
    """Paste `rows x cols` equal-sized PIL images into one picture with text labels on the top and left."""
    w, h = images[0].size
    font = ImageFont.load_default(size=max(10, min(w, h) // 16))
    left = max([int(font.getlength(t)) + 8 for t in row_labels], default=0)
    line = font.size + 8
    top = line * ((1 if col_labels else 0) + (1 if title else 0))
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.text((left + j * w + 4, top - line + 4), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        draw.text((4, top + i * h + h // 2 - font.size // 2), text, fill="black", font=font)
    for k, im in enumerate(images):
        grid.paste(im, (left + (k % cols) * w, top + (k // cols) * h))
    return grid


def save_png(image, path, parameters=None):
    """Write a PNG atomically (temporary name, then rename), with A1111's `parameters` text chunk."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    checkpoint.atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------------------------------------
# The command line.

def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def cmd_info(args):
    pipe = load_pipeline(args.model)
    for name in ("unet", "vae", "text_encoder"):
        print(f"{name:13s} {count_parameters(getattr(pipe, name)) / 1e6:8.1f}M parameters")
    print(f"scheduler     {pipe.scheduler_config or 'SD defaults'}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_prompts(args):
    """--prompt, or --prompts-file: a .txt with one prompt per line, or a .jsonl with a "prompt" per row."""
    if args.prompts_file is None:
        return [args.prompt]
    path = args.prompts_file
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({e}); pass a readable UTF-8 .txt or .jsonl file.")
    lines = [line for line in lines if line]
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} line {n} is not a JSON object with a \"prompt\"; fix or remove that line.")
        lines = prompts
    if not lines:
        raise UserError(f"the prompts file {path} holds no prompts; write one prompt per line.")
    return lines


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
    return f"{job['prompt']}\nNegative prompt: {args.negative_prompt}\n" + ", ".join(f"{k}: {v}" for k, v in settings.items())


def run_jobs(pipe, args, jobs, progress):
    """Generate every job (prompt, seed, α, β) in batches of --batch-size; returns PIL images in job order."""
    images, unets, unets_key = [], None, None
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        alpha, beta = [j["alpha"] for j in batch], [j["beta"] for j in batch]
        if args.mode == "merged":  # two weight sets per (α, β): build them once per distinct pair
            if len(set(zip(alpha, beta))) > 1:
                for job in batch:
                    images += run_jobs(pipe, argparse.Namespace(**{**vars(args), "batch_size": 1}), [job], progress)
                continue
            alpha, beta = alpha[0], beta[0]
            if unets_key != (alpha, beta):
                unets, unets_key = merged_unets(pipe.unet, alpha, beta), (alpha, beta)
        out = generate(pipe, [j["prompt"] for j in batch], [j["seed"] for j in batch], args.negative_prompt, args.steps,
                       args.guidance, args.ddim_eta, alpha, beta, args.height, args.width, args.mode, unets,
                       callback=lambda i, n, t: progress.step(i, n, len(batch)))
        images += to_pil(out)
        progress.images_done(len(batch))
    return images


def cmd_sample(args):
    # Everything a user can get wrong is checked before the model loads and any step runs.
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} {value} is not a positive multiple of 8; use e.g. 512.")
    for flag in ("n", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps} must be at least 1.")
    for path, flag in ((args.lora, "--lora"), (args.npo, "--npo")):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist; pass a LoRA .safetensors file.")
    sweep_a = parse_floats(args.sweep_alpha, "--sweep-alpha") if args.sweep_alpha else None
    sweep_b = parse_floats(args.sweep_beta, "--sweep-beta") if args.sweep_beta else None
    if (args.compare or sweep_b) and not args.npo:
        raise UserError("--compare and --sweep-beta show the effect of δ; pass the NPO offset with --npo.")
    for name, values in (("alpha", sweep_a or [args.alpha]), ("beta", sweep_b or [args.beta])):
        if any(not 0 <= v <= 1 for v in values):
            warn(f"{name} outside [0, 1] extrapolates beyond the paper's range (eq. 10).")
    prompts = read_prompts(args)
    sweep = sweep_a is not None or sweep_b is not None
    pictures = len(prompts) if (sweep or args.compare) else len(prompts) * args.n
    check_writable(args.out, pictures)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype == torch.float16 and args.device == "cpu":
        raise UserError("--dtype float16 is not supported on CPU; use bfloat16 or float32.")
    pipe = load_pipeline(args.model, dtype, args.device)
    if args.steps > sampler.DDIMConfig.from_dict(pipe.scheduler_config).num_train_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's {pipe.scheduler_config.get('num_train_timesteps', 1000)} "
                        "training timesteps; use fewer steps.")
    if args.lora:
        lora.load_lora(pipe.unet, args.lora, "eta")
    if args.npo:
        lora.load_lora(pipe.unet, args.npo, "delta")
    for p in set(prompts) | {args.negative_prompt}:
        if pipe.tokenizer.count_tokens(p) > pipe.tokenizer.max_length:
            warn(f"prompt is longer than {pipe.tokenizer.max_length} tokens and is truncated: {p[:60]!r}...")
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    size = ((args.width or pipe.unet.config.sample_size * pipe.vae.downscale),
            (args.height or pipe.unet.config.sample_size * pipe.vae.downscale))

    if sweep:
        alphas, betas = sweep_a or [args.alpha], sweep_b or [args.beta]
        jobs = [dict(prompt=p, seed=args.seed, alpha=a, beta=b) for p in prompts for a in alphas for b in betas]
    elif args.compare:
        jobs = [dict(prompt=p, seed=args.seed + k, alpha=a, beta=b)
                for k, p in enumerate(prompts) for a, b in ((1.0, 0.0), (args.alpha, args.beta))]
    else:
        jobs = [dict(prompt=p, seed=args.seed + i, alpha=args.alpha, beta=args.beta)
                for i, p in enumerate(q for q in prompts for _ in range(args.n))]
    progress = Progress(len(jobs))
    images = run_jobs(pipe, args, jobs, progress)
    if progress.tty:
        print(file=sys.stderr)

    def destination(k, name):
        return args.out if args.out.lower().endswith(".png") else os.path.join(args.out, name)

    written = []
    if sweep:
        per = len(alphas) * len(betas)
        for k, p in enumerate(prompts):
            grid = labelled_grid(images[k * per:(k + 1) * per], len(alphas), len(betas),
                                 [f"α={a:g}" for a in alphas], [f"β={b:g}" for b in betas], title=p[:80])
            written.append(destination(k, f"sweep-{k:04d}.png"))
            save_png(grid, written[-1], a1111_parameters(args, jobs[k * per], size))
    elif args.compare:
        for k, p in enumerate(prompts):
            grid = labelled_grid(images[2 * k:2 * k + 2], 1, 2, (),
                                 ["without NPO", f"with NPO (α={args.alpha:g}, β={args.beta:g})"], title=p[:80])
            written.append(destination(k, f"compare-{k:04d}-seed{jobs[2 * k]['seed']}.png"))
            save_png(grid, written[-1], a1111_parameters(args, jobs[2 * k + 1], size))
    else:
        for k, (job, image) in enumerate(zip(jobs, images)):
            written.append(destination(k, f"{k:05d}-seed{job['seed']}.png"))
            save_png(image, written[-1], a1111_parameters(args, job, size))
    print(f"wrote {len(written)} image{'s' * (len(written) != 1)} to {args.out}", file=sys.stderr)
    return written


def cmd_train(args):
    return train.main(args, load_pipeline, generate)


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
    p.add_argument("--negative-prompt", default="", help="the negative prompt c' of the unconditional branch (default: empty)")
    p.add_argument("--lora", help="the preference offset η (LoRA .safetensors, kohya or diffusers/peft format)")
    p.add_argument("--npo", help="the NPO offset δ (LoRA .safetensors), used on the unconditional branch")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of η on the unconditional branch (eq. 10; default 1)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of δ on the unconditional branch (eq. 10; default 1)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale g: ε = ε_neg + g·(ε_pos − ε_neg) (default 7.5)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM stochasticity η_ddim (0 deterministic, 1 DDPM-like)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet forward (default 1)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
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
    import experiment  # it imports this module, so it is imported here rather than at the top
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
