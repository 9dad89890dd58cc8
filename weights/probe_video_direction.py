"""How much a video model's ε-prediction depends on each word of `a {color} {shape} moving {direction}`.

    python weights/probe_video_direction.py [weights/video ...]

Draws 16 clips of the shapes world (`shapes.draw_video_example`, seeded), noises their latents at a few timesteps,
and compares the UNet's output for the clip's own caption with its output for the same caption with another
direction (the opposite one), another color, and "" (the unconditional branch), on the same x_t: the norm of each
difference, and the ε-MSE under the own and the reversed caption. A model that follows the prompted direction
changes its prediction when the direction word changes, as it does when the color changes.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import make_video_model as recipe  # noqa: E402
from npo import checkpoint  # noqa: E402
from npo import clip  # noqa: E402
from npo import sampler  # noqa: E402
from npo import unet  # noqa: E402
from npo import video  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swap(caption, position, choose):
    """The caption with word `position` replaced by choose(word)."""
    words = caption.split()
    words[position] = choose(words[position])
    return " ".join(words)


def captions(own):
    """{name: captions} of the comparisons: own, reversed direction, another color, empty."""
    return {"own": own, "reversed": [swap(c, -1, OPPOSITE.get) for c in own],
            "other color": [swap(c, 1, lambda w: "blue" if w != "blue" else "red") for c in own], "empty": [""] * len(own)}


@torch.no_grad()
def probe(path, vae, embeddings, ac, timesteps=(300, 800, 950), n=16):
    model = video.load_unet3d(os.path.join(path, "unet")).float().eval()
    mean, _, own = recipe.encode_dataset(vae, n, 12345)
    z = mean * vae.scaling_factor
    g = torch.Generator().manual_seed(0)
    for step in timesteps:
        t = torch.full((n,), step)
        eps = torch.randn(z.shape, generator=g)
        x = sampler.add_noise(z, eps, t, ac)
        out = {name: model(x, t, torch.stack([embeddings[c] for c in texts]))
               for name, texts in captions(own).items()}
        gaps = ", ".join(f"|own − {name}| {(out['own'] - out[name]).norm():.3f}" for name in out if name != "own")
        mse = ", ".join(f"{name} {((out[name] - eps) ** 2).mean():.6f}" for name in ("own", "reversed"))
        print(f"{path} t={step}: {gaps}; ε-MSE {mse}", flush=True)


def main():
    torch.set_num_threads(1)
    vae = unet.load_vae(os.path.join(HERE, "vae"))
    embeddings = recipe.caption_embeddings(clip.load_text_encoder(os.path.join(HERE, "text_encoder")),
                                           clip.load_tokenizer(os.path.join(HERE, "tokenizer")))
    ac = sampler.alphas_cumprod(sampler.DDIMConfig.from_dict(checkpoint.read_json(
        os.path.join(HERE, "scheduler", "scheduler_config.json"))))
    for path in sys.argv[1:] or [os.path.join(HERE, "video")]:
        probe(path, vae, embeddings, ac)


if __name__ == "__main__":
    main()
