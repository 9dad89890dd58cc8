"""--method ddpo: RL for rewards with or without a gradient (DDPO-IS with PPO's clipping, Black et al. 2024), on R
for η or on 1 − R for NPO's δ.

    python npo.py train --method ddpo --reward rewards:jpeg_incompressibility --prompts-file p.txt --out runs/rl

An epoch samples --sample-batches batches per rank with DDIM (η_ddim > 0) and CFG, keeping each step's latents and
log-probability (`sample`), scores the decoded images, standardises the rewards per prompt (`sample_epoch`), then makes
--inner-epochs passes over the batches in a shuffled order, one PPO update per --grad-accum batches (`micro_step`).
The steps stay latents, never graphs: memory is that of one UNet forward and backward, whatever the number of
sampling steps. The objective (losses.step_log_prob, losses.ppo_loss):

    A      = (R − mean_c) / std_c, clipped to ±adv_clip      per prompt c: the last 16 rewards of c (PerPromptStatTracker)
    ratio  = exp(log p_θ(x_{t−1} | x_t) − log p_old(x_{t−1} | x_t))
    L      = mean(max(−A · ratio, −A · clip(ratio, 1 − ε, 1 + ε)))

NPO trains δ on 1 − R. After the per-prompt standardisation that is exactly −A (the mean moves, the spread does not),
so the NPO of JPEG compressibility is the incompressibility task.
"""
import contextlib
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import torch

from . import data
from . import guided
from . import lora
from . import losses
from . import sampler
from . import trainconfig
from .machinery import (branch_weights, checkpoint_unet_blocks, draw_prompt, example_generator, gather, logprob_steps,
                        stream_generator)
from .trainconfig import DTYPES

BUFFER_SIZE, MIN_COUNT = 16, 16  # ddpo-pytorch's per_prompt_stat_tracking defaults
DDPO_STREAM = 0x6464706F  # DDPO's shuffles: (DDPO_STREAM, epoch, inner epoch) and (…, batch)
SHOWN = ("reward", "reward_std", "approx_kl", "clipfrac")  # printed beside the loss (the log file has every metric)


def read_inputs(config, world_size):
    """The training prompts; the reward is loaded and probed on them now, minutes before the model has loaded."""
    prompts = data.read_prompts(config.prompts_file)
    trainconfig.reward_objective(config, prompts)
    return prompts


def describe(config, prompts):
    return f"{len(prompts)} prompts, reward {config.reward}, {config.sample_batches} sampled batches per epoch"


def unconditional(pipe, batch, size):
    """The unconditional branch's conditioning for `batch` rows, as diffusers' pipelines build it without a negative
    prompt: "" encoded, or for SDXL zeros (force_zeros_for_empty_prompt) beside the time ids of a size × size image.
    It does not depend on the prompts, so one serves every batch."""
    return pipe.negative_conditioning(None, pipe.conditioning([""] * batch, pipe.time_ids(size, size)))


@dataclass
class Rollout:
    """One epoch's samples on this rank, per batch n: latents x_T … x_0 (n, steps + 1, B, C, h, w), in float32 as
    the sampler computed them; the log-probability of each step taken (n, steps, B); the prompt embeddings
    (n, B, 77, D); the clipped advantages (n, B); and the epoch's reward R over all ranks (mean, std)."""
    epoch: int
    latents: torch.Tensor
    log_probs: torch.Tensor
    embeds: dict
    advantages: torch.Tensor
    reward: tuple


def micro_step(run, prompts):
    """One micro-step of DDPO: the PPO loss of one sampled batch over its trained steps, backward. The epoch's
    rollout is sampled at its first micro-step (also the first after a resume, from the checkpointed policy)."""
    config, pipe, device = run.config, run.pipe, run.device
    schedule, steps = logprob_steps(pipe.ddim_config(), config.sample_steps)  # the last step to ᾱ_0
    objective = trainconfig.reward_objective(config, prompts)
    updates = config.sample_batches // config.grad_accum  # optimizer steps per pass over an epoch's batches
    trained = int(len(steps) * config.timestep_fraction)  # ddpo-pytorch's num_train_timesteps
    if config.gradient_checkpointing:
        checkpoint_unet_blocks(pipe.unet)
    neg = unconditional(pipe, config.batch_size, config.resolution)
    rollout = None

    def step(first, weight):
        nonlocal rollout
        index = first // (config.batch_size * run.world_size)  # accumulate's micro-step number, step · A + micro
        update_index, micro = divmod(index, config.grad_accum)
        epoch, k = divmod(update_index, updates * config.inner_epochs)
        inner, update = divmod(k, updates)
        if rollout is None or rollout.epoch != epoch:
            rollout = sample_epoch(run, prompts, objective, steps, schedule, epoch)
        # the batches of a pass in a shuffled order, and a subset of the steps of each: seeded by the epoch and the
        # batch, not the rank, so that W ranks with batch B train exactly as one with batch W·B
        order = torch.randperm(config.sample_batches, generator=stream_generator(config.seed, DDPO_STREAM, epoch, inner))
        n = int(order[update * config.grad_accum + micro])
        chosen = torch.randperm(len(steps), generator=stream_generator(config.seed, DDPO_STREAM, epoch, inner, n))
        pos = {k: v[n] for k, v in rollout.embeds.items()}
        denoise = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance,
                                           branch_weights(config, run.files, config.batch_size, device))
        totals = Counter()
        for j in chosen[:trained].tolist():
            t, a_t, a_prev = steps[j]
            x = rollout.latents[n, j]
            mean, sigma = sampler.ddim_posterior(x, denoise(x.to(DTYPES[config.dtype]), t).float(), a_t, a_prev,
                                                 schedule, config.ddim_eta)
            log_prob = losses.step_log_prob(rollout.latents[n, j + 1], mean, sigma)
            loss, metrics = losses.ppo_loss(log_prob, rollout.log_probs[n, j], rollout.advantages[n], config.clip_range)
            (loss * weight / trained).backward()
            totals.update(loss=loss.item() / trained, **{k: v.item() / trained for k, v in metrics.items()})
        return dict(totals, reward=rollout.reward[0], reward_std=rollout.reward[1])
    return step


def sample_epoch(run, prompts, objective, steps, schedule, epoch):
    """Sample, decode and score this rank's batches of `epoch`; the advantages from all ranks' rewards.

    The policy that samples is the LoRA at the epoch's start. A run resumed inside the epoch samples with that
    policy again (kept in the checkpoint's method state, with the stat tracker as the epoch found it), so it
    sees the same rollout, bit for bit, as the run it continues."""
    config, unet = run.config, run.pipe.unet
    saved = run.method_state
    resumed = saved is not None and saved["epoch"] == epoch  # a run resumed inside this epoch
    policy = saved["policy"] if resumed else offset_values(unet, run.files)
    tracker = saved["tracker"] if resumed else saved["tracker_after"] if saved else {}  # as the last epoch left it
    batches, size = config.sample_batches, config.batch_size * run.world_size
    with offsets_at(unet, policy):
        samples = [sample(run, prompts, objective, steps, schedule,
                               ((epoch * batches + n) * run.world_size + run.rank) * config.batch_size)
                   for n in range(batches)]
    latents, log_probs, scores = (torch.stack([s[i] for s in samples]) for i in (0, 1, 3))
    embeds = {k: torch.stack([s[2][k] for s in samples]) for k in samples[0][2]}
    # all ranks' scores in example order: batch n of rank r holds examples ((epoch · N + n) · W + r) · B + j
    everyone = gather(run, scores).permute(1, 0, 2).reshape(-1)
    first = epoch * batches * size
    chosen = [draw_prompt(prompts, example_generator(config.seed, first + i)) for i in range(batches * size)]
    stats = PerPromptStatTracker(state=tracker)
    advantages = torch.as_tensor(stats.update(chosen, everyone.double().cpu().numpy()), dtype=torch.float32)
    advantages = advantages.clamp(-config.adv_clip, config.adv_clip).view(batches, run.world_size, -1)[:, run.rank]
    run.method_state = {"epoch": epoch, "policy": policy, "tracker": tracker, "tracker_after": stats.state()}
    r = (1 - everyone) if config.npo else everyone  # the reward R itself is logged, also when training 1 − R
    return Rollout(epoch, latents, log_probs, embeds, advantages.to(run.device),
                   (r.mean().item(), r.std(correction=0).item()))


@torch.no_grad()
def sample(run, prompts, objective, steps, schedule, first):
    """One batch of examples first, first + 1, …: DDIM + CFG from x_T with η_ddim = --ddim-eta, each step
    x_{t−1} = μ + σ_t z and its log-probability under N(μ, σ_t²); then decode and score. Prompt, x_T and every z of
    an example come from its own generator. Returns (latents, log-probs, the prompts' conditioning, scores)."""
    config, pipe, device, dtype = run.config, run.pipe, run.device, DTYPES[run.config.dtype]
    gens = [example_generator(config.seed, first + j) for j in range(config.batch_size)]
    chosen = [draw_prompt(prompts, g) for g in gens]
    x = sampler.initial_latents(gens, config.resolution, config.resolution, pipe.unet.config.in_channels, device,
                                torch.float32, pipe.vae.downscale)
    pos = pipe.conditioning(chosen, pipe.time_ids(config.resolution, config.resolution))
    neg = unconditional(pipe, len(chosen), config.resolution)
    denoise = guided.guided_denoiser(pipe.unet, neg, pos, config.guidance,
                                       branch_weights(config, run.files, len(chosen), device))
    latents, log_probs = [x], []
    for t, a_t, a_prev in steps:
        mean, sigma = sampler.ddim_posterior(x, denoise(x.to(dtype), t).float(), a_t, a_prev, schedule, config.ddim_eta)
        x = mean + sigma * sampler.randn(x.shape, gens, device)
        latents.append(x)
        log_probs.append(losses.step_log_prob(x, mean, sigma))
    pixels = pipe.vae.decode(x.to(next(pipe.vae.parameters()).dtype) / pipe.vae.scaling_factor)
    scores = objective((pixels.float() / 2 + 0.5).clamp(0, 1), chosen).float().to(device)
    return torch.stack(latents), torch.stack(log_probs), pos, scores


def offset_values(unet, roles):
    """{role: {key: tensor}}, a copy of the trained offsets' values (the policy of a DDPO epoch)."""
    return {role: {k: v.detach().clone() for k, v in lora.offset_state_dict(unet, role).items()} for role in roles}


@contextlib.contextmanager
def offsets_at(unet, values):
    """The offsets hold `values` ({role: {key: tensor}}) inside the block and their own values again after it."""
    own = offset_values(unet, values)
    _copy_offsets(unet, values)
    try:
        yield
    finally:
        _copy_offsets(unet, own)


def _copy_offsets(unet, values):
    with torch.no_grad():
        for role, tensors in values.items():
            for k, v in lora.offset_state_dict(unet, role).items():  # views of the parameters
                v.copy_(tensors[k])


class PerPromptStatTracker:
    """DDPO's advantage: each reward standardised by the last `buffer_size` rewards of its own prompt, or by the
    whole batch's while that prompt has fewer than `min_count` (the buffer counts this batch's rewards already).
    std is the population std plus 1e-6. The buffers persist across epochs; `state()` is what a checkpoint keeps."""

    def __init__(self, buffer_size=BUFFER_SIZE, min_count=MIN_COUNT, state=None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats = {p: deque(v, maxlen=buffer_size) for p, v in (state or {}).items()}

    def update(self, prompts, rewards):
        """Advantages (float64 array, one per reward) of a batch; adds the rewards to their prompts' buffers."""
        prompts, rewards = np.array(prompts, dtype=object), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in sorted(set(prompts)):
            mine = prompts == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mine].tolist())
            pool = np.array(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mine] = (rewards[mine] - pool.mean()) / (pool.std() + 1e-6)
        return advantages

    def state(self):
        """{prompt: [rewards, oldest first]}: plain lists of floats, exact in a torch.save / weights_only load."""
        return {p: list(v) for p, v in self.stats.items()}
