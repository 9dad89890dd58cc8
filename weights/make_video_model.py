"""Make the embedded video model in weights/video/ from the embedded image model: a ModelScope-shaped UNet3D, trained
on the moving shapes of `shapes.py`.

    OMP_NUM_THREADS=1 python weights/make_video_model.py --out /tmp/stage1                 # stage 1 (seeded)
    OMP_NUM_THREADS=1 python weights/make_video_model.py --init /tmp/stage1 --seed 1 --out /tmp/stage2   # stage 2
    python weights/make_video_model.py --init /tmp/stage2 --seed 4 --steps 1500 --clips 4096 --stf --v-weighting \
        --top-share 0.75 --threads 2 --out /tmp/stage3                                  # stage 3: the top of the schedule
    python weights/make_video_model.py --init /tmp/stage3 --seed 5 --steps 700 --stf --v-weighting \
        --top-share 0.25 --threads 2 --out /tmp/stage4                                  # stage 4
    python weights/make_video_model.py --init /tmp/stage4 --seed 6 --steps 800 --clips 4096 --stf --top-mean \
        --v-weighting --top-share 0.5 --threads 2 --out /tmp/stage5                      # stage 5
    python weights/make_video_model.py --init /tmp/stage5 --seed 7 --steps 500 --stf --top-mean --v-weighting \
        --top-share 0.25 --threads 2                                                    # stage 6: weights/video/
    python weights/make_video_model.py --out /tmp/v --steps 100        # a quick, worse one somewhere else

Video models are made this way (ModelScope's text-to-video is Stable Diffusion inflated): the UNet3D's spatial layers
(ResBlocks, spatial transformers, time embedding, conv_in / conv_out) start as the embedded image UNet's weights
(weights/unet, the same names), the temporal layers it adds (a temporal conv stack after every ResBlock, a temporal
transformer after every spatial one, `transformer_in` after conv_in) start with their output projections at zero, so
that the new network is, at first, the image model applied to each frame. Then the whole UNet is trained with the
ε-prediction loss on `a {color} {shape} moving {direction}` clips (8 frames of 64x64, `shapes.draw_video_example`)
encoded by the image model's VAE, 10% of captions dropped to "" for classifier-free guidance; the weights written are
an EMA. The VAE, the text encoder and the tokenizer are the image model's, unchanged, and are not copied:
weights/video/npo_model.json names their folders (`../vae`, ...), where pipeline.load_pipeline reads them.

Every random number comes from --seed, so the same command on the same torch build writes the same files.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import save

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from npo import checkpoint  # noqa: E402
from npo import clip  # noqa: E402
from npo import sampler  # noqa: E402
from npo import shapes  # noqa: E402
from npo import unet  # noqa: E402
from npo import video  # noqa: E402

# The image UNet's configuration (weights/unet/config.json) in UNet3DConditionModel's fields. Heads: a 3D block has
# channels / attention_head_dim heads of attention_head_dim each (in the 2D config the same field counts heads, 4),
# so 16 keeps the image model's 4 heads of 16 at the first level; at the second level (128 channels) and in the mid
# block its 4 heads of 32 become 8 heads of 16 (the field is one number for all levels in ModelScope's layout), the
# one place where the inflated model does not start as the image model, which training then adapts.
UNET3D = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64, 128], layers_per_block=1,
              down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
              up_block_types=["CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
              attention_head_dim=16, cross_attention_dim=32, norm_num_groups=16, norm_eps=1e-5)
TEMPORAL = ("temp_convs", "temp_attentions", "transformer_in")  # the names of the layers inflation adds
# How weights/video/ borrows the image model's parts (pipeline.load_pipeline honours it): folder -> where it lies.
SHARED = {"vae": "../vae", "text_encoder": "../text_encoder", "tokenizer": "../tokenizer"}


def inflate(image_unet):
    """A UNet3DCondition whose spatial layers are `image_unet`'s weights (same names; ModelScope's layout has linear
    proj_in / proj_out where SD1.5's are 1x1 convs) and whose temporal layers add nothing yet: the last conv of each temporal conv stack and the output projection of each temporal transformer
    are zero, so each adds 0 to its residual stream."""
    model = video.UNet3DCondition(video.UNet3DConfig(**UNET3D))
    state = model.state_dict()
    image = image_unet.state_dict()
    new = [k for k in state if k not in image]
    assert all(any(part in k for part in TEMPORAL) for k in new), [k for k in new if not any(p in k for p in TEMPORAL)]
    assert all(k in state for k in image), [k for k in image if k not in state]
    for k, v in image.items():  # ModelScope's spatial transformers project linearly: a 1x1 conv's (o, i, 1, 1)
        state[k] = v.reshape(state[k].shape)  # weight is the same map as a Linear's (o, i)
    for k in new:  # the temporal stacks' last conv (conv4.3: conv4.0 is its GroupNorm, which must stay 1, or no
        # gradient ever reaches the conv), the temporal transformers' output projection
        if ".conv4.3." in k or "proj_out" in k:
            state[k] = torch.zeros_like(state[k])
    model.load_state_dict(state)
    return model


def clip_batch(rng, n):
    """n random clips as (n, F, 3, 64, 64) in [-1, 1], and their captions."""
    clips, captions = zip(*(shapes.draw_video_example(rng) for _ in range(n)))
    pixels = np.stack([np.stack([np.asarray(frame) for frame in c]) for c in clips])
    return torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).float() / 127.5 - 1, list(captions)


@torch.no_grad()
def encode_dataset(vae, n, seed):
    """n clips' per-frame posterior moments (mean, std), each (n, 4, F, 8, 8), and captions, encoded once."""
    rng = np.random.default_rng(seed + 1)
    means, stds, captions = [], [], []
    for start in range(0, n, 32):
        pixels, caps = clip_batch(rng, min(32, n - start))
        b, f = pixels.shape[:2]
        q = vae.encode(pixels.flatten(0, 1))
        means.append(q.mean.unflatten(0, (b, f)).transpose(1, 2))  # (B·F, C, h, w) -> (B, C, F, h, w)
        stds.append(q.std.unflatten(0, (b, f)).transpose(1, 2))
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def caption_embeddings(text_encoder, tokenizer):
    """The frozen text encoder's output for every caption of the world and for "" (the unconditional branch)."""
    prompts = shapes.video_prompts() + [""]
    return dict(zip(prompts, text_encoder(tokenizer(prompts))))


def stf_x0(x_t, t, ac, z, references):
    """The x_0 target of a Stable Target Field (Xu et al. 2023, "Stable Target Field for Reduced Variance Score
    Estimation in Diffusion Models"): not the one clip but the posterior average over a reference set,
    x_0* = Σ_i w_i z_i with w_i ∝ p(x_t | z_i) = N(x_t; √ᾱ z_i, (1−ᾱ) I); the ε (or v) target follows from it. The
    references are the clip `z` itself and the other clips of its caption. At low noise the weights fall on `z`;
    at high noise, where x_t hardly says which clip it came from, x_0* averages over the caption's clips, so the UNet
    is taught the part of the clip its caption decides (the direction of motion, every frame's place) without the
    noise of where this one clip happened to start. x_t, z (C, F, h, w); references (n, C, F, h, w)."""
    a = ac[t]
    refs = torch.cat([z[None], references])
    log_w = -((x_t - a ** 0.5 * refs) ** 2).flatten(1).sum(1) / (2 * (1 - a))
    return torch.einsum("n,n...->...", log_w.softmax(0), refs)


def lr_at(step, steps, peak, warmup=100):
    """Linear warmup, then cosine decay to 10% of `peak`."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train(model, vae, embeddings, args, log):
    """The ε-prediction loss on noised clip latents: one timestep per clip, noise per frame, 10% empty captions; with
    --stf, --top-mean, --v-weighting, --top-share and --zero-snr, the target, weight and timesteps of stages 3 to 5
    (README)."""
    torch.manual_seed(args.seed)
    mean, std, captions = encode_dataset(vae, args.clips, args.seed)
    context = torch.stack([embeddings[c] for c in captions])
    scaled = mean * vae.scaling_factor
    by_caption = {c: torch.tensor([i for i, d in enumerate(captions) if d == c]) for c in set(captions)}
    everything = torch.arange(len(captions))
    empty = embeddings[""]
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = scheduler_config(args.zero_snr)
    ac = sampler.alphas_cumprod(sampler.DDIMConfig.from_dict(schedule))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        rows = torch.randint(0, len(captions), (args.batch_size,), generator=g)
        z = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)) * vae.scaling_factor
        c = context[rows].clone()
        dropped = torch.rand(args.batch_size, generator=g) < 0.1
        c[dropped] = empty  # caption dropout: the unconditional branch
        # timesteps drawn with density ∝ t^2 (t = T·u^(1/3)): two thirds above 700, where x_t is mostly noise and the
        # clip's layout and motion are decided; the image model's spatial layers already know the low-noise end
        t = (len(ac) * torch.rand(args.batch_size, generator=g) ** (1 / 3)).long().clamp(max=len(ac) - 1)
        t[:round(args.top_share * args.batch_size)] = len(ac) - 1
        x_t = sampler.add_noise(z, eps := torch.randn(z.shape, generator=g), t, ac)
        if args.stf or args.top_mean:
            # the references: the other clips of the caption, or every other clip where the caption was dropped
            pools = [everything if d else by_caption[captions[r]] for r, d in zip(rows.tolist(), dropped.tolist())]
            others = [pool[pool != r] for pool, r in zip(pools, rows.tolist())]
            z = torch.stack([scaled[pool].mean(0) if args.top_mean and t[i] == len(ac) - 1 else
                             stf_x0(x_t[i], t[i], ac, z[i], scaled[o]) if args.stf else z[i]
                             for i, (pool, o) in enumerate(zip(pools, others))])
            a = ac[t].view(-1, 1, 1, 1, 1)
            eps = (x_t - a ** 0.5 * z) / (1 - a) ** 0.5
        # v-prediction's weighting 1/ᾱ_t (‖v̂ − v‖² = ‖ε̂ − ε‖² / ᾱ_t): the error in x̂_0 counts as much at t = 999,
        # where the direction is decided, as at t = 0; plain ε-MSE weights it by ᾱ/(1 − ᾱ), 0.005 at the top
        weight = 1 / ac[t] if args.v_weighting else torch.ones(len(t))
        goal = sampler.target(z, eps, t, ac, schedule["prediction_type"])
        loss = (weight * ((model(x_t, t, c) - goal) ** 2).mean(dim=(1, 2, 3, 4))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        if step % 50 == 0 or step == args.steps - 1:
            log(f"unet3d {step}/{args.steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.load_state_dict(ema)
    return model.eval()


def scheduler_config(zero_snr):
    """The image model's scheduler config; with `zero_snr`, on the schedule rescaled to ᾱ_{T−1} = 0 and with
    v-prediction and trailing timesteps (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed"), so that at t = T − 1 the prompt is all the UNet has to go on (v = −x_0 there)."""
    config = checkpoint.read_json(os.path.join(HERE, "scheduler", "scheduler_config.json"))
    if zero_snr:
        config.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    return config


def write_json(path, value):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def save_video_model(model, out, zero_snr=False):
    """unet/ (config.json + fp16 safetensors: a few MB), scheduler/ (the image model's), and npo_model.json: the
    folders of the shared parts, relative to `out`, and the clips' length (sample's default --frames)."""
    os.makedirs(os.path.join(out, "unet"), exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    checkpoint.atomic_write(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"),
                            lambda f: f.write(save(state)))
    write_json(os.path.join(out, "unet", "config.json"), dict(_class_name="UNet3DConditionModel", **UNET3D))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler_config(zero_snr))
    shared = {part: os.path.relpath(os.path.join(HERE, part), out) for part in SHARED}
    write_json(os.path.join(out, "npo_model.json"), dict(shared_parts=shared, defaults=dict(frames=shapes.FRAMES)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "video"), help="where to write (default: weights/video/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue from this video model folder (an earlier stage's --out) in place of "
                                  "inflating the image UNet")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=4, help="clips per step (of 8 frames each)")
    p.add_argument("--clips", type=int, default=1024, help="clips drawn and encoded once, then sampled from")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--stf", action="store_true", help="Stable Target Field targets: x_0 averaged over the clips "
                                                    "of each caption, weighted by how likely each made x_t")
    p.add_argument("--top-mean", action="store_true", help="at t = T − 1, the x_0 target is the mean of the "
                                                         "caption's clips (of every clip where it was dropped)")
    p.add_argument("--v-weighting", action="store_true", help="weight the ε-MSE by 1/ᾱ_t (v-prediction's loss)")
    p.add_argument("--zero-snr", action="store_true",
                   help="train v-prediction on the zero-terminal-SNR schedule, and write that scheduler config")
    p.add_argument("--top-share", type=float, default=0.0, help="the share of each batch at t = T − 1")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a CPU shared with other jobs, two threads spin and lose)")
    args = p.parse_args()
    if args.zero_snr and args.v_weighting:
        p.error("--v-weighting is v-prediction's loss already under --zero-snr (and 1/ᾱ is infinite at its top)")
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:6.0f} s, {time.process_time():6.0f} CPU s] {message}", flush=True)

    vae = unet.load_vae(os.path.join(HERE, "vae"))
    text_encoder = clip.load_text_encoder(os.path.join(HERE, "text_encoder"))
    embeddings = caption_embeddings(text_encoder, clip.load_tokenizer(os.path.join(HERE, "tokenizer")))
    # stage 1 inflates the image UNet; a later stage (--init) continues from a video UNet an earlier one wrote
    model = video.load_unet3d(os.path.join(args.init, "unet")).requires_grad_(True) if args.init else \
        inflate(unet.load_unet(os.path.join(HERE, "unet")))
    model = train(model, vae, embeddings, args, log)
    save_video_model(model, args.out, args.zero_snr)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
