"""Rebuild the embedded model in weights/ from nothing: a small Stable Diffusion trained on colored shapes.

    python weights/make_model.py                 # writes weights/{unet,vae,text_encoder,scheduler}/ (seeded)
    python weights/make_model.py --out /tmp/m --unet-steps 200     # a quick, worse one somewhere else

The model is Stable Diffusion's architecture at toy size: the same UNet, KL autoencoder and CLIP text encoder
classes as SD1.5 (our `unet.py` / `clip.py`, saved in diffusers' folder layout, so diffusers loads it too), the real
CLIP tokenizer, and SD1.5's noise schedule. It is trained on the pictures of `shapes.py` (`a {color} {shape}`,
64x64) in two stages, as Stable Diffusion was:

1. the autoencoder: 64x64x3 pixels <-> 8x8x4 latents (SD's factor 8), an L1 + L2 reconstruction loss plus a small KL term; then the
   latent scaling factor is set to 1 / std of the latents (SD1.5's 0.18215 came about the same way);
2. the UNet and the text encoder together (the text encoder is trained from scratch too, since CLIP's weights
   are not ours to ship), by the ε-prediction loss on VAE latents, with 10% of captions dropped to "" so that
   classifier-free guidance has an unconditional branch to work with; the UNet weights written are an EMA.

Every random number comes from --seed, so the same command on the same torch build writes the same files.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

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

# norm_num_groups 4: at least 4 channels per group everywhere (SD's VAE has 4 at its widest level). With one channel
# per group, the decoder's last GroupNorm would erase each channel's absolute level, i.e. the colors of flat regions.
VAE = unet.VAEConfig(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=4, sample_size=64,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
UNET = unet.UNetConfig(sample_size=8, block_out_channels=[64, 128], layers_per_block=1, attention_head_dim=4,
                       cross_attention_dim=32, norm_num_groups=16,
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
TEXT = clip.CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# SD1.5's scheduler_config.json
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="epsilon", trained_betas=None)


def picture_batch(rng, n):
    """n random pictures as a (n, 3, 64, 64) tensor in [-1, 1], and their captions."""
    images, captions = zip(*(shapes.draw_example(rng) for _ in range(n)))
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, list(captions)


def train_vae(steps, seed, log):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = unet.AutoencoderKL(VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pixels, _ = picture_batch(rng, 16)
        q = vae.encode(pixels)
        recon = vae.decode(q.sample(g))
        kl = 0.5 * (q.mean ** 2 + q.std ** 2 - 1 - q.logvar).mean()
        loss = (recon - pixels).abs().mean() + ((recon - pixels) ** 2).mean() + 1e-4 * kl
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps}: L1 {(recon - pixels).abs().mean().item():.4f}, KL {kl.item():.3f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, n, seed):
    """n pictures' posterior moments (mean, std) and captions, encoded once for the whole UNet training."""
    rng = np.random.default_rng(seed + 1)
    means, stds, captions = [], [], []
    for start in range(0, n, 64):
        pixels, caps = picture_batch(rng, min(64, n - start))
        q = vae.encode(pixels)
        means.append(q.mean)
        stds.append(q.std)
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


def train_unet(vae, steps, seed, batch, log):
    torch.manual_seed(seed)
    mean, std, captions = encode_dataset(vae, 8192, seed)
    vae.scaling_factor = vae.config.scaling_factor = round(1.0 / mean.std().item(), 5)
    log(f"latent scaling factor {vae.scaling_factor}")
    model, text = unet.UNet2DCondition(UNET), clip.CLIPTextModel(TEXT)
    tokenizer = clip.load_tokenizer(os.path.join(HERE, "tokenizer"))
    ids = tokenizer(captions)
    empty = tokenizer([""])[0]
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ac = sampler.alphas_cumprod(sampler.DDIMConfig.from_dict(SCHEDULER))
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        rows = torch.randint(0, len(captions), (batch,), generator=g)
        z = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)) * vae.scaling_factor
        tokens = ids[rows].clone()
        tokens[torch.rand(batch, generator=g) < 0.1] = empty  # caption dropout: train the unconditional branch
        t = torch.randint(0, len(ac), (batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        pred = model(sampler.add_noise(z, eps, t, ac), t, text(tokens))
        loss = ((pred - eps) ** 2).mean()
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:  # warmup, then cosine decay to 10%
            group["lr"] = 1e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log(f"unet {step}/{steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.load_state_dict(ema)
    return model.eval(), text.eval()


def write_json(path, value):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def save_part(module, folder, filename, config):
    """One part's weights and config.json, each written atomically (a killed run leaves no half-written file)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    checkpoint.atomic_write(os.path.join(folder, filename), lambda f: f.write(save(state)))
    write_json(os.path.join(folder, "config.json"), config)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=HERE, help="where to write the model folder (default: weights/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    vae = train_vae(args.vae_steps, args.seed, log)
    model, text = train_unet(vae, args.unet_steps, args.seed, args.batch_size, log)
    save_part(vae, os.path.join(args.out, "vae"), "diffusion_pytorch_model.safetensors",
              dict(_class_name="AutoencoderKL", **asdict(VAE)))
    save_part(model, os.path.join(args.out, "unet"), "diffusion_pytorch_model.safetensors",
              dict(_class_name="UNet2DConditionModel", **asdict(UNET)))
    save_part(text, os.path.join(args.out, "text_encoder"), "model.safetensors",
              dict(architectures=["CLIPTextModel"], model_type="clip_text_model", **asdict(TEXT),
                   bos_token_id=49406, pad_token_id=49407))
    os.makedirs(os.path.join(args.out, "scheduler"), exist_ok=True)
    write_json(os.path.join(args.out, "scheduler", "scheduler_config.json"), SCHEDULER)
    if os.path.abspath(args.out) != HERE and not os.path.exists(os.path.join(args.out, "tokenizer")):
        import shutil
        shutil.copytree(os.path.join(HERE, "tokenizer"), os.path.join(args.out, "tokenizer"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
