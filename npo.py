"""npo: Diffusion-NPO (negative preference optimization) on a hand-written Stable Diffusion.

    python npo.py info --model PATH        # what a model folder holds, loaded strictly

The library half of this file loads a diffusers model folder into our own modules (`load_pipeline`);
the CLI half is one argparse with subcommands that call functions the tests call directly.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

import checkpoint
import clip
import unet
from checkpoint import UserError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion model, as plain modules."""
    unet: unet.UNet2DCondition
    vae: unet.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: clip.CLIPTokenizer
    scheduler_config: dict = field(default_factory=dict)
    path: str = ""

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Text -> the text encoder's last hidden state (B, 77, D), the UNet's cross-attention context."""
        ids = self.tokenizer(prompts).to(self.text_encoder_device)
        return self.text_encoder(ids)

    @property
    def text_encoder_device(self):
        return next(self.text_encoder.parameters()).device


def load_pipeline(path, dtype=torch.float32, device="cpu", variant=None):
    """Load a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

    Every part loads strictly into our modules; `variant="fp16"` reads `*.fp16.safetensors`."""
    if not os.path.exists(path):
        raise UserError(f"model path {path} does not exist; pass --model a diffusers model folder.")
    if not os.path.isdir(path):
        raise UserError(f"model path {path} is a file; pass --model a diffusers model folder "
                        "(with unet/, vae/, text_encoder/, tokenizer/).")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, part)):
            raise UserError(f"{path} has no {part}/ folder; pass --model a diffusers model folder "
                            "(with unet/, vae/, text_encoder/, tokenizer/).")
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    return Pipeline(
        unet=unet.load_unet(os.path.join(path, "unet"), dtype, device, variant),
        vae=unet.load_vae(os.path.join(path, "vae"), dtype, device, variant),
        text_encoder=clip.load_text_encoder(os.path.join(path, "text_encoder"), dtype, device, variant),
        tokenizer=clip.load_tokenizer(os.path.join(path, "tokenizer")),
        scheduler_config=checkpoint.read_json(scheduler_path) if os.path.exists(scheduler_path) else {},
        path=path,
    )


# ----------------------------------------------------------------------------------------------------------
# The command line.

def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def cmd_info(args):
    pipe = load_pipeline(args.model)
    for name in ("unet", "vae", "text_encoder"):
        print(f"{name:13s} {count_parameters(getattr(pipe, name)) / 1e6:8.1f}M parameters")
    print(f"scheduler     {pipe.scheduler_config or 'SD defaults'}")


def build_parser():
    parser = argparse.ArgumentParser(prog="npo.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="load a model folder strictly and print its parts")
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers model folder (default: the embedded model in weights/)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
