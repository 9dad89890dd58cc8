"""npo: Diffusion-NPO (negative preference optimization) on a hand-written Stable Diffusion.

    python npo.py sample --prompt "a red circle" --lora dpo.safetensors --npo npo.safetensors
    python npo.py train --data pairs.jsonl --out runs/npo --npo          # train δ (Diffusion-DPO, pairs swapped)
    python npo.py sample --model text-to-video-ms --frames 16 --lora eta.safetensors --npo npo.safetensors  # videos
    python npo.py evaluate out/base out/npo --scorer pickscore:PickScore_v1 --out report   # tables 1-3, fig. 7
    python npo.py experiment --out results  # the paper's experiment in miniature, on the embedded model
    python npo.py reproduce recipes/table1-sd15.json --weights DIR --out repro   # one command per table (1, 2; fig. 7)
    python npo.py info --model PATH        # what a model folder or single file holds, loaded strictly
    python npo.py extract-lora --base SD15 --tuned ft.safetensors --rank 64 --out eta.safetensors   # η as a LoRA

This file is the command line only: one argparse with subcommands, each a thin shell over functions the tests call
directly (sample.py: the sample command; pipeline.py: loading; guided.py: eq. 10 and generate; train.py: training;
evaluate.py: scoring samples; experiment.py, reproduce.py: the experiment and the paper's tables).
"""
import argparse
import json
import os
import sys
import time

import torch

# npo is one import package: installed, these modules are npo.pipeline, npo.train, … (pyproject.toml maps this folder
# onto the package), so nothing with a generic name (clip, evaluate, data) lands at the top level. In a checkout this
# file stands for the package: imported as `npo`, its folder is the package's path, and `npo.pipeline` is the
# pipeline.py beside it.
if __name__ == "npo":
    __path__ = [os.path.dirname(os.path.abspath(__file__))]

from npo import (distributed, evaluate, experiment, extract, guided, guiders, lora, pipeline, reproduce,  # noqa: E402
                 sample, sampler, train, trainconfig, trainflags)
from npo.checkpoint import UserError, finite_float  # noqa: E402
from npo.pipeline import DEFAULT_MODEL  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# The command line.

def cmd_info(args):
    pipe = pipeline.load_pipeline(args.model, variant=args.variant, **pipeline.source_options(args))
    print(pipe.origin)
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if pipe.is_sdxl else ()):
        print(f"{name:15s} {pipeline.count_parameters(getattr(pipe, name)) / 1e6:8.1f}M parameters")
    print(f"scheduler       {pipe.scheduler_config or 'SD defaults'}")


def cmd_sample(args):
    if args.video:  # the embedded video model stands for --model, nothing else changes
        if args.model != DEFAULT_MODEL:
            raise UserError(f"--video samples the embedded video model and --model names {args.model}; pass one of them.")
        args.model = pipeline.DEFAULT_VIDEO_MODEL
    sample.run(args)


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
    p.add_argument("--prompt", help=f"the prompt (ignored with --prompts-file; without either, {sample.DEFAULT_PROMPT!r}, "
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
                        "(compare-NNNN-seedS.png, sweep-NNNN.png for grids; a video model's NNNNN-seedS/FFF.png frames and "
                        "NNNNN-seedS.webp), so no run overwrites another")
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
    p.add_argument("--ddim-eta", type=finite_float, help="DDIM stochasticity η_ddim (0 deterministic, 1 DDPM-like; "
                                                         "default 0, or the model's own: VideoCrafter2's 1)")
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
    p.add_argument("--frames", type=int, help="video models only: frames per video (default: the model's, 16 for "
                                              "ModelScope); each video is written as NNNNN-seedS/FFF.png and "
                                              "NNNNN-seedS.webp")
    p.add_argument("--fps", type=int, help="video models only: the .webp preview's frames per second, and "
                                           "VideoCrafter2's fps conditioning (default: the model's, else 8)")
    p.add_argument("--decode-chunk", type=int, help="video models only: frames per VAE decode call (default 8); at "
                                                    "512 px each frame of a call holds about 1 GiB in float32, so "
                                                    "lower it, down to 1, if decoding runs out of memory")
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
    p.add_argument("--video", action="store_true", help="sample the embedded video model (weights/video/: shapes moving "
                                                         "across 8 frames, e.g. --prompt \"a red circle moving right\")")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train the offset η, or with --npo the NPO offset δ (Diffusion-DPO, SFT, a reward, or RL: DDPO)")
    trainflags.add_arguments(p)
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
