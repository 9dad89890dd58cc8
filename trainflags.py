"""The flags of `npo.py train`, in groups, each with its default in its help (read from TrainConfig and
trainconfig.DEFAULTS, the one place defaults live), and `parse_args`, which turns them into a TrainConfig."""
import argparse

from . import pipeline
from . import trainconfig
from .checkpoint import finite_float


def parse_args(argv):
    """The flags of `npo.py train` (without the subcommand) as a TrainConfig."""
    parser = argparse.ArgumentParser(prog="npo.py train")
    add_arguments(parser)
    return trainconfig.from_namespace(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------------------
# The command line: `npo.py train` adds these flags to its subparser, in groups.

def add_arguments(p):
    p.argument_default = argparse.SUPPRESS  # a flag not given leaves the TrainConfig field's default
    g = p.add_argument_group("model and output")
    g.add_argument("--model", help="the frozen base model: a diffusers folder or a single-file .safetensors / .ckpt "
                                   "checkpoint")
    pipeline.add_source_arguments(g)
    g.add_argument("--out", help="output folder: the LoRA goes to OUT/lora.safetensors, checkpoints to "
                                 "OUT/checkpoints/, the settings to OUT/settings.json, the log to OUT/log.jsonl and "
                                 "its plot to OUT/log.png (required, unless --resume names the run)")
    g.add_argument("--dtype", choices=sorted(trainconfig.DTYPES),
                   help="dtype of the frozen base model (the LoRA parameters are float32 always)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (under torchrun a CUDA run puts rank r on cuda:LOCAL_RANK)")
    _add_offset_arguments(p.add_argument_group("the offset (a LoRA on the frozen UNet)"))
    _add_objective_arguments(p.add_argument_group("the objective"))
    _add_reward_arguments(p.add_argument_group("training through the sampler (--method reward, ddpo)"))
    _add_ddpo_arguments(p.add_argument_group("RL (--method ddpo)"))
    _add_spo_arguments(p.add_argument_group("step-aware preference optimization (--method spo)"))
    _add_optimizer_arguments(p.add_argument_group("the optimizer"))
    _add_data_arguments(p.add_argument_group("preference pairs (--method dpo, sft)"))
    _add_corruption_arguments(p.add_argument_group("the appendix's table 7: NPO on corrupted pairs (--method dpo, sft)"))
    _add_bookkeeping_arguments(p.add_argument_group("checkpoints, logs and validation"))
    for action in p._actions:  # every flag's help ends with its default, from the one place defaults live
        if action.dest in trainconfig.FIELDS and action.dest != "out":
            action.help += f" (default: {default_text(action.dest)})"


# What "not given" means for the fields whose default is None and that no method fills in
UNSET = {"model": "the embedded model in weights/", "device": "cuda if available, else cpu",
         "lora_alpha": "alpha = rank, scale 1", "resolution": "the model's own size", "lora": "none, base + δ",
         "resume": "none, a fresh run"}


def default_text(name):
    """A field's default as --help shows it; a method-dependent one names each method's value."""
    if name in trainconfig.DEFAULTS:
        others = [f"; --method {m}: {d[name]:g}" for m, d in trainconfig.METHOD_DEFAULTS.items() if name in d]
        others += [f"; --method {m} on {model.upper()}: {d[name]:g}"
                   for (m, model), d in trainconfig.MODEL_DEFAULTS.items() if name in d]
        value = trainconfig.DEFAULTS[name]
        return (f"{value:g}" if isinstance(value, float) else str(value)) + "".join(others)
    value = trainconfig.FIELDS[name].default
    if value is None:
        return UNSET.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _add_offset_arguments(g):
    g.add_argument("--rank", type=int, help="LoRA rank r (8 is the authors' NPO setting, 4 SPO's)")
    g.add_argument("--lora-alpha", type=finite_float, help="LoRA alpha; the offset is scaled by alpha / rank")
    g.add_argument("--targets", help="comma-separated layer-name suffixes that get the LoRA (the default names both "
                                     "attentions of every transformer block)")
    g.add_argument("--init-lora", help="start from this LoRA file instead of a zero offset (its rank, alpha and "
                                       "layers are used)")


def _add_objective_arguments(g):
    g.add_argument("--npo", action="store_true",
                   help="train the NPO offset δ (role 'delta'): dpo/sft swap every pair (eq. 8), reward and ddpo "
                        "maximize 1 − R (eq. 7); without it the run trains the preference offset η (role 'eta')")
    g.add_argument("--method", choices=trainconfig.METHODS,
                   help="dpo: Diffusion-DPO; sft: plain denoising loss on the preferred image (for comparison); "
                        "reward: differentiable-reward fine-tuning through the sampler (DRaFT-K / AlignProp); "
                        "ddpo: RL (DDPO-IS with PPO clipping), for rewards with or without a gradient; spo: step-aware preference "
                        "optimization, pairs of candidates ranked by a reward at each sampling step")
    g.add_argument("--beta-dpo", type=finite_float,
                   help="β of L = −log σ(β (d_ref − d_θ)), diffusers' SD1.5 convention (Salesforce's β, and the β "
                        "of the −0.5·β in diffusers' SDXL script, are twice this: the authors' SDXL NPO β 2000 is "
                        "1000 here); 500 is the authors' NPO value for SD1.5")


def _add_reward_arguments(g):
    g.add_argument("--reward",
                   help="module:function of a reward R(images in [0,1], prompts) -> (B,), e.g. rewards:brightness; "
                        "or a learned scorer on your weights: pickscore:PATH, hpsv2:PATH, aesthetic:CLIP_PATH,MLP_PATH, "
                        "clipscore:PATH, imagereward:DIR, spm:PATH (SPO's step-aware preference model: it scores at t = 0 where a method "
                        "gives no timestep)")
    g.add_argument("--reward-range", help="LOW,HIGH: map an unbounded reward to [0, 1] (affine, clamped), as 1 − R needs")
    g.add_argument("--reward-sigmoid", type=finite_float, help="map an unbounded reward to [0, 1] by σ(R / SCALE) instead")
    g.add_argument("--prompts-file",
                   help="training prompts: a .txt with one per line, or a .jsonl with a \"prompt\" per row")
    g.add_argument("--sample-steps", type=int, help="DDIM steps of each training sample")
    g.add_argument("--grad-steps", type=int,
                   help="reward: K, gradients flow through the last K denoising steps only (DRaFT-K)")
    g.add_argument("--guidance", type=finite_float, help="CFG scale of the training samples")
    g.add_argument("--joint", action="store_true",
                   help="train η (conditional branch) and δ (unconditional branch) at once in the eq. 10 "
                        "sampler, into OUT/eta.safetensors and OUT/delta.safetensors")
    g.add_argument("--train-branch", choices=["both", "uncond"],
                   help="both: the offset runs on both CFG branches, as a fine-tuned model; uncond: train δ "
                        "only where eq. 10 puts it, on the unconditional branch inside CFG, from R (the authors' "
                        "SPO-NPO / VADER-NPO arrangement: δ learns through the (1 − g) of CFG); with --lora ETA")
    g.add_argument("--lora", help="--train-branch uncond: the preference offset η (a LoRA file), frozen, on the "
                                  "conditional branch and at --alpha on the unconditional one")
    g.add_argument("--alpha", type=finite_float,
                   help="--joint, or --train-branch uncond with --lora: weight of η on the unconditional branch")
    g.add_argument("--beta", type=finite_float, help="--joint: weight of δ on the unconditional branch")


def _add_ddpo_arguments(g):
    g.add_argument("--ddim-eta", type=finite_float,
                   help="η_ddim of the training samples: above 0, so that every step has a log-probability")
    g.add_argument("--sample-batches", type=int,
                   help="batches of --batch-size prompts each rank samples per epoch, a multiple of --grad-accum; an "
                        "epoch then makes --inner-epochs passes over them, one optimizer step per --grad-accum batches")
    g.add_argument("--inner-epochs", type=int, help="passes over each epoch's samples")
    g.add_argument("--clip-range", type=finite_float, help="PPO's ε: the ratio p_θ/p_old is clipped to [1 − ε, 1 + ε] "
                                                    "(small because log p is a mean over the latent)")
    g.add_argument("--adv-clip", type=finite_float, help="clip the advantages to ±this")
    g.add_argument("--timestep-fraction", type=finite_float,
                   help="fraction of the sampling steps trained on, a random subset per batch (1: all)")


def _add_spo_arguments(g):
    g.add_argument("--spo-candidates", type=int,
                   help="k, the candidates x_{t−1} drawn from each shared x_t (4 is SPO's SD1.5 setting, 2 its SDXL one)")
    g.add_argument("--spo-threshold", type=finite_float,
                   help="keep (best, worst) when their softmaxed scores differ by more than this, in [0, 1) (0.3 is "
                        "SPO's SD1.5 setting, 0.4 its SDXL one): a pair forms when scale·(s_best − s_worst) > "
                        "2·atanh(threshold)")
    g.add_argument("--spo-score-scale", type=finite_float,
                   help="multiply the scores by this before the softmax (1 is SPO's rule for logit-scale scorers such "
                        "as pickscore:, 100·cos; a reward in [0, 1] needs a hundred or more)")
    g.add_argument("--spo-plain-steps", type=int,
                   help="sampling steps before the first candidates (SPO's divert_start_step)")
    g.add_argument("--spo-inner-steps", type=int,
                   help="N, SPO's num_inner_step: after each branch step every candidate takes N more steps along its "
                        "own chain before the candidates are scored, and a kept pair trains on all N + 1 steps (0 is "
                        "SPO's SD1.5 setting, 3 its SDXL one)")
    g.add_argument("--spo-beta", type=finite_float, help="β of L = −log σ(β (log r_w − log r_l))")
    g.add_argument("--spo-clip", type=finite_float, help="ε: each ratio p_θ/p_ref is clamped to [1 − ε, 1 + ε]")


def _add_optimizer_arguments(g):
    g.add_argument("--lr", type=finite_float, help="AdamW learning rate, constant after the warmup")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warmup over this many steps")
    g.add_argument("--batch-size", type=int, help="pairs (or prompts) per rank per micro-step; pairs per optimizer "
                                                  "step = batch size × grad accum × ranks")
    g.add_argument("--grad-accum", type=int, help="micro-steps whose gradients add up to one optimizer step")
    g.add_argument("--max-grad-norm", type=finite_float, help="clip the gradient's global norm to this (0: no clipping)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="run the frozen base under autocast in bf16 or fp16; the LoRA master weights, the optimizer "
                        "and the loss stay float32, the VAE encodes in float32; fp16 scales the loss dynamically and "
                        "skips steps whose gradients overflow")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet blocks' activations in the backward pass: less memory, about 30%% more time")
    g.add_argument("--steps", type=int, help="optimizer steps in total, counting those of a resumed run")
    g.add_argument("--seed", type=int,
                   help="seed of everything random: LoRA init, data order, crops, flips, caption dropout, t, ε")
    g.add_argument("--resolution", type=int, help="training image size in pixels, a multiple of 8")


def _add_data_arguments(g):
    g.add_argument("--data", help="preference pairs: a .jsonl file ({prompt, chosen, rejected}), a folder with w/ "
                                  "and l/, or a Pick-a-Pic .parquet file")
    g.add_argument("--random-crop", action="store_true",
                   help="crop at a random position (the same for both images of a pair) instead of the center")
    g.add_argument("--caption-dropout", type=finite_float,
                   help="probability of training a pair with the empty prompt (the unconditional branch of CFG)")
    g.add_argument("--cache-latents", action="store_true",
                   help="VAE-encode each image once per flip and keep the posterior in memory "
                        "(center crops only; costs 2 · 2 · 4 · (R/8)² values per pair)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip pairs whose images are missing or unreadable (counted at the end) instead of stopping")
    g.add_argument("--num-workers", type=int,
                   help="processes decoding images in the background (the batches are the same either way)")
    g.add_argument("--ties", choices=["drop", "keep"],
                   help="Pick-a-Pic ties (label_0 = 0.5): drop them (as Salesforce's Diffusion-DPO) or keep them "
                        "with jpg_0 as the winner (as the NPO authors' runs)")
    g.add_argument("--shuffle-buffer", type=int, help="parquet shards (a folder or glob): shuffle rows within "
                                                      "windows of this many row groups (memory holds one window)")


def _add_corruption_arguments(g):
    g.add_argument("--perturb-prompts", action="store_true",
                   help="shuffle the captions within each rank's batch (a random permutation, seeded by --seed and "
                        "the step), so pairs train with mismatched text; needs --batch-size 2 or more")
    g.add_argument("--corrupt", metavar="blur:SIGMA",
                   help="with --npo: Gaussian-blur (SIGMA pixels, radius 3·SIGMA, reflected borders) the image the "
                        "swapped pair prefers, the original loser x_l, which δ learns toward, before the VAE")


def _add_bookkeeping_arguments(g):
    g.add_argument("--checkpoint-every", type=int,
                   help="write OUT/checkpoints/step-XXXXXX every N steps (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=int, help="keep the last K checkpoints (0: keep all)")
    g.add_argument("--resume", help="continue a run with the settings it saved (OUT/settings.json): the run folder "
                                    "OUT, one of its checkpoint folders, or 'latest' for the newest checkpoint in "
                                    "--out; a flag given beside it changes that setting, or is refused if it would "
                                    "make another run")
    g.add_argument("--log-every", type=int, help="print and log the metrics averaged over every N steps")
    g.add_argument("--validation-prompts", nargs="+",
                   help="prompts to sample with the current LoRA into OUT/validation/ (one image each)")
    g.add_argument("--validation-every", type=int,
                   help="sample the validation prompts every N steps (0: only at the end)")
    g.add_argument("--validation-steps", type=int, help="DDIM steps of the validation images")
