"""The paper's table 3 in miniature, on the embedded video model (weights/video/, the moving-shapes world): VADER
trains η on a differentiable video reward, then VADER + NPO trains δ; held-out judges score the samples (not a test).

    python -m benchmarks.vader_shapes --out runs/vader-shapes [--seeds 0,1] [--steps 30] [--eval-seeds 4] \
        [--grad-steps 1] [--betas 1,0.5]

For each training seed:
1. η: `npo.py train --method reward --reward shapes:video_reward` (VADER: DDIM with CFG, the gradient through the
   last K steps (--grad-steps; VADER's default 1), the reward of the whole clip: its frames' image reward times a
   motion term).
2. δ as table 3 trained it (the authors' DR-Video-NPO): `--train-branch uncond --lora η`, δ only on the
   unconditional branch beside the frozen η, from R itself through the (1 − g) of CFG.
3. δ' in NPO's other reading, `--npo` (1 − R, eq. 7), trained from the base.
Then every row samples the same prompts and seeds (DDIM, the training's steps and guidance): base; VADER (η on both
branches); VADER + NPO (eq. 10, η at [1, 1], δ at [β, 0], a row per β of --betas); VADER + NPO (1 − R) (δ' in
place of δ). Judges: the
reward that trained (`shapes.video_reward`), and three that training never saw (shapes.py, pixels only): the
checker of clips (color, shape and direction, `video_correct`), the direction alone (`video_direction_correct`),
and the image checker on every frame (`correct`, the share of frames right). Means over the videos with their
standard errors, and each NPO effect at every training seed with the standard error of its paired differences,
then over the training seeds (their mean effect ± its standard error across the seeds).
Trainings already in --out are reused.
"""
import argparse
import json
import math
import os
import re

import torch

from npo import guided, lora, pipeline, sampler, shapes, train, video
from npo.trainconfig import TrainConfig

HELD_OUT = ("a green triangle moving up", "a yellow square moving left", "a red circle moving down",
            "a blue triangle moving right")  # never trained on


def frames_correct(videos, prompts):
    """The image checker (`shapes.correct`: color and shape) on every frame of each clip: the share it finds right."""
    still = [" ".join(p.split()[:3]) for p in prompts for _ in range(videos.shape[1])]  # 'a red circle moving up'
    return shapes.correct(videos.flatten(0, 1), still).view(videos.shape[:2]).float().mean(1)


JUDGES = {  # name: (function(videos (B, F, 3, H, W) in [0, 1], prompts) -> (B,), held out from training?)
    "reward": (shapes.video_reward, False),
    "clip correct": (shapes.video_correct, True),
    "direction": (shapes.video_direction_correct, True),
    "frames correct": (frames_correct, True),
}
NPO_ROWS = {"VADER + NPO": ("eta", "delta"), "VADER + NPO (1 − R)": ("eta", "delta_npo")}


def rows(betas):
    """{row: (offsets, β)}: base, VADER, then each NPO row at every β (named with it where β ≠ 1)."""
    named = {"base": ((), 1.0), "VADER": (("eta",), 1.0)}
    for row, roles in NPO_ROWS.items():
        named.update({row + ("" if b == 1 else f", β = {b:g}"): (roles, b) for b in betas})
    return named


def trained(args, name, seed, **settings):
    """OUT/NAME-sSEED/lora.safetensors, trained now unless it is there (the run's own folder)."""
    out = os.path.join(args.out, f"{name}-s{seed}")
    path = os.path.join(out, "lora.safetensors")
    if not os.path.exists(path):
        train.train(TrainConfig(
            method="reward", model=args.model, reward="shapes:video_reward", prompts_file=args.prompts_file, out=out,
            frames=args.frames, sample_steps=args.sample_steps, guidance=args.guidance, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, seed=seed, grad_steps=args.grad_steps, log_every=5,
            checkpoint_every=0, device="cpu", **settings))
    return path


@torch.no_grad()
def sample(pipe, prompts, seeds, args, beta):
    """Videos (B, F, 3, H, W) in [0, 1] with eq. 10's guidance from whatever offsets the UNet carries (η at [1, 1],
    δ at [β, 0]): x_T (1, C, F, h, w) from each seed's CPU generator, DDIM, the frames decoded."""
    size = pipe.image_size
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = sampler.randn((len(seeds), pipe.unet.config.in_channels, args.frames, size // pipe.vae.downscale,
                       size // pipe.vae.downscale), gens)
    pos = pipe.conditioning(prompts)
    denoise = guided.npo_denoiser(pipe.unet, pipe.negative_conditioning(None, pos), pos, args.guidance, beta=beta)
    x = sampler.ddim_sample(denoise, x, pipe.ddim_config(), args.sample_steps)
    return (video.decode_frames(pipe.vae, x) / 2 + 0.5).clamp(0, 1)


def evaluate_row(args, offsets, beta, prompts, seeds):
    """Each judge's score of every video of the row, {judge: [...]}: the offsets loaded as {role: file}, δ at β."""
    pipe = pipeline.load_pipeline(args.model)
    for role, path in offsets.items():
        lora.load_lora(pipe.unet, path, role)
    scores = {name: [] for name in JUDGES}
    for start in range(0, len(prompts), args.batch_size):
        p, s = prompts[start:start + args.batch_size], seeds[start:start + args.batch_size]
        videos = sample(pipe, p, s, args, beta)
        for name, (judge, _) in JUDGES.items():
            scores[name] += judge(videos, p).float().tolist()
    return scores


def mean_se(values):
    m = sum(values) / len(values)
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else 0.0
    return m, se


def run(args):
    os.makedirs(args.out, exist_ok=True)
    pipe = pipeline.load_pipeline(args.model)  # the model's own frames and guidance where none are given
    args.frames = args.frames or pipe.default_frames or shapes.FRAMES
    args.guidance = pipe.default_guidance if args.guidance is None else args.guidance
    train_prompts = [p for p in shapes.video_prompts() if p not in HELD_OUT]
    args.prompts_file = os.path.join(args.out, "prompts.txt")
    with open(args.prompts_file, "w") as f:
        f.write("\n".join(train_prompts) + "\n")
    eval_prompts = [*HELD_OUT, *train_prompts[::len(train_prompts) // 4][:4]]  # 4 held out, 4 trained
    prompts = [p for p in eval_prompts for _ in range(args.eval_seeds)]
    seeds = [1000 + k for _ in eval_prompts for k in range(args.eval_seeds)]
    results = {}
    for seed in args.seeds:
        eta = trained(args, "eta", seed)
        files = {"eta": eta, "delta": trained(args, "delta", seed, train_branch="uncond", lora=eta),
                 "delta_npo": trained(args, "delta_npo", seed, npo=True)}
        for row, (roles, beta) in rows(args.betas).items():
            key = os.path.join(args.out, "eval-" + re.sub(r"[^A-Za-z0-9.]+", "_", row) + f"-s{seed}.json")
            if not os.path.exists(key):  # scored first, then written whole: an interrupted row is redone
                offsets = {("delta" if r.startswith("delta") else r): files[r] for r in roles}
                scores = evaluate_row(args, offsets, beta, prompts, seeds)
                with open(key + ".tmp", "w") as f:
                    json.dump(scores, f)
                os.replace(key + ".tmp", key)
            with open(key) as f:
                results[(row, seed)] = json.load(f)
    return results


def table(results, seeds, betas):
    """Markdown: each row's mean ± standard error per judge over all seeds' videos; then each NPO row's difference
    from VADER per training seed, ± the standard error of the paired differences, and across the seeds."""
    lines = ["| row | " + " | ".join(f"{j}{'' if held else ' (trained on)'}" for j, (_, held) in JUDGES.items()) + " |",
             "|---" * (len(JUDGES) + 1) + "|"]
    for row in rows(betas):
        cells = [mean_se(sum((results[(row, s)][j] for s in seeds), [])) for j in JUDGES]
        lines.append(f"| {row} | " + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in cells) + " |")
    lines += ["", "| NPO row − VADER, per training seed (paired) | " + " | ".join(JUDGES) + " |",
              "|---" * (len(JUDGES) + 1) + "|"]
    for row in [r for r in rows(betas) if r.startswith("VADER + NPO")]:
        per_seed = []
        for s in seeds:  # every row samples the same prompts and x_T, so video i of both rows is a pair
            paired = [mean_se([b - a for a, b in zip(results[("VADER", s)][j], results[(row, s)][j])]) for j in JUDGES]
            lines.append(f"| {row}, seed {s} | " + " | ".join(f"{m:+.3f} ± {se:.3f}" for m, se in paired) + " |")
            per_seed.append([m for m, _ in paired])
        if len(seeds) > 1:  # the training seed is the unit: the seeds' mean differences, ± their standard error
            across = [mean_se(column) for column in zip(*per_seed)]
            lines.append(f"| {row}, {len(seeds)} seeds | " + " | ".join(f"{m:+.3f} ± {se:.3f}" for m, se in across)
                         + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(pipeline.DEFAULT_MODEL, "video"), help="the video model")
    p.add_argument("--out", default="runs/vader-shapes", help="output folder (trainings and scores are reused)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1], help="training seeds")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each training")
    p.add_argument("--batch-size", type=int, default=4, help="videos per step (and per sampling batch)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every training")
    p.add_argument("--frames", type=int, help="frames per video (default: the model's)")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of training and evaluation")
    p.add_argument("--grad-steps", type=int, default=1, help="K: the last DDIM steps the reward's gradient reaches")
    p.add_argument("--betas", type=lambda s: [float(v) for v in s.split(",")], default=[1.0],
                   help="β of δ in the NPO rows, one row each (comma-separated)")
    p.add_argument("--guidance", type=float, help="CFG scale of training and evaluation (default: the model's)")
    p.add_argument("--eval-seeds", type=int, default=4, help="videos per evaluation prompt (8 prompts)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    text = table(results, args.seeds, args.betas)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
