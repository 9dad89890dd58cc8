"""Images: tensors -> pixels -> PIL, labelled grids, and PNGs that carry their settings, written atomically."""
import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import checkpoint


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


# Labels. Pillow's own font (Aileron) has no Greek letters and draws α and β as its missing-glyph box, so labels use
# a system font that has them (looked up by file name, as Pillow's `truetype` does), and spell them out where none does.
GREEK_FONTS = ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf")
SPELLED = {"α": "alpha", "β": "beta", "δ": "delta", "η": "eta", "θ": "theta", "γ": "gamma", "ω": "omega"}
MISSING = "\U0010fffd"  # a private-use code point that no font maps: what the font draws for a glyph it lacks


def has_glyphs(font, text):
    """Whether `font` draws every character of `text` as itself, not as its missing-glyph box."""
    def mask(ch):
        try:
            m = font.getmask(ch)
        except UnicodeEncodeError:  # a latin-1 bitmap font
            return None
        return m.size, bytes(m)
    box = mask(MISSING)
    return all(mask(ch) not in (None, box) for ch in text)


@functools.lru_cache(maxsize=None)
def label_font(size):
    """A font of `size` pixels for labels: Pillow's default if it draws α and β, else the first of GREEK_FONTS
    found on this system that does, else Pillow's default (and `readable` spells the letters out)."""
    default = ImageFont.load_default(size=size)
    if has_glyphs(default, "αβ"):
        return default
    for name in GREEK_FONTS:
        try:
            font = ImageFont.truetype(name, size)
        except OSError:
            continue
        if has_glyphs(font, "αβ"):
            return font
    return default


def readable(font, text):
    """`text` with each Greek letter that `font` lacks spelled out: α=0.5 -> alpha=0.5."""
    return "".join(SPELLED[ch] if ch in SPELLED and not has_glyphs(font, ch) else ch for ch in text)


def text_width(font, text):
    """The pixels `text` covers from its origin: its ink's right edge, or its advance if that is larger."""
    return max(font.getlength(text), font.getbbox(text)[2]) if text else 0


def wrap(font, text, width):
    """`text` as lines no wider than `width` pixels, broken at spaces (and newlines), and inside a word only where
    the word alone is wider. Nothing is dropped but the spaces where a line breaks."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_width(font, candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
            while len(line) > 1 and text_width(font, line) > width:  # a word wider than the space: break it
                k = 1
                while k < len(line) - 1 and text_width(font, line[:k + 1]) <= width:
                    k += 1
                lines.append(line[:k])
                line = line[k:]
        lines.append(line)
    return lines


def labelled_grid(images, rows, cols, row_labels=(), col_labels=(), title=None):
    """Paste `rows x cols` equal-sized PIL images into one picture with text labels on the top and left.

    The cells fill the bottom-right of the picture: cell (i, j) is at (W − (cols − j)·w, H − (rows − i)·h). No label
    is cut: a column label wraps to its column's width, the title to the picture's, and the bands above and to the
    left grow to the text."""
    w, h = images[0].size
    font, pad = label_font(max(10, min(w, h) // 16)), 4
    line = sum(font.getmetrics()) + 2  # ascender to descender, and a little leading
    row_labels, col_labels = [readable(font, t) for t in row_labels], [readable(font, t) for t in col_labels]
    left = max([int(text_width(font, t)) + 2 * pad for t in row_labels], default=0)
    col_lines = [wrap(font, t, w - 2 * pad) for t in col_labels]
    col_band = line * max(map(len, col_lines)) + 2 * pad if col_labels else 0
    title_lines = wrap(font, readable(font, title), left + cols * w - 2 * pad) if title else []
    title_band = line * len(title_lines) + pad if title else 0
    top = title_band + col_band
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    for j, lines in enumerate(col_lines):
        for k, text in enumerate(lines):
            draw.text((left + j * w + pad, title_band + pad + k * line), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        y = min(top + i * h + (h - line) // 2, grid.height - line)  # centred on its row, inside the picture
        draw.text((pad, max(0, y)), text, fill="black", font=font)
    for k, im in enumerate(images):
        grid.paste(im, (left + (k % cols) * w, top + (k // cols) * h))
    return grid


def save_png(image, path, parameters=None):
    """Write a PIL image as a PNG atomically (temporary name, then rename), with A1111's `parameters` text chunk."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    checkpoint.atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))
