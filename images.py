"""Images: tensors -> pixels -> PIL, labelled grids, and PNGs that carry their settings, written atomically."""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import checkpoint


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy pixels, rounded as diffusers' numpy_to_pil rounds."""
    unit = (images.detach().float() / 2 + 0.5).clamp(0, 1)
    return (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def from_pil(image):
    """A PIL image -> (3, H, W) float32 in [-1, 1], the inverse of `to_pil` for one image."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    return pixels.permute(2, 0, 1) / 127.5 - 1


def labelled_grid(images, rows, cols, row_labels=(), col_labels=(), title=None):
    """Paste `rows x cols` equal-sized PIL images into one picture with text labels on the top and left.

    The cells fill the bottom-right of the picture: cell (i, j) is at (W − (cols − j)·w, H − (rows − i)·h)."""
    w, h = images[0].size
    font = ImageFont.load_default(size=max(10, min(w, h) // 16))
    left = max([int(font.getlength(t)) + 8 for t in row_labels], default=0)
    line = font.size + 8
    top = line * ((1 if col_labels else 0) + (1 if title else 0))
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.text((left + j * w + 4, top - line + 4), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        draw.text((4, top + i * h + h // 2 - font.size // 2), text, fill="black", font=font)
    for k, im in enumerate(images):
        grid.paste(im, (left + (k % cols) * w, top + (k // cols) * h))
    return grid


def save_png(image, path, parameters=None):
    """Write a PIL image as a PNG atomically (temporary name, then rename), with A1111's `parameters` text chunk."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    checkpoint.atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))
