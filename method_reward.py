"""--method reward: differentiable-reward fine-tuning through the sampler (DRaFT-K, Clark et al. 2024; AlignProp),
on R for η or on 1 − R for NPO's δ (paper eq. 7).

    python npo.py train --method reward --reward shapes:reward --prompts-file p.txt --out runs/r --npo   # eq. 7
    python npo.py train --method reward ... --train-branch uncond --lora eta.safetensors   # δ on ε_neg only

One micro-step samples each example from noise with DDIM and CFG, the offsets on, keeps gradients only through the
last K denoising steps (each UNet call checkpointed), decodes, and minimizes −R(x_0, c) (δ: −(1 − R)). With
--train-branch uncond the trained offset is δ on the unconditional branch only, beside a frozen η (--lora):
`machinery.branch_weights`.
"""
import torch
import torch.utils.checkpoint

from . import data
from . import guided
from . import sampler
from . import trainconfig
from .machinery import branch_weights, draw_prompt, example_generator
from .trainconfig import DTYPES

SHOWN = ("reward",)  # printed beside the loss (the log file has every metric)


def read_inputs(config, world_size):
    """The training prompts; the reward is loaded and probed on them now, minutes before the model has loaded."""
    prompts = data.read_prompts(config.prompts_file)
    trainconfig.reward_objective(config, prompts)
    return prompts


def describe(config, prompts):
    return f"{len(prompts)} prompts, reward {config.reward}"


def micro_step(run, prompts):
    """Sample each example from noise with DDIM and CFG, the offsets on; gradients flow only through the last K
    (--grad-steps) denoising steps, each UNet call of which is checkpointed; decode; loss = −R (δ: −(1 − R)).

    The offsets run on the CFG branches that `branch_weights` gives."""
    config, pipe, device, amp = run.config, run.pipe, run.device, run.amp
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[config.dtype]
    schedule = pipe.ddim_config()
    steps = sampler.ddim_steps(schedule, config.sample_steps)
    objective = trainconfig.reward_objective(config, prompts)  # R, or 1 − R with --npo
    size, channels = config.resolution, unet.config.in_channels

    def step(first, weight):
        gens = [example_generator(config.seed, first + j) for j in range(config.batch_size)]
        chosen = [draw_prompt(prompts, g) for g in gens]
        x = sampler.initial_latents(gens, size, size, channels, device, dtype, vae.downscale)
        pos = pipe.conditioning(chosen, pipe.time_ids(size, size))
        neg = pipe.negative_conditioning(None, pos)  # "", or SDXL's zeros: diffusers without a negative prompt
        weights = branch_weights(config, run.files, len(chosen), device)
        guide = guided.guided_denoiser(unet, neg, pos, config.guidance, weights)

        def denoise(x, t):  # the UNet under autocast (--mixed-precision); the DDIM update in x's dtype
            with amp.autocast():
                return guide(x, t).to(x.dtype)
        for i, (t, a_t, a_prev) in enumerate(steps):
            if i < len(steps) - config.grad_steps:
                with torch.no_grad():
                    x = sampler.ddim_step(x, denoise(x, t), a_t, a_prev, schedule)
            else:  # one of the last K steps: keep its graph, but only its inputs in memory
                out = torch.utils.checkpoint.checkpoint(denoise, x, t, use_reentrant=False)
                x = sampler.ddim_step(x, out, a_t, a_prev, schedule)
        pixels = vae.decode(x.to(next(vae.parameters()).dtype) / vae.scaling_factor)
        scores = objective((pixels.float() / 2 + 0.5).clamp(0, 1), chosen)
        loss = -scores.mean()
        amp.backward(loss * weight)
        r = (1 - scores) if config.npo else scores  # the reward R itself is logged, also when training 1 − R
        return {"loss": loss.item(), "reward": r.mean().item()}
    return step
