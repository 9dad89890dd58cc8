"""--method dpo (and sft): Diffusion-DPO (Wallace et al. 2024) on preference pairs, each pair swapped for NPO's δ.

    python npo.py train --data pairs.jsonl --out runs/dpo            # η, the preference offset
    python npo.py train --data pairs.jsonl --out runs/npo --npo      # δ, the NPO offset (paper eq. 8)

One micro-step, for each pair (x_w, x_l, c) of the batch (DESIGN §4):

    z     = s · (μ(x) + σ(x) ⊙ n)        a sample of the VAE posterior q(z|x), s the VAE's scaling factor
    t ~ U{0, …, T−1},  ε ~ N(0, I)       one timestep and one noise, shared by the two images of a pair
    z_t   = √ᾱ_t z + √(1−ᾱ_t) ε
    d_θ   = ‖ε_θ(z_t^w) − ε‖² − ‖ε_θ(z_t^l) − ε‖²          the UNet with the LoRA on (multiplier 1)
    d_ref = the same with the LoRA off (multiplier 0): the reference is the base, never a second UNet copy
    L     = −log σ(β (d_ref − d_θ))                          losses.dpo_loss
With --npo each pair is swapped, (x_l, x_w, c), and nothing else changes: the offset learns δ. (The swap is applied
to the pair's latents, so every image keeps its posterior sample and an NPO step sees exactly what the DPO step
sees, with the roles reversed: at a zero offset its first update is the DPO run's, negated.) --method sft trains
on the plain denoising loss of the preferred image instead (losses.sft_loss) and logs the same DPO metrics.

The appendix's table 7 (II.3) trains NPO on worse data (`corrupted`): --perturb-prompts shuffles the captions of
each batch, --corrupt blur:σ blurs the losers, which the swap makes what δ learns toward (README, "Table 7").

SDXL (Podell et al. 2023) conditions the UNet on more than c: its pooled text embedding and each pair's time ids
(the image's original size, the crop's corner, the target size), built as diffusers' SDXL Diffusion-DPO script
builds them (`pair_time_ids`); the VAE then encodes in float32. That script writes L = −log σ(−0.5·β' (d_θ −
d_ref)), so β = β'/2: the authors' SDXL NPO runs (β' = 2000) are --beta-dpo 1000.
"""
import hashlib

import torch

from . import data
from . import guided
from . import lora
from . import losses
from . import sampler
from . import shards
from .checkpoint import UserError
from .machinery import checkpoint_unet_blocks, example_generator, stream_generator
from .trainconfig import DTYPES

SHOWN = ("implicit_acc", "reward_margin")  # printed beside the loss (the log file has every metric)
PERTURB_STREAM = 0x70657274  # --perturb-prompts: (PERTURB_STREAM, first example of the micro-batch)


def read_inputs(config, world_size):
    """The preference pairs of --data, opened and checked before the model loads."""
    pairs = data.open_pairs(config.data, config.skip_bad_rows, config.ties, config.shuffle_buffer)
    if config.cache_latents and isinstance(pairs, shards.Shards):
        raise UserError("--cache-latents keeps every image's latents in memory, which a stream of parquet shards "
                        "would fill (each image comes once an epoch); drop --cache-latents.")
    if len(pairs) < config.batch_size * world_size:
        raise UserError(f"{config.data} has {len(pairs)} usable pairs, fewer than one batch of "
                        f"{config.batch_size * world_size}; lower --batch-size or add pairs.")
    return pairs


def describe(config, pairs):
    return repr(pairs)


def micro_step(run, pairs):
    """The function of one micro-step: forward and backward of the next batch of pairs; returns its metrics. It
    also tells the loop this rank's place in a streamed dataset (`stream_state`) and what was skipped (`summary`)."""
    config, pipe, device, amp = run.config, run.pipe, run.device, run.amp
    (role,) = run.files
    unet, vae, dtype = pipe.unet, pipe.vae, DTYPES[config.dtype]
    schedule = sampler.DDIMConfig.from_dict(pipe.scheduler_config)
    ac = sampler.alphas_cumprod(schedule)  # ᾱ_t, t = 0 … T−1
    if config.gradient_checkpointing:
        checkpoint_unet_blocks(unet)
    # the data: example i of the stream is micro-step i // (B·W), rank (i // B) % W, row i % B
    stream = data.batches(pairs, config.batch_size, config.seed, config.resolution,
                          start_step=run.step * config.grad_accum, random_crop=config.random_crop,
                          caption_dropout=config.caption_dropout, rank=run.rank, world_size=run.world_size,
                          num_workers=config.num_workers, start_state=stream_start(run, pairs), sizes=pipe.is_sdxl)
    cache = {} if config.cache_latents else None

    def step(first, weight):
        prompts, preferred, rejected, *sizes = next(stream)
        prompts, rejected = corrupted(config, prompts, rejected, first)
        gens = [example_generator(config.seed, first + j) for j in range(config.batch_size)]
        # the VAE in its own dtype: float32 for SDXL's (pipeline.vae_dtype), as the SDXL DPO script encodes
        vae_dtype = next(vae.parameters()).dtype
        mean, std = posterior(vae, torch.cat([preferred, rejected]), device, vae_dtype, cache)  # [x_w; x_l]
        shape = mean.shape[1:]
        # from each pair's own generator, in this order: t, ε, then the posterior noises of x_w and x_l
        draws = [(torch.randint(0, len(ac), (1,), generator=g), torch.randn((1, *shape), generator=g),
                  torch.randn((2, *shape), generator=g)) for g in gens]
        t = torch.cat([d[0] for d in draws]).repeat(2).to(device)            # shared within a pair
        eps = torch.cat([d[1] for d in draws]).repeat(2, 1, 1, 1).to(device)  # shared within a pair
        n = torch.cat([d[2][0:1] for d in draws] + [d[2][1:2] for d in draws]).to(device, mean.dtype)
        z = ((mean + std * n) * vae.scaling_factor).float()  # a posterior sample, scaled (DESIGN §3)
        if config.npo:  # eq. 8: (x_l, x_w, c), the loser trained as the winner; each latent keeps its noise
            z = losses.swap_halves(z)
        z_t = sampler.add_noise(z, eps, t, ac).to(dtype)
        target = sampler.target(z, eps, t, ac, schedule.prediction_type)  # ε, or v for v-prediction models
        c = pipe.conditioning(prompts, pair_time_ids(sizes[0], config.resolution) if sizes else None)
        context = guided.cat_conditioning(c, c)  # both images of a pair: its text, pooled text and time ids

        with amp.autocast():
            model_pred = guided.run_unet(unet, z_t, t, context).float()
            # the reference: the same UNet with the offset switched off. (With gradient checkpointing the backward
            # recomputes the LoRA forward later, outside this block, so at multiplier 1 again.)
            with torch.no_grad(), lora.multipliers(unet, **{role: 0.0}):
                ref_pred = guided.run_unet(unet, z_t, t, context).float()
        loss, metrics = losses.dpo_loss(model_pred, ref_pred, target, config.beta_dpo)
        if config.method == "sft":  # SFT logs the same DPO metrics, so the two runs read alike
            loss = losses.sft_loss(model_pred, target)
        amp.backward(loss * weight)
        return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
    step.close = stream.close
    step.stream_state = lambda: getattr(stream, "state", None)  # a sharded dataset's place; else None
    step.summary = lambda: summary(config, pairs, getattr(stream, "counts", {}))
    return step


def corrupted(config, prompts, rejected, first):
    """The appendix's table 7 (II.3), NPO's training data made worse, after the stream and before the VAE; the
    other images, the sizes and every draw of the step are untouched:
    --perturb-prompts: the batch's captions in a random order, drawn from the generator of (seed, PERTURB_STREAM,
      first example of the micro-batch), so a resumed run draws it again; each rank shuffles its own batch.
    --corrupt blur:σ: the loser x_l blurred. --npo (required) swaps it into the preferred slot: what δ learns toward."""
    if config.perturb_prompts:
        prompts = data.shuffle_prompts(prompts, stream_generator(config.seed, PERTURB_STREAM, first))
    if config.corrupt:
        rejected = data.corrupt(rejected, config.corrupt)
    return prompts, rejected


def summary(config, pairs, counts):
    """"skipped N bad rows and dropped M ties of DATA", or None when nothing was."""
    skipped = getattr(pairs, "skipped", 0) + counts.get("bad", 0)
    dropped = ([f"skipped {skipped} bad rows"] * bool(skipped)
               + [f"dropped {counts.get('ties')} ties"] * bool(counts.get("ties")))
    return f"{' and '.join(dropped)} of {config.data}" if dropped else None


def stream_start(run, pairs):
    """This rank's place to start a streamed dataset (parquet shards): where the checkpoint resumed left it."""
    if not isinstance(pairs, shards.Shards) or run.streams is None:
        return None
    if len(run.streams) != run.world_size:
        raise UserError(f"{run.resumed_from} streamed the shards on {len(run.streams)} rank(s), and this run has "
                        f"{run.world_size}; resume with {len(run.streams)} rank(s) (each rank has its own place).")
    return tuple(run.streams[run.rank])


def pair_time_ids(sizes, resolution):
    """SDXL's time ids of each pair (B, 6), as diffusers' SDXL Diffusion-DPO script builds them: the original (H, W)
    of the image, the crop's (top, left) in the resized image, and the target (R, R). The script takes the first
    image's size (it resizes the second to it); here the preferred image's, the same for pairs of one size."""
    return torch.cat([sizes, torch.tensor([resolution, resolution]).expand(len(sizes), 2)], dim=1)


@torch.no_grad()
def posterior(vae, pixels, device, dtype, cache=None):
    """The VAE posterior q(z|x) = N(μ, σ²) of each image (unscaled latents): `(mean, std)`, each (N, C, h, w).

    With a cache (--cache-latents) each distinct image is encoded once, on its own, and its moments are kept on
    the CPU. The cache is keyed by the pixels because the data stream hands us pixels, not row ids; with center
    crops an image comes in two versions (flipped or not), so a pair costs at most four encodes in a whole run.
    Caching μ and σ rather than a latent keeps the posterior sample fresh each time, as without the cache.
    (Encoding alone, not in a batch, also makes the moments the same bits after a resume refills the cache.)"""
    if cache is None:
        q = vae.encode(pixels.to(device, dtype))
        return q.mean, q.std
    moments = []
    for x in pixels:
        key = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest()
        if key not in cache:
            q = vae.encode(x[None].to(device, dtype))
            cache[key] = (q.mean.cpu(), q.std.cpu())
        moments.append(cache[key])
    return tuple(torch.cat(m).to(device) for m in zip(*moments))
