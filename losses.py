"""Every training objective, as pure functions of tensors: no model inside, so each one is testable with random inputs.

    dpo_loss + swap_pairs / swap_halves   Diffusion-DPO, and NPO's only change to it: each pair swapped (eq. 8)
    sft_loss, diffusion_loss              the plain denoising loss (on the preferred image)
    step_log_prob, ppo_loss               DDPO: the log-probability of a DDIM step, PPO's clipped objective
    spo_loss                              SPO: a DPO-like loss on clamped step ratios of a (better, worse) pair
The reward methods maximize R(x, c) itself; NPO's reward is 1 − R (eq. 7), `rewards.negate`, applied to the reward
rather than written as a loss here. SPO's NPO swaps its pairs (`swap_pairs`).

Batch layout for preference pairs: `[preferred; rejected]` along dim 0, i.e. rows `0..B-1` are the winners
`x_w` and rows `B..2B-1` their losers `x_l`, pair `i` being rows `i` and `B+i`. Both halves share the noise `ε`
and the timestep `t` (Diffusion-DPO), so `target` is usually `ε` repeated twice (or the v-prediction target).
All losses are computed in float32 whatever the dtype of the predictions.
"""
import math

import torch
import torch.nn.functional as F


def per_sample_mse(pred, target):
    """‖pred − target‖² averaged over every non-batch dim: one number per sample, shape (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(model_pred, target):
    """The plain denoising loss  L = E‖ε_θ(x_t, c, t) − ε‖²  (mean over all elements)."""
    return F.mse_loss(model_pred.float(), target.float())


def sft_loss(model_pred, target):
    """Supervised fine-tuning on the winners: the denoising loss on the preferred half of a `[w; l]` batch.

    L = E‖ε_θ(x_w, c, t) − ε‖². (If only the preferred images were run, use `diffusion_loss`.)"""
    _check_pairs(model_pred, target)
    return diffusion_loss(model_pred.chunk(2)[0], target.chunk(2)[0])


def dpo_loss(model_pred, ref_pred, target, beta):
    """Diffusion-DPO (Wallace et al. 2024) on a `[w; l]` batch, in diffusers' convention:

        d_θ   = ‖ε_θ(x_w,t) − ε‖² − ‖ε_θ(x_l,t) − ε‖²        (per-sample means over C,H,W)
        d_ref = ‖ε_ref(x_w,t) − ε‖² − ‖ε_ref(x_l,t) − ε‖²
        L     = −log σ(β · (d_ref − d_θ))                 averaged over the pairs

    Lowering L lowers the model's denoising error on the winner relative to the loser, measured against the
    reference (the frozen base: the same UNet with the LoRA off). Salesforce's DiffusionDPO code writes the same
    loss as −log σ(−0.5·β_sf·(d_θ − d_ref)), so β_sf = 2β: their 5000 is our 2500.

    `ref_pred` is a constant (it is detached here in case the caller forgot `torch.no_grad()`).
    Returns `(loss, metrics)`; the metrics are detached 0-dim tensors (call `.item()` when logging):
      implicit_acc   mean(d_ref − d_θ > 0), a tie (exactly 0, e.g. at step 0 when the LoRA is still zero)
                     counting 1/2 as in diffusers, so swapping the pairs turns accuracy a into 1 − a;
      reward_margin  mean(β · (d_ref − d_θ)), the logit inside σ (TRL's "rewards/margins");
      mse_w, mse_l, ref_mse_w, ref_mse_l  the mean denoising errors of model and reference on each half.
    """
    _check_pairs(model_pred, target)
    _check_pairs(ref_pred, target)
    mse_w, mse_l = per_sample_mse(model_pred, target).chunk(2)
    ref_mse_w, ref_mse_l = per_sample_mse(ref_pred.detach(), target).chunk(2)
    margin = (ref_mse_w - ref_mse_l) - (mse_w - mse_l)  # d_ref − d_θ, one per pair
    # −log σ(z) = softplus(−z): logsigmoid stays finite for any finite z, so a huge β cannot overflow to inf/nan
    loss = -F.logsigmoid(beta * margin).mean()
    with torch.no_grad():
        metrics = dict(implicit_acc=((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
                       reward_margin=(beta * margin).mean(),
                       mse_w=mse_w.mean(), mse_l=mse_l.mean(),
                       ref_mse_w=ref_mse_w.mean(), ref_mse_l=ref_mse_l.mean())
    return loss, {k: v.detach() for k, v in metrics.items()}


def swap_pairs(preferred, rejected):
    """NPO's only change to DPO (paper eq. 8): reverse each preference pair, r_NPO = (x_l, x_w, c).

    Train with `dpo_loss` on the swapped pairs and the offset learns what people do *not* prefer (δ)."""
    return rejected, preferred


def swap_halves(batch):
    """`swap_pairs` on a batch laid out `[w; l]` along dim 0: returns `[l; w]`."""
    _check_pairs(batch)
    preferred, rejected = batch.chunk(2)
    return torch.cat(swap_pairs(preferred, rejected))


def _check_pairs(*tensors):
    # a programming error, not bad user input: the trainer builds these batches
    shape = tensors[0].shape
    if shape[0] % 2 or any(t.shape != shape for t in tensors):
        raise ValueError(f"expected [preferred; rejected] batches of one shape with an even batch size, "
                         f"got {[tuple(t.shape) for t in tensors]}")


# ----------------------------------------------------------------------------------------------------------
# DDPO (Black et al. 2024). Sampling with DDIM at η_ddim > 0 is a Markov chain of Gaussians,
# x_{t−1} ~ N(μ_θ(x_t), σ_t² I) (sampler.ddim_posterior), so each step taken has a log-probability under the current
# weights. DDPO-IS maximizes the reward of the final image with the importance-sampled policy gradient over those
# steps, clipped as PPO clips it; the advantages A are the rewards standardised per prompt (method_ddpo).

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


# ----------------------------------------------------------------------------------------------------------
# SPO (Liang et al. 2024). At one denoising step, two candidates x_{t−1} drawn from the same x_t are ranked by a
# step-aware preference model; the policy is pushed to raise the step probability of the better one against the
# worse, each measured as a ratio to the frozen reference's (method_spo).

def spo_loss(log_prob_w, log_prob_l, ref_log_prob_w, ref_log_prob_l, beta, clip):
    """SPO's loss per pair (RockeyCoss/SPO train_spo.py), with log p the DDIM step's log-probability (`step_log_prob`)
    of the preferred x_w and the rejected x_l, both drawn from one x_t, under θ and under the reference:

        r_w = clamp(exp(log p_θ(x_w) − log p_ref(x_w)), 1 − ε, 1 + ε)     (r_l likewise)
        L   = −log σ(β (log r_w − log r_l))                              SPO: β = 10, ε = 0.1

    The clamp stops the gradient of a ratio outside [1 − ε, 1 + ε] (a trust region on each step). Returns
    (L per pair (P,), r_w, r_l); the caller averages. With the pair swapped, dL/d(log r_w − log r_l) goes from
    −β σ(−β d) to +β σ(β d): exactly the negative where d = 0 (θ = the reference), not elsewhere."""
    ratio_w = torch.clamp(torch.exp(log_prob_w - ref_log_prob_w.detach()), 1 - clip, 1 + clip)
    ratio_l = torch.clamp(torch.exp(log_prob_l - ref_log_prob_l.detach()), 1 - clip, 1 + clip)
    return -F.logsigmoid(beta * (torch.log(ratio_w) - torch.log(ratio_l))), ratio_w, ratio_l
