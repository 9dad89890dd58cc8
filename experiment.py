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
Everything goes to --out: `results.json`, `results.md` (the tables), `heatmap.png`, `compare.png`, and the run
folders of the three trainings.
"""
import json
import math
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import lora
import npo
import shapes
import train

HELD_OUT = ("a green triangle", "a yellow square")  # never in the training pairs


def add_arguments(p):
    p.add_argument("--model", default=npo.DEFAULT_MODEL, help="model folder (default: the embedded shapes model)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--pairs-per-prompt", type=int, default=24, help="AI-feedback pairs per training prompt")
    p.add_argument("--train-steps", type=int, default=300, help="DPO / NPO optimizer steps")
    p.add_argument("--reward-steps", type=int, default=100, help="steps of the 1 − R reward training (0: skip it)")
    p.add_argument("--eval-seeds", type=int, default=16, help="held-out seeds per prompt in the evaluation")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of every sample")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of every sample")


def score(pipe, prompts, seeds, args, alpha=1.0, beta=1.0, batch=48):
    """Sample each (prompt, seed) and score it with the shapes reward; returns the rewards and the images."""
    rewards, images = [], []
    for i in range(0, len(prompts), batch):
        x = npo.generate(pipe, prompts[i:i + batch], seeds[i:i + batch], steps=args.steps, guidance=args.guidance,
                         alpha=alpha, beta=beta)
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        rewards.append(shapes.reward(x, prompts[i:i + batch]))
        images.append(x)
    return torch.cat(rewards), torch.cat(images)


def with_offsets(model, eta=None, delta=None):
    pipe = npo.load_pipeline(model)
    for name, path in (("eta", eta), ("delta", delta)):
        if path:
            lora.load_lora(pipe.unet, path, name)
    return pipe


def save_image(tensor, path):
    pixels = (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)


def make_pairs(args, out):
    """Two base samples per (prompt, pair index), labelled by the reward; written as a pairs.jsonl dataset."""
    folder = os.path.join(out, "pairs")
    os.makedirs(folder, exist_ok=True)
    train_prompts = [p for p in shapes.prompts() if p not in HELD_OUT]
    prompts = [p for p in train_prompts for _ in range(args.pairs_per_prompt)]
    seeds = [args.seed * 1_000_000 + 2 * i for i in range(len(prompts))]
    pipe = npo.load_pipeline(args.model)
    r0, x0 = score(pipe, prompts, seeds, args)
    r1, x1 = score(pipe, prompts, [s + 1 for s in seeds], args)
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        if abs(r0[i] - r1[i]) < 0.02:
            ties += 1
            continue
        (win, lose) = (x0[i], x1[i]) if r0[i] > r1[i] else (x1[i], x0[i])
        save_image(win, os.path.join(folder, f"{i:05d}-w.png"))
        save_image(lose, os.path.join(folder, f"{i:05d}-l.png"))
        rows.append({"prompt": prompt, "chosen": f"{i:05d}-w.png", "rejected": f"{i:05d}-l.png"})
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return os.path.join(folder, "pairs.jsonl"), len(rows), ties, torch.cat([r0, r1]).mean().item()


def run_training(args, out, name, flags):
    folder = os.path.join(out, name)
    if os.path.exists(os.path.join(folder, "lora.safetensors")):
        return os.path.join(folder, "lora.safetensors")  # done in an earlier run of the experiment
    argv = ["train", "--model", args.model, "--out", folder, "--seed", str(args.seed), "--checkpoint-every", "0",
            "--log-every", "50", "--rank", "8", *flags]
    return train.main(npo.build_parser().parse_args(argv), npo.load_pipeline)


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
    image.save(path)


def main(args):
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    say = lambda m: print(f"[{time.time() - start:5.0f} s] {m}", flush=True)  # noqa: E731
    torch.manual_seed(args.seed)

    pairs, n_pairs, ties, base_train_reward = make_pairs(args, out)
    say(f"{n_pairs} AI-feedback pairs ({ties} near-ties dropped), base reward on training prompts {base_train_reward:.3f}")
    dpo = ["--data", pairs, "--steps", str(args.train_steps), "--batch-size", "8", "--lr", "1e-4",
           "--beta-dpo", "500", "--cache-latents", "--caption-dropout", "0.1"]
    eta = run_training(args, out, "dpo", dpo)
    say(f"trained η (DPO): {eta}")
    delta = run_training(args, out, "npo", dpo + ["--npo"])
    say(f"trained δ (NPO, pairs swapped): {delta}")
    delta_r = None
    if args.reward_steps:
        prompts_file = os.path.join(out, "train-prompts.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(p for p in shapes.prompts() if p not in HELD_OUT) + "\n")
        delta_r = run_training(args, out, "npo-reward", [
            "--method", "reward", "--npo", "--reward", "shapes:reward", "--prompts-file", prompts_file,
            "--steps", str(args.reward_steps), "--batch-size", "4", "--lr", "1e-4", "--sample-steps", str(args.steps),
            "--grad-steps", "1", "--guidance", str(args.guidance)])
        say(f"trained δ' (NPO, reward 1 − R): {delta_r}")

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
    results, samples = {}, {}
    for name, (e, d, a, b) in configs.items():
        r, x = score(with_offsets(args.model, e, d), prompts, seeds, args, alpha=a, beta=b)
        results[name], samples[name] = r, x
        say(f"{name}: mean reward {r.mean():.4f}")

    # α × β heat map with η and δ (fig. 10), on 4 seeds per prompt
    alphas, betas = [0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.5]
    few = [i for i in range(len(prompts)) if seeds[i] % 1_000 < 4]
    both = with_offsets(args.model, eta, delta)
    grid = [[score(both, [prompts[i] for i in few], [seeds[i] for i in few], args, a, b)[0].mean().item()
             for b in betas] for a in alphas]
    heatmap(grid, alphas, betas, os.path.join(out, "heatmap.png"), "mean reward, DPO eta + NPO delta")

    # samples: one seed per prompt, each configuration a row
    shown = [i for i in range(len(prompts)) if seeds[i] % 1_000 == 0]
    names = ["base", "base + NPO", "DPO", "DPO + NPO"]
    tiles = [im.resize((128, 128), Image.NEAREST) for im in npo.to_pil(torch.stack(
        [samples[n][i] * 2 - 1 for n in names for i in shown]))]
    picture = npo.labelled_grid(tiles, len(names), len(shown), row_labels=names,
                                col_labels=[prompts[i].removeprefix("a ") for i in shown])
    picture.save(os.path.join(out, "compare.png"))

    report = write_report(args, out, results, held, grid, alphas, betas, n_pairs, ties, time.time() - start)
    say(f"wrote {report}")
    return results


def write_report(args, out, results, held, grid, alphas, betas, n_pairs, ties, seconds):
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
    lines += ["", f"{n_pairs} training pairs ({ties} near-ties dropped); {args.train_steps} DPO / NPO steps; "
              f"{args.reward_steps} reward steps; {args.steps} DDIM steps at guidance {args.guidance:g}; "
              f"seed {args.seed}; {seconds / 60:.1f} minutes."]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: v.tolist() for k, v in results.items()} | {"heatmap": grid}, f)
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
