"""The paper's experiment in miniature, on the embedded shapes model: does NPO improve preference-aligned sampling?

    python npo.py experiment --out results            # about 10 minutes on 2 CPU cores; seeded

1. AI-feedback pairs (as Diffusion-DPO's --choice_model): for each training prompt, two samples of the base model
   at different seeds, the one with the higher `shapes.reward` preferred (near-ties dropped).
2. Train η with Diffusion-DPO on the pairs and δ with NPO, the same pairs swapped (eq. 8); and δ' by reward
   training on 1 − R (eq. 7).
3. Evaluate on held-out seeds (two of the prompts never seen in training): base, base + NPO, DPO, DPO + NPO and the
   weight-merge baseline (eq. 4, α = 0.6, β = 0), each image scored by the reward. Mean reward with a 95%
   confidence interval, pairwise win rates at identical seeds (tables 1 and 4 of the paper), an α × β heat map of
   the mean reward (fig. 10) and a grid of samples.
Everything goes to --out: `results.json`, `results.md` (the tables), `heatmap.png`, `compare.png`, and the work
that made them. Every piece of work is keyed by the settings that made it (`key`): the pairs in `pairs-KEY/`, each
training in `NAME-KEY/`, each evaluated row in `eval/ROW-KEY.json`. Run the same command again after an
interruption and it continues where it stopped (finished pieces are reused, an interrupted training resumes from
its last checkpoint); change a setting and only the work it affects is redone. Every file is written atomically.
"""
import hashlib
import json
import math
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import checkpoint
import images
import lora
import pipeline
import shapes
import train

HELD_OUT = ("a green triangle", "a yellow square")  # never in the training pairs


def add_arguments(p):
    p.add_argument("--model", default=pipeline.DEFAULT_MODEL, help="model folder (default: the embedded shapes model)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--pairs-per-prompt", type=int, default=24, help="AI-feedback pairs per training prompt")
    p.add_argument("--train-steps", type=int, default=300, help="DPO / NPO optimizer steps")
    p.add_argument("--reward-steps", type=int, default=100, help="steps of the 1 − R reward training (0: skip it)")
    p.add_argument("--eval-seeds", type=int, default=16, help="held-out seeds per prompt in the evaluation")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of every sample")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of every sample")


def key(*parts):
    """A short hash of the settings that make a piece of work: its folder or file name carries it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path, value):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(value).encode()))


def score(pipe, prompts, seeds, args, alpha=1.0, beta=1.0, batch=48):
    """Sample each (prompt, seed) and score it with the shapes reward; returns the rewards and the images."""
    rewards, pictures = [], []
    for i in range(0, len(prompts), batch):
        x = pipeline.generate(pipe, prompts[i:i + batch], seeds[i:i + batch], steps=args.steps,
                              guidance=args.guidance, alpha=alpha, beta=beta)
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        rewards.append(shapes.reward(x, prompts[i:i + batch]))
        pictures.append(x)
    return torch.cat(rewards), torch.cat(pictures)


def with_offsets(model, eta=None, delta=None):
    pipe = pipeline.load_pipeline(model)
    for name, path in (("eta", eta), ("delta", delta)):
        if path:
            lora.load_lora(pipe.unet, path, name)
    return pipe


def make_pairs(args, out, model_key):
    """Two base samples per (prompt, pair index), labelled by the reward; written as a pairs.jsonl dataset in
    `pairs-KEY/` (pairs.jsonl last, so its presence means the folder is complete). Returns (path, summary)."""
    folder = os.path.join(out, "pairs-" + key(model_key, args.seed, args.pairs_per_prompt, args.steps,
                                               args.guidance, HELD_OUT))
    path, summary_path = os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "summary.json")
    if os.path.exists(path):
        return path, checkpoint.read_json(summary_path)
    os.makedirs(folder, exist_ok=True)
    train_prompts = [p for p in shapes.prompts() if p not in HELD_OUT]
    prompts = [p for p in train_prompts for _ in range(args.pairs_per_prompt)]
    seeds = [args.seed * 1_000_000 + 2 * i for i in range(len(prompts))]
    pipe = pipeline.load_pipeline(args.model)
    r0, x0 = score(pipe, prompts, seeds, args)
    r1, x1 = score(pipe, prompts, [s + 1 for s in seeds], args)
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        if abs(r0[i] - r1[i]) < 0.02:
            ties += 1
            continue
        (win, lose) = (x0[i], x1[i]) if r0[i] > r1[i] else (x1[i], x0[i])
        for name, picture in ((f"{i:05d}-w.png", win), (f"{i:05d}-l.png", lose)):
            images.save_png(images.to_pil(picture[None] * 2 - 1)[0], os.path.join(folder, name))
        rows.append({"prompt": prompt, "chosen": f"{i:05d}-w.png", "rejected": f"{i:05d}-l.png"})
    summary = {"pairs": len(rows), "ties": ties, "base_reward": torch.cat([r0, r1]).mean().item()}
    write_json(summary_path, summary)
    checkpoint.atomic_write(path, lambda f: f.write(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    return path, summary


def run_training(args, out, name, flags, model_key, pairs_key=None):
    """One training in `NAME-KEY/`: reused when its result exists, resumed from its last checkpoint when an
    earlier run of the experiment was interrupted, started otherwise."""
    folder = os.path.join(out, f"{name}-{key(model_key, args.seed, flags, pairs_key)}")
    result = os.path.join(folder, "lora.safetensors")
    if os.path.exists(result):
        return result
    argv = ["--model", args.model, "--out", folder, "--seed", str(args.seed), "--checkpoint-every", "25",
            "--log-every", "50", "--rank", "8", "--resume", "latest", *flags]
    return train.main(train.parse_args(argv))


def evaluated(out, name, settings, compute):
    """`compute()`'s list of numbers, cached in eval/NAME-KEY.json (KEY from `settings`)."""
    path = os.path.join(out, "eval", f"{name.replace(' ', '_')}-{key(settings)}.json")
    if os.path.exists(path):
        return torch.tensor(checkpoint.read_json(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = compute()
    write_json(path, values.tolist())
    return values


def interval(r):
    """Mean and the half-width of its 95% confidence interval (normal approximation)."""
    r = r.double()
    return r.mean().item(), 1.96 * r.std().item() / math.sqrt(len(r))


def win_rate(a, b):
    """How often a scores above b at the same prompt and seed (ties count half)."""
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def heatmap(values, alphas, betas, path, title):
    """A labelled α (rows) × β (columns) grid of mean rewards, colored from low (dark) to high (light). (The labels
    are spelled out: PIL's built-in font has no Greek letters.)"""
    cell, pad = 64, 70
    lo, hi = min(map(min, values)), max(map(max, values))
    image = Image.new("RGB", (pad + cell * len(betas), pad + cell * len(alphas) + 20), "white")
    pen, font = ImageDraw.Draw(image), ImageFont.load_default()
    pen.text((4, 4), title, fill="black", font=font)
    for j, b in enumerate(betas):
        pen.text((pad + j * cell + 10, pad - 18), f"beta={b:g}", fill="black", font=font)
    for i, a in enumerate(alphas):
        pen.text((4, pad + i * cell + 26), f"alpha={a:g}", fill="black", font=font)
        for j in range(len(betas)):
            v = values[i][j]
            level = (v - lo) / (hi - lo) if hi > lo else 0.5
            color = (int(40 + 200 * level), int(60 + 160 * level), int(120 + 60 * (1 - level)))
            box = [pad + j * cell, pad + i * cell, pad + (j + 1) * cell - 2, pad + (i + 1) * cell - 2]
            pen.rectangle(box, fill=color)
            pen.text((box[0] + 12, box[1] + 26), f"{v:.3f}", fill="black" if level > 0.5 else "white", font=font)
    images.save_png(image, path)


def main(args):
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    say = lambda m: print(f"[{time.time() - start:5.0f} s] {m}", flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    model_key = (os.path.abspath(args.model), train.model_fingerprint(pipeline.load_pipeline(args.model).unet))

    pairs, summary = make_pairs(args, out, model_key)
    say(f"{summary['pairs']} AI-feedback pairs ({summary['ties']} near-ties dropped), base reward on training "
        f"prompts {summary['base_reward']:.3f}")
    eta, delta, delta_r = train_offsets(args, out, model_key, pairs, say)

    # ---- evaluation at held-out seeds ---------------------------------------------------------------------------
    prompts = [p for p in shapes.prompts() for _ in range(args.eval_seeds)]
    seeds = [10_000 + args.seed * 1_000 + k for _ in shapes.prompts() for k in range(args.eval_seeds)]
    held = torch.tensor([p in HELD_OUT for p in prompts])
    configs = {
        "base": (None, None, 1.0, 1.0),
        "base + NPO": (None, delta, 1.0, 1.0),
        "DPO": (eta, None, 1.0, 1.0),
        "DPO + NPO": (eta, delta, 1.0, 1.0),
        "weight merge (α=0.6, β=0)": (eta, None, 0.6, 0.0),
    }
    if delta_r:
        configs["base + NPO (1 − R)"] = (None, delta_r, 1.0, 1.0)
        configs["DPO + NPO (1 − R)"] = (eta, delta_r, 1.0, 1.0)
    results = {}
    for name, (e, d, a, b) in configs.items():
        results[name] = evaluated(out, name, (model_key, e, d, a, b, prompts, seeds, args.steps, args.guidance),
                                  lambda: score(with_offsets(args.model, e, d), prompts, seeds, args, a, b)[0])
        say(f"{name}: mean reward {results[name].mean():.4f}")

    grid, alphas, betas = alpha_beta_grid(args, out, model_key, eta, delta, prompts, seeds)
    heatmap(grid, alphas, betas, os.path.join(out, "heatmap.png"), "mean reward, DPO eta + NPO delta")
    sample_grid(args, out, configs, prompts, seeds)
    report = write_report(args, out, results, held, grid, alphas, betas, summary, time.time() - start)
    say(f"wrote {report}")
    return results


def train_offsets(args, out, model_key, pairs, say):
    """η by DPO and δ by NPO on the pairs, and δ' by reward training on 1 − R (None with --reward-steps 0)."""
    pairs_key = checkpoint.read_json(os.path.join(os.path.dirname(pairs), "summary.json"))
    dpo = ["--data", pairs, "--steps", str(args.train_steps), "--batch-size", "8", "--lr", "1e-4",
           "--beta-dpo", "500", "--cache-latents", "--caption-dropout", "0.1"]
    eta = run_training(args, out, "dpo", dpo, model_key, pairs_key)
    say(f"trained η (DPO): {eta}")
    delta = run_training(args, out, "npo", dpo + ["--npo"], model_key, pairs_key)
    say(f"trained δ (NPO, pairs swapped): {delta}")
    if not args.reward_steps:
        return eta, delta, None
    prompts_file = os.path.join(out, "train-prompts.txt")
    text = "\n".join(p for p in shapes.prompts() if p not in HELD_OUT) + "\n"
    checkpoint.atomic_write(prompts_file, lambda f: f.write(text.encode()))
    delta_r = run_training(args, out, "npo-reward", [
        "--method", "reward", "--npo", "--reward", "shapes:reward", "--prompts-file", prompts_file,
        "--steps", str(args.reward_steps), "--batch-size", "4", "--lr", "1e-4", "--sample-steps", str(args.steps),
        "--grad-steps", "1", "--guidance", str(args.guidance)], model_key, text)
    say(f"trained δ' (NPO, reward 1 − R): {delta_r}")
    return eta, delta, delta_r


def alpha_beta_grid(args, out, model_key, eta, delta, prompts, seeds):
    """Mean reward over α (rows) × β (columns) with η and δ (fig. 10), on 4 seeds per prompt."""
    alphas, betas = [0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.5]
    few = [i for i in range(len(prompts)) if seeds[i] % 1_000 < 4]
    few_prompts, few_seeds = [prompts[i] for i in few], [seeds[i] for i in few]
    both = None
    grid = []
    for a in alphas:
        row = []
        for b in betas:
            def compute(a=a, b=b):
                nonlocal both
                both = both or with_offsets(args.model, eta, delta)
                return score(both, few_prompts, few_seeds, args, a, b)[0]
            settings = (model_key, eta, delta, a, b, few_prompts, few_seeds, args.steps, args.guidance)
            row.append(evaluated(out, f"heat-{a:g}-{b:g}", settings, compute).mean().item())
        grid.append(row)
    return grid, alphas, betas


def sample_grid(args, out, configs, prompts, seeds):
    """compare.png: one seed per prompt, the first four configurations as rows."""
    shown = [i for i in range(len(prompts)) if seeds[i] % 1_000 == 0]
    names = ["base", "base + NPO", "DPO", "DPO + NPO"]
    tiles = []
    for name in names:
        e, d, a, b = configs[name]
        x = score(with_offsets(args.model, e, d), [prompts[i] for i in shown], [seeds[i] for i in shown], args, a, b)[1]
        tiles += [im.resize((128, 128), Image.NEAREST) for im in images.to_pil(x * 2 - 1)]
    picture = images.labelled_grid(tiles, len(names), len(shown), row_labels=names,
                                   col_labels=[prompts[i].removeprefix("a ") for i in shown])
    images.save_png(picture, os.path.join(out, "compare.png"))


def write_report(args, out, results, held, grid, alphas, betas, summary, seconds):
    lines = [f"Held-out seeds: {args.eval_seeds} per prompt, 12 prompts ({len(held)} images per row; "
             f"{', '.join(HELD_OUT)} never trained on). Reward = `shapes.reward` in [0, 1]; ± is a 95% interval.",
             "", "| sampling | mean reward | ± | held-out prompts only | win rate vs base | vs DPO |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        mean, half = interval(r)
        lines.append(f"| {name} | {mean:.4f} | {half:.4f} | {r[held].mean():.4f} | "
                     f"{win_rate(r, results['base']):.3f} | {win_rate(r, results['DPO']):.3f} |")
    lines += ["", "Pairwise win rates at identical prompts and seeds (row beats column; ties count half):", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for a, ra in results.items():
        lines.append(f"| {a} | " + " | ".join("-" if a == b else f"{win_rate(ra, rb):.3f}"
                                               for b, rb in results.items()) + " |")
    lines += ["", "Mean reward over α (rows) × β (columns), DPO η and NPO δ, 4 seeds per prompt:", "",
              "| α \\ β | " + " | ".join(f"{b:g}" for b in betas) + " |", "|---|" + "---|" * len(betas)]
    lines += [f"| {a:g} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for a, row in zip(alphas, grid)]
    lines += ["", f"{summary['pairs']} training pairs ({summary['ties']} near-ties dropped); {args.train_steps} DPO / NPO steps; "
              f"{args.reward_steps} reward steps; {args.steps} DDIM steps at guidance {args.guidance:g}; "
              f"seed {args.seed}; {seconds / 60:.1f} minutes."]
    write_json(os.path.join(out, "results.json"), {k: v.tolist() for k, v in results.items()} | {"heatmap": grid})
    path = os.path.join(out, "results.md")
    checkpoint.atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path
