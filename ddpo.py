"""DDPO (Black et al. 2024, "Training Diffusion Models with Reinforcement Learning"), its pure pieces: the
log-probability of one DDIM step, the per-prompt advantage, and PPO's clipped objective. The loop that samples and
updates is `method_ddpo.micro_step`; this file holds the math it calls, testable without a model.

Sampling with DDIM at η_ddim > 0 is a Markov chain of Gaussians, x_{t−1} ~ N(μ_θ(x_t), σ_t² I) (sampler.ddim_posterior),
so each step taken has a log-probability under the current weights. DDPO-IS maximises the reward R of the final image
with the importance-sampled policy gradient over those steps, clipped as PPO clips it:

    A      = (R − mean_c) / std_c, clipped to ±adv_clip      per prompt c: the last 16 rewards of c (PerPromptStatTracker)
    ratio  = exp(log p_θ(x_{t−1} | x_t) − log p_old(x_{t−1} | x_t))
    L      = mean(max(−A · ratio, −A · clip(ratio, 1 − ε, 1 + ε)))

NPO trains δ on 1 − R. After the per-prompt standardisation that is exactly −A (the mean moves, the spread does not),
so the NPO of JPEG compressibility is the incompressibility task.
"""
import math
from collections import deque

import numpy as np
import torch

BUFFER_SIZE, MIN_COUNT = 16, 16  # ddpo-pytorch's per_prompt_stat_tracking defaults


def step_log_prob(x_prev, mean, sigma):
    """log N(x_prev; μ, σ²) per image, averaged (not summed) over the latent dimensions, as DDPO defines it:

        log p = mean_{C,H,W}[ −(x_prev − μ)² / (2σ²) − log σ − log √(2π) ]

    The mean rather than the sum keeps log p of order 1 whatever the latent size; hence PPO's tiny clip range."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    log_p = -((x_prev.detach() - mean) ** 2) / (2 * sigma ** 2) - torch.log(sigma) - math.log(math.sqrt(2 * math.pi))
    return log_p.mean(dim=tuple(range(1, log_p.ndim)))


def ppo_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped surrogate L = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(log p_θ − log p_old).

    Returns (L, metrics): approx_kl = ½·mean((log p_θ − log p_old)²), the estimator DDPO logs, and clipfrac, the
    share of ratios outside [1 − ε, 1 + ε]."""
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    metrics = {"approx_kl": 0.5 * (diff.detach() ** 2).mean(),
               "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean()}
    return loss, metrics


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
