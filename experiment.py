"""The paper's experiment in miniature, on the embedded shapes model: does NPO improve preference-aligned sampling?

    python npo.py experiment --out results            # 55 minutes on one thread here (EXPERIMENT.md); seeded
    python npo.py experiment --out results --quick    # a small version (one seed, fewer steps and images)

For each training seed (three by default):
1. AI-feedback pairs (as Diffusion-DPO's --choice_model): for each training prompt, two samples of the base model
   at different seeds, the one with the higher `shapes.reward` preferred (near-ties dropped). This reward is the
   only preference signal training ever sees.
2. Train η with Diffusion-DPO on the pairs and δ with NPO, the same pairs swapped (eq. 8); and δ' by reward
   training on 1 − R (eq. 7). Before that, once, a learning-rate sweep of the 1 − R training shows what it takes
   to move the model (the mean reward on the training prompts and the gradient norms at each rate).
3. Evaluate on held-out sampling seeds (two of the 12 prompts never trained on): base, base + NPO, DPO, DPO + NPO,
   the weight-merge baseline (eq. 4, α = 0.6, β = 0) and the 1 − R rows, each image judged four ways: the reward
   that labelled the pairs, and three judges that training never saw (shapes.py): the pixel checker's verdict on
   color and shape, edge sharpness, background noise. Means with 95% intervals, win rates at identical prompts
   and seeds (tables 1 and 4 of the paper), and whether each NPO effect has the same sign at every training seed.
   An α × β heat map of the mean reward (fig. 10) and a grid of samples, for the first seed.
Everything goes to --out: `results.json`, `results.md` (the tables), `heatmap.png`, `compare.png`, and the work
that made them. Every piece of work is keyed by the settings that made it (`key`): the pairs in `pairs-KEY/`, each
training in `NAME-KEY/`, each evaluated row in `eval/ROW-KEY.json`. Run the same command again after an
interruption and it continues where it stopped (finished pieces are reused, an interrupted training resumes from
its last checkpoint); change a setting and only the work it affects is redone. Every file is written atomically.
"""
import argparse
import hashlib
import json
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint
from . import evaluate
from . import guided
from . import images
from . import lora
from . import machinery
from . import pipeline
from . import shapes
from . import train
from . import trainconfig

HELD_OUT = ("a green triangle", "a yellow square")  # never in the training pairs
# Each judge: (function(images in [0, 1], prompts) -> (B,), higher is better?). Only "reward" labelled the pairs.
JUDGES = {
    "reward": (shapes.reward, True),
    "correct": (shapes.correct, True),
    "sharpness": (shapes.edge_sharpness, True),
    "background noise": (shapes.background_noise, False),
}
# The NPO rows and the row each is compared with.
NPO_EFFECTS = {"base + NPO": "base", "DPO + NPO": "DPO", "base + NPO (1 − R)": "base", "DPO + NPO (1 − R)": "DPO"}


def add_arguments(p):
    p.add_argument("--model", default=pipeline.DEFAULT_MODEL, help="model folder (default: the embedded shapes model)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated: the whole protocol runs once "
                                                    "per seed (default 0,1,2)")
    p.add_argument("--pairs-per-prompt", type=int, default=24, help="AI-feedback pairs per training prompt")
    p.add_argument("--train-steps", type=int, default=300, help="DPO / NPO optimizer steps")
    p.add_argument("--reward-steps", type=int, default=100, help="steps of the 1 − R reward training (0: skip it)")
    p.add_argument("--reward-lr", type=checkpoint.finite_float, default=1e-3, help="learning rate of the 1 − R reward training")
    p.add_argument("--lr-sweep", default="1e-4,1e-3,3e-3", help="learning rates of the 1 − R sweep ('' to skip)")
    p.add_argument("--eval-seeds", type=int, default=8, help="held-out sampling seeds per prompt and training seed")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of every sample")
    p.add_argument("--guidance", type=checkpoint.finite_float, default=5.0, help="CFG scale of every sample")
    p.add_argument("--quick", action="store_true",
                   help="a small version: seed 0 only, 8 pairs per prompt, 60 + 30 steps, 3 eval seeds, no sweep")


def key(*parts):
    """A short hash of the settings that make a piece of work: its folder or file name carries it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path, value):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(value).encode()))


def sample(pipe, prompts, seeds, args, alpha=1.0, beta=1.0, batch=48):
    """Sample each (prompt, seed): images (B, 3, H, W) in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        x = guided.generate(pipe, prompts[i:i + batch], seeds[i:i + batch], steps=args.steps,
                              guidance=args.guidance, alpha=alpha, beta=beta)
        out.append((x.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def judged(pictures, prompts):
    """Every judge's score of every picture: {judge: (B,)}."""
    with torch.no_grad():
        return {name: fn(pictures, prompts).detach() for name, (fn, _) in JUDGES.items()}


def with_offsets(model, eta=None, delta=None):
    pipe = pipeline.load_pipeline(model)
    for name, path in (("eta", eta), ("delta", delta)):
        if path:
            lora.load_lora(pipe.unet, path, name)
    return pipe


def make_pairs(args, out, model_key, seed):
    """Two base samples per (prompt, pair index), labelled by the reward; written as a pairs.jsonl dataset in
    `pairs-KEY/` (pairs.jsonl last, so its presence means the folder is complete). Returns (path, summary)."""
    folder = os.path.join(out, "pairs-" + key(model_key, seed, args.pairs_per_prompt, args.steps, args.guidance,
                                               HELD_OUT))
    path, summary_path = os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "summary.json")
    if os.path.exists(path):
        return path, checkpoint.read_json(summary_path)
    os.makedirs(folder, exist_ok=True)
    train_prompts = [p for p in shapes.prompts() if p not in HELD_OUT]
    prompts = [p for p in train_prompts for _ in range(args.pairs_per_prompt)]
    seeds = [seed * 1_000_000 + 2 * i for i in range(len(prompts))]
    pipe = pipeline.load_pipeline(args.model)
    x0, x1 = sample(pipe, prompts, seeds, args), sample(pipe, prompts, [s + 1 for s in seeds], args)
    r0, r1 = shapes.reward(x0, prompts), shapes.reward(x1, prompts)
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


def run_training(args, out, name, settings, model_key, seed):
    """One training (`settings`: TrainConfig fields) in `NAME-KEY/`: reused when its result exists, resumed from its
    last checkpoint when an earlier run of the experiment was interrupted, started otherwise."""
    folder = os.path.join(out, f"{name}-{key(model_key, seed, settings)}")
    result = os.path.join(folder, "lora.safetensors")
    if os.path.exists(result):
        return result
    return train.train(trainconfig.TrainConfig(model=args.model, out=folder, seed=seed, checkpoint_every=25,
                                               log_every=10, rank=8, resume="latest", **settings))


def reward_settings(args, lr, steps, prompts_file):
    return dict(method="reward", npo=True, reward="shapes:reward", prompts_file=prompts_file, steps=steps,
                batch_size=4, lr=lr, sample_steps=args.steps, grad_steps=1, guidance=args.guidance)


def evaluated(out, name, settings, compute):
    """`compute()`'s {judge: (B,)} scores, cached in eval/NAME-KEY.json (KEY from `settings`)."""
    path = os.path.join(out, "eval", f"{name.replace(' ', '_')}-{key(settings)}.json")
    if os.path.exists(path):
        return {k: torch.tensor(v) for k, v in checkpoint.read_json(path).items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scores = compute()
    write_json(path, {k: v.tolist() for k, v in scores.items()})
    return scores


def win_rate(a, b, higher=True):
    """How often a scores better than b at the same prompt and seed, ties counting half (evaluate.win_rate, for
    judges where lower is better too)."""
    return (evaluate.win_rate(a, b) if higher else evaluate.win_rate(-a, -b))[0]


# ----------------------------------------------------------------------------------------------------------
# The protocol.

def main(args):
    start = time.time()
    if args.quick:
        args.seeds, args.pairs_per_prompt, args.train_steps, args.reward_steps = "0", 8, 60, 30
        args.eval_seeds, args.lr_sweep = 3, ""
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    say = lambda m: print(f"[{time.time() - start:5.0f} s] {m}", flush=True)  # noqa: E731
    model_key = (os.path.abspath(args.model), machinery.model_fingerprint(pipeline.load_pipeline(args.model).unet))
    prompts_file = os.path.join(out, "train-prompts.txt")
    text = "\n".join(p for p in shapes.prompts() if p not in HELD_OUT) + "\n"
    checkpoint.atomic_write(prompts_file, lambda f: f.write(text.encode()))

    sweep = lr_sweep(args, out, model_key, seeds[0], prompts_file, say)
    per_seed, summaries, first = {}, {}, None
    for seed in seeds:
        pairs, summaries[seed] = make_pairs(args, out, model_key, seed)
        say(f"seed {seed}: {summaries[seed]['pairs']} AI-feedback pairs ({summaries[seed]['ties']} near-ties dropped)")
        offsets = train_offsets(args, out, model_key, seed, pairs, prompts_file, say)
        per_seed[seed] = evaluate_seed(args, out, model_key, seed, offsets, say)
        first = first or offsets
    prompts, eval_seeds = eval_prompts_and_seeds(args, seeds[0])
    grid, alphas, betas = alpha_beta_grid(args, out, model_key, first, prompts, eval_seeds)
    heatmap(grid, alphas, betas, os.path.join(out, "heatmap.png"), "mean reward, DPO eta + NPO delta (seed %d)" % seeds[0])
    sample_grid(args, out, first, prompts, eval_seeds)
    report = write_report(args, out, seeds, per_seed, summaries, sweep, (grid, alphas, betas), time.time() - start)
    say(f"wrote {report}")
    return per_seed


def train_offsets(args, out, model_key, seed, pairs, prompts_file, say):
    """η by DPO and δ by NPO on the pairs, and δ' by reward training on 1 − R (None with --reward-steps 0)."""
    dpo = dict(data=pairs, steps=args.train_steps, batch_size=8, lr=1e-4, beta_dpo=500.0, cache_latents=True,
               caption_dropout=0.1)
    eta = run_training(args, out, "dpo", dpo, model_key, seed)
    delta = run_training(args, out, "npo", dict(dpo, npo=True), model_key, seed)
    delta_r = None
    if args.reward_steps:
        delta_r = run_training(args, out, "npo-reward", reward_settings(args, args.reward_lr, args.reward_steps,
                                                                     prompts_file), model_key, seed)
    say(f"seed {seed}: trained η (DPO) {eta}, δ (NPO) {delta}, δ' (1 − R) {delta_r}")
    return {"eta": eta, "delta": delta, "delta_r": delta_r}


def lr_sweep(args, out, model_key, seed, prompts_file, say):
    """1 − R training at each --lr-sweep rate: {lr: (mean reward of base + δ' on the training prompts, mean
    gradient norm, mean logged reward of the last logged steps)}: does this training move the model, and how far?"""
    try:
        rates = [checkpoint.finite_float(v) for v in args.lr_sweep.split(",") if v.strip()] if args.reward_steps else []
    except (ValueError, argparse.ArgumentTypeError):
        raise checkpoint.UserError(f"--lr-sweep {args.lr_sweep!r} is not a comma-separated list of finite numbers; "
                                   "pass e.g. 1e-4,1e-3.") from None
    prompts = [p for p in shapes.prompts() if p not in HELD_OUT for _ in range(4)]
    seeds = [50_000 + k for k in range(len(prompts))]
    results = {}
    for lr in rates:
        path = run_training(args, out, "npo-reward", reward_settings(args, lr, args.reward_steps, prompts_file),
                            model_key, seed)
        log = [json.loads(line) for line in open(os.path.join(os.path.dirname(path), "log.jsonl"))]
        log = [line for line in log if "grad_norm" in line]
        scores = evaluated(out, f"sweep-{lr:g}", (model_key, path, prompts, seeds, args.steps, args.guidance),
                           lambda: judged(sample(with_offsets(args.model, None, path), prompts, seeds, args), prompts))
        results[lr] = (scores["reward"].mean().item(), sum(x["grad_norm"] for x in log) / len(log), log[-1]["reward"])
        say(f"1 − R at lr {lr:g}: base + δ' reward {results[lr][0]:.4f}, mean grad norm {results[lr][1]:.3g}")
    return results


def eval_prompts_and_seeds(args, seed):
    prompts = [p for p in shapes.prompts() for _ in range(args.eval_seeds)]
    seeds = [10_000 + seed * 1_000 + k for _ in shapes.prompts() for k in range(args.eval_seeds)]
    return prompts, seeds


def evaluate_seed(args, out, model_key, seed, offsets, say):
    """{row: {judge: (N,)}} for one training seed, at held-out sampling seeds."""
    prompts, seeds = eval_prompts_and_seeds(args, seed)
    eta, delta, delta_r = offsets["eta"], offsets["delta"], offsets["delta_r"]
    configs = {"base": (None, None, 1.0, 1.0), "base + NPO": (None, delta, 1.0, 1.0), "DPO": (eta, None, 1.0, 1.0),
               "DPO + NPO": (eta, delta, 1.0, 1.0), "weight merge (α=0.6, β=0)": (eta, None, 0.6, 0.0)}
    if delta_r:
        configs.update({"base + NPO (1 − R)": (None, delta_r, 1.0, 1.0), "DPO + NPO (1 − R)": (eta, delta_r, 1.0, 1.0)})
    rows = {}
    for name, (e, d, a, b) in configs.items():
        settings = (model_key, e, d, a, b, prompts, seeds, args.steps, args.guidance)
        rows[name] = evaluated(out, name, settings, lambda: judged(
            sample(with_offsets(args.model, e, d), prompts, seeds, args, a, b), prompts))
        say(f"seed {seed}, {name}: " + ", ".join(f"{j} {v.mean():.4f}" for j, v in rows[name].items()))
    rows["held out"] = torch.tensor([p in HELD_OUT for p in prompts])
    return rows


def alpha_beta_grid(args, out, model_key, offsets, prompts, seeds):
    """Mean reward over α (rows) × β (columns) with η and δ (fig. 10), on 4 seeds per prompt."""
    alphas, betas = [0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.5]
    few = [i for i in range(len(prompts)) if seeds[i] % 1_000 < 4]
    few_prompts, few_seeds = [prompts[i] for i in few], [seeds[i] for i in few]
    pipe = None
    grid = []
    for a in alphas:
        row = []
        for b in betas:
            def compute(a=a, b=b):
                nonlocal pipe
                pipe = pipe or with_offsets(args.model, offsets["eta"], offsets["delta"])
                return judged(sample(pipe, few_prompts, few_seeds, args, a, b), few_prompts)
            settings = (model_key, offsets["eta"], offsets["delta"], a, b, few_prompts, few_seeds, args.steps,
                        args.guidance)
            row.append(evaluated(out, f"heat-{a:g}-{b:g}", settings, compute)["reward"].mean().item())
        grid.append(row)
    return grid, alphas, betas


def sample_grid(args, out, offsets, prompts, seeds):
    """compare.png: one seed per prompt; base, base + NPO, DPO, DPO + NPO as rows."""
    shown = [i for i in range(len(prompts)) if seeds[i] % 1_000 == 0]
    rows = {"base": (None, None), "base + NPO": (None, offsets["delta"]), "DPO": (offsets["eta"], None),
            "DPO + NPO": (offsets["eta"], offsets["delta"])}
    tiles = []
    for e, d in rows.values():
        x = sample(with_offsets(args.model, e, d), [prompts[i] for i in shown], [seeds[i] for i in shown], args)
        tiles += [im.resize((128, 128), Image.NEAREST) for im in images.to_pil(x * 2 - 1)]
    picture = images.labelled_grid(tiles, len(rows), len(shown), row_labels=list(rows),
                                   col_labels=[prompts[i].removeprefix("a ") for i in shown])
    images.save_png(picture, os.path.join(out, "compare.png"))


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


# ----------------------------------------------------------------------------------------------------------
# The report.

def pooled(per_seed, row, judge):
    """A row's scores under a judge, all training seeds together (paired across rows: same order everywhere)."""
    return torch.cat([per_seed[s][row][judge].double() for s in per_seed])


def table_judges(per_seed, rows):
    """Mean ± 95% interval of every row under every judge, all seeds pooled; and the held-out prompts alone."""
    names = list(JUDGES)
    lines = ["| sampling | " + " | ".join(f"{j} {'↑' if JUDGES[j][1] else '↓'}" for j in names)
             + " | reward, held-out prompts |", "|---|" + "---|" * (len(names) + 1)]
    held = torch.cat([per_seed[s]["held out"] for s in per_seed])
    for row in rows:
        cells = [f"{m:.4f} ± {h:.4f}" for m, h in (evaluate.interval(pooled(per_seed, row, j)) for j in names)]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {pooled(per_seed, row, 'reward')[held].mean():.4f} |")
    return lines


def table_effects(per_seed):
    """Each NPO effect (row minus its baseline) per judge: the win rate pooled, the mean difference at each seed,
    and whether its sign is the same at every seed."""
    lines = ["| NPO effect | judge | win rate (pooled) | mean difference per seed | same sign at every seed |",
             "|---|---|---|---|---|"]
    for row, base in NPO_EFFECTS.items():
        if row not in next(iter(per_seed.values())):
            continue
        for judge, (_, higher) in JUDGES.items():
            diffs = [(per_seed[s][row][judge].double() - per_seed[s][base][judge].double()).mean().item()
                     for s in per_seed]
            signs = {(d > 0) - (d < 0) for d in diffs}
            rate = win_rate(pooled(per_seed, row, judge), pooled(per_seed, base, judge), higher)
            lines.append(f"| {row} vs {base} | {judge} | {rate:.3f} | " + ", ".join(f"{d:+.4f}" for d in diffs)
                         + f" | {'yes' if len(signs) == 1 and 0 not in signs else 'no'} |")
    return lines


def write_report(args, out, seeds, per_seed, summaries, sweep, heat, seconds):
    rows = [r for r in next(iter(per_seed.values())) if r != "held out"]
    n = len(per_seed[seeds[0]]["base"]["reward"])
    lines = [f"Training seeds {', '.join(map(str, seeds))}; per seed {args.eval_seeds} held-out sampling seeds for each "
             f"of the 12 prompts ({n} images per row and seed; {', '.join(HELD_OUT)} never trained on). Only the "
             "reward labelled the training pairs; the other judges never reached training. ↑ / ↓: higher / lower "
             "is better; ± is a 95% interval over all seeds' images.", ""]
    lines += table_judges(per_seed, rows)
    lines += ["", "NPO's effect at every training seed (win rate: ties count half):", ""] + table_effects(per_seed)
    lines += ["", "Pairwise win rates under the reward, all seeds pooled (row beats column):", "",
              "| | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for a in rows:
        lines.append(f"| {a} | " + " | ".join("-" if a == b else f"{win_rate(pooled(per_seed, a, 'reward'), pooled(per_seed, b, 'reward')):.3f}"
                                               for b in rows) + " |")
    if sweep:
        lines += ["", f"The 1 − R training ({args.reward_steps} steps of 4 prompts, seed {seeds[0]}) at each learning rate: "
                  "the reward of base + δ' on the 10 training prompts (4 seeds each; lower means δ' learned 1 − R), "
                  "and the mean gradient norm:", "", "| lr | base + δ' reward | mean grad norm | last logged R |",
                  "|---|---|---|---|"] + [f"| {lr:g} | {r:.4f} | {g:.3g} | {last:.4f} |" for lr, (r, g, last) in sweep.items()]
    grid, alphas, betas = heat
    lines += ["", f"Mean reward over α (rows) × β (columns), DPO η and NPO δ, seed {seeds[0]}, 4 sampling seeds per prompt:", "",
              "| α \\ β | " + " | ".join(f"{b:g}" for b in betas) + " |", "|---|" + "---|" * len(betas)]
    lines += [f"| {a:g} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for a, row in zip(alphas, grid)]
    lines += ["", "Pairs per seed: " + ", ".join(f"{s}: {summaries[s]['pairs']} ({summaries[s]['ties']} near-ties dropped)"
                                                 for s in seeds)
              + f"; {args.train_steps} DPO / NPO steps; {args.reward_steps} reward steps at lr {args.reward_lr:g}; "
              f"{args.steps} DDIM steps at guidance {args.guidance:g}; {seconds / 60:.1f} minutes."]
    write_json(os.path.join(out, "results.json"), {
        "seeds": {str(s): {row: ({k: v.tolist() for k, v in scores.items()} if isinstance(scores, dict) else scores.tolist())
                           for row, scores in per_seed[s].items()} for s in seeds},
        "lr_sweep": {f"{lr:g}": list(v) for lr, v in sweep.items()}, "heatmap": grid})
    path = os.path.join(out, "results.md")
    checkpoint.atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path
