"""VADER (`npo.py train --method reward` on a video model): peak memory and time of one training step against the
number of DDIM sampling steps, K (--grad-steps) fixed, on a ModelScope-shaped video model with random weights at
reduced widths (not a test). With K fixed the peak must not grow with the sampling steps: the first steps run under
no_grad and the last K keep only their inputs (checkpointing). The contrast rows keep a graph through every step
(K = sampling steps), whose peak does grow.

    python -m benchmarks.vader [--size 8] [--frames 8] [--sample-steps 5,10,20] [--threads 2]
    python -m benchmarks.vader --tiny --size 8 --frames 3 --sample-steps 1,2    # the command at toy size

Each row runs in a fresh process (harness.run_child); the peak is the process's resident set during the training
loop (VmHWM reset when the loop starts, after the model has loaded). Prints a Markdown table for BENCHMARKS.md.
"""
import os
import tempfile

import torch

from benchmarks import harness
from benchmarks.random_weights import TOKENIZER_DIR, randomize

MODULE = "benchmarks.vader"
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(os.environ.get("NPO_BENCH_DIR", "/tmp/npo-bench/sd15"))),
                       "vader")  # + "-PRESET": a whole text-to-video folder (benchmarks.video's are video-PRESET)
# ModelScope's text-to-video-ms UNet (diffusers' UNet3DConditionModel): 4 levels, heads of 64 dims; here at a fifth of
# its widths (320, 640, 1280, 1280 -> 64, 128, 256, 256), context 256; `tiny`: a few channels, to check the command
PRESETS = {"small": dict(channels=(64, 128, 256, 256), head=64, context=256, groups=32, vae=(32, 64, 64, 64)),
           "tiny": dict(channels=(32, 32, 32, 32), head=8, context=32, groups=8, vae=(16, 16, 16, 16))}


def make_video_weights(path, preset):
    """A TextToVideoSDPipeline folder (unet/ of UNet3DConditionModel, vae/, text_encoder/, tokenizer/, DDIM
    scheduler/) with random weights at the preset's widths; written once (a `done` file marks it)."""
    if os.path.exists(os.path.join(path, "done")):
        return
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    p = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet3DConditionModel(sample_size=32, block_out_channels=p["channels"], layers_per_block=2,
                                cross_attention_dim=p["context"], attention_head_dim=p["head"],
                                norm_num_groups=p["groups"])
    vae = AutoencoderKL(block_out_channels=p["vae"], layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=p["context"], intermediate_size=2 * p["context"],
                                        num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu"))
    TextToVideoSDPipeline(
        unet=randomize(unet, 1), vae=randomize(vae, 2), text_encoder=randomize(text, 3),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1)).save_pretrained(path)
    open(os.path.join(path, "done"), "w").close()


def vader_one(weights, sample_steps, grad_steps, frames, size):
    """One step of `npo.py train --method reward` on the video model (batch 1, one random frame scored, the
    brightness reward, rank 8, fp32) in this process: its time from the log and the loop's peak resident memory."""
    from benchmarks.training import logged_step_seconds, prompts_file
    from npo import train
    from npo.trainconfig import TrainConfig
    tmp, loop, load_peak = tempfile.mkdtemp(), train.loop, []

    def loop_with_fresh_peak(*args):
        load_peak.append(harness.rss_gib("VmHWM"))  # the model loaded, the LoRA attached
        harness.reset_peak_rss()
        return loop(*args)
    train.loop = loop_with_fresh_peak
    train.train(TrainConfig(method="reward", reward="rewards:brightness", model=weights, prompts_file=prompts_file(tmp),
                            out=f"{tmp}/run", steps=1, resolution=8 * size, sample_steps=sample_steps,
                            grad_steps=grad_steps, frames=frames, score_frames=1, log_every=1, checkpoint_every=0,
                            device="cpu"))
    return dict(seconds=logged_step_seconds(f"{tmp}/run")[-1], loop_peak_gib=harness.rss_gib("VmHWM"),
                load_peak_gib=load_peak[0])


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8, help="latent side (default 8: 64 px frames)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    parser.add_argument("--sample-steps", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10, 20],
                        help="comma-separated sampling step counts (default 5,10,20)")
    parser.add_argument("--grad-steps", type=int, default=1, help="K of the flat rows (default 1, VADER's)")
    parser.add_argument("--tiny", action="store_true", help="a few channels: to check that the command runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "small"
    weights = f"{WEIGHTS}-{preset}"
    make_video_weights(weights, preset)
    print(f"ModelScope-shaped video UNet ({preset}: widths {PRESETS[preset]['channels']}), latent {args.size}x"
          f"{args.size}, {args.frames} frames, batch 1 (CFG: 2 rows per UNet call), 1 frame scored, rank 8, fp32, "
          f"{args.threads} threads\n")
    print("| sampling steps | K (grad steps) | s / training step | peak GiB in the loop | peak GiB before it (load) |\n"
          "|---|---|---|---|---|")
    contrast = [(n, n) for n in args.sample_steps if n > args.grad_steps][:2]  # a graph through every step
    rows = [(n, args.grad_steps) for n in args.sample_steps] + contrast
    for sample_steps, grad_steps in rows:
        r = harness.run_child(MODULE, "_vader", weights, sample_steps, grad_steps, args.frames, args.size,
                              threads=args.threads)
        print(f"| {sample_steps} | {grad_steps} | {r['seconds']:.2f} | {r['loop_peak_gib']:.3f} | "
              f"{r['load_peak_gib']:.3f} |", flush=True)


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "_vader":  # one row in a fresh process (harness.run_child)
        harness.main(__doc__, [], {"_vader": vader_one})
    else:
        main()
