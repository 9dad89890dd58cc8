"""--method reward: differentiable-reward fine-tuning through the sampler (DRaFT-K, Clark et al. 2024; AlignProp;
VADER, Prabhudesai et al. 2024, on video models), on R for η or on 1 − R for NPO's δ (paper eq. 7).

    python npo.py train --method reward --reward shapes:reward --prompts-file p.txt --out runs/r --npo   # eq. 7
    python npo.py train --method reward ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg only

One micro-step samples each example from noise with DDIM and CFG, the offsets on, keeps gradients only through the
last K denoising steps (each UNet call checkpointed), decodes, and minimizes −R(x_0, c) (δ: −(1 − R)). With
--train-branch uncond the trained offset is δ on the unconditional branch only, beside a frozen η (--lora):
`machinery.branch_weights`.

On a video model (VADER) the same loop runs on 5-D latents (B, C, F, h, w): x_T as diffusers' TextToVideoSDPipeline
draws it, the batched CFG forward of eq. 10 unchanged (the LoRA multipliers follow the batch-major folds of the
video UNet), and instead of decoding every frame, --score-frames N frames of each video, chosen at random, are
decoded one by one and scored with the image reward; the video's reward is their mean. VADER's own default is
K = 1 and one random frame; the authors' VADER-NPO (DR-Video-NPO) is --train-branch uncond --lora ETA.
"""
import torch
import torch.utils.checkpoint

from . import data
from . import guided
from . import rewards
from . import sampler
from . import trainconfig
from . import video
from .checkpoint import UserError
from .machinery import branch_weights, checkpoint_unet_blocks, draw_prompt, example_generator
from .trainconfig import DTYPES

SHOWN = ("reward",)  # printed beside the loss (the log file has every metric)
DEFAULT_FRAMES = 16  # a video model that names none: diffusers' TextToVideoSDPipeline's num_frames


def read_inputs(config, world_size):
    """The training prompts; the reward is loaded and probed on them now, minutes before the model has loaded."""
    prompts = data.read_prompts(config.prompts_file)
    trainconfig.reward_objective(config, prompts)
    return prompts


def describe(config, prompts):
    return f"{len(prompts)} prompts, reward {config.reward}"


def micro_step(run, prompts):
    """Sample each example from noise with DDIM and CFG, the offsets on; gradients flow only through the last K
    (--grad-steps) denoising steps, each UNet call of which is checkpointed; decode (a video: its scored frames);
    loss = −R (δ: −(1 − R)).

    The offsets run on the CFG branches that `branch_weights` gives."""
    config, pipe, device, amp = run.config, run.pipe, run.device, run.amp
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[config.dtype]
    objective = trainconfig.reward_objective(config, prompts)  # R, or 1 − R with --npo
    frames, scored = video_frames(config, pipe, objective)
    if config.gradient_checkpointing:  # inside each checkpointed UNet call, its recomputation checkpoints every block
        checkpoint_unet_blocks(unet)
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, config.sample_steps)
    scales = sampler.x0_scales(schedule, config.sample_steps)  # VideoCrafter's x̂_0 rescale; 1 for other models
    size, channels = config.resolution, unet.config.in_channels

    def step(first, weight):
        gens = [example_generator(config.seed, first + j) for j in range(config.batch_size)]
        chosen = [draw_prompt(prompts, g) for g in gens]
        # x_T: (B, C, h, w), or a video's (B, C, F, h, w), as diffusers' pipelines draw it from each generator
        x = sampler.initial_latents(gens, size, size, channels, device, dtype, vae.downscale, frames)
        pos = pipe.conditioning(chosen, pipe.time_ids(size, size))
        neg = pipe.negative_conditioning(None, pos)  # "", or SDXL's zeros: diffusers without a negative prompt
        neg, pos = guided.with_fps(pipe, (neg, pos), pipe.default_fps)  # VideoCrafter2's frame rate, as sampling's
        weights = branch_weights(config, run.files, len(chosen), device)
        guide = guided.guided_denoiser(unet, neg, pos, config.guidance, weights)

        def denoise(x, t):  # the UNet under autocast (--mixed-precision); the DDIM update in x's dtype
            with amp.autocast():
                return guide(x, t).to(x.dtype)
        for i, ((t, a_t, a_prev), s) in enumerate(zip(steps, scales)):
            if i < len(steps) - config.grad_steps:
                with torch.no_grad():
                    x = sampler.ddim_step(x, denoise(x, t), a_t, a_prev, schedule, x0_scale=s)
            else:  # one of the last K steps: keep its graph, but only its inputs in memory
                out = torch.utils.checkpoint.checkpoint(denoise, x, t, use_reentrant=False)
                x = sampler.ddim_step(x, out, a_t, a_prev, schedule, x0_scale=s)
        pixels = decode_scored(vae, x, scored, gens)  # (B·N, 3, H, W): N scored frames per example (1 for images)
        scores = reward_of(objective, (pixels.float() / 2 + 0.5).clamp(0, 1), chosen)
        loss = -scores.mean()
        amp.backward(loss * weight)
        r = (1 - scores) if config.npo else scores  # the reward R itself is logged, also when training 1 − R
        return {"loss": loss.item(), "reward": r.mean().item()}
    return step


def video_frames(config, pipe, objective):
    """(frames per video, frames scored per video) of a video model: every frame for a reward of whole clips
    (`rewards.scores_videos`); (None, None) for an image model, which refuses --frames, --score-frames and a clip
    reward. Checked here, once the model has loaded and says which it is."""
    clips = rewards.scores_videos(objective)
    if not pipe.is_video:
        given = [flag for flag, v in (("--frames", config.frames), ("--score-frames", config.score_frames)) if v]
        model = config.model or "the embedded model"
        if given:
            flags = " and ".join(given)
            raise UserError(f"{flags} only apply to video models, and {model} is an image model; drop {flags}, "
                            "or pass --model a video model.")
        if clips:
            raise UserError(f"the reward {config.reward} scores videos, and {model} is an image model; pass --model "
                            "a video model, or an image reward.")
        return None, None
    frames = config.frames or getattr(pipe, "default_frames", None) or DEFAULT_FRAMES  # as `npo.py sample` picks
    if clips and config.score_frames is not None:
        raise UserError(f"--score-frames does nothing with {config.reward}, which scores whole videos (all "
                        f"{frames} frames); drop it.")
    scored = frames if clips else config.score_frames or 1
    if scored > frames:
        raise UserError(f"--score-frames {scored} exceeds the {frames} frames of each video; pass --score-frames "
                        f"at most {frames}, or more --frames.")
    return frames, scored


def reward_of(objective, images, prompts):
    """Each example's reward from its decoded images (B·N, 3, H, W) in [0, 1]: an image's score; for a video, the
    mean of its N scored frames' scores, or a clip reward's score of the whole (B, F, 3, H, W) video."""
    n = len(images) // len(prompts)
    if rewards.scores_videos(objective):
        return objective(images.view(len(prompts), n, *images.shape[1:]), prompts)
    return objective(images, [p for p in prompts for _ in range(n)]).view(len(prompts), n).mean(1)


def decode_scored(vae, x, scored, gens):
    """The images the reward scores, (B·N, 3, H, W) in [−1, 1], with their graph: an image model's x_0 decoded; for
    a video, N frames of each, chosen without repetition from the example's generator (its draw after the prompt
    and x_T, so a resumed run chooses the same) and decoded frame by frame (`video.decode_frames`)."""
    if scored is None:
        return vae.decode(x.to(next(vae.parameters()).dtype) / vae.scaling_factor)
    picks = [torch.randperm(x.shape[2], generator=g)[:scored].sort().values for g in gens]
    chosen = torch.stack([x[b][:, p.to(x.device)] for b, p in enumerate(picks)])  # (B, C, N, h, w)
    return video.decode_frames(vae, chosen).flatten(0, 1)  # (B, N, 3, H, W) -> (B·N, 3, H, W)
