"""Videos on disk: each video a folder of frames, OUT/NNNNN-seedS/000.png, 001.png, ..., beside an animated preview
OUT/NNNNN-seedS.webp, both written atomically and both carrying A1111's `parameters` text (the PNG text chunk, as
`images.save_png` writes it; in the WebP, EXIF's UserComment, where A1111 puts it in a WebP or JPEG); and read back.
"""
import os
import re
import secrets
import shutil

from PIL import ExifTags, Image, UnidentifiedImageError

from . import checkpoint
from . import images
from .checkpoint import UserError

DEFAULT_FPS = 8  # the preview's speed when neither the user nor the model says
FRAME = re.compile(r"(\d{3,})\.png")  # 000.png, 001.png, ... (a fourth digit from the 1000th frame on)
UNICODE = b"UNICODE\0"  # EXIF's character-code prefix of a UserComment in UCS-2, in the file's byte order


def to_frames(videos):
    """(B, F, 3, H, W) in [-1, 1] -> B lists of F PIL images."""
    return [images.to_pil(video) for video in videos]


def exif_parameters(text):
    """EXIF bytes holding `text` as the UserComment of the Exif IFD, encoded as A1111 writes it (piexif's
    "unicode": the UNICODE prefix, then UTF-16 in the file's byte order, big-endian, "MM")."""
    exif = Image.Exif()
    exif.endian = ">"  # big-endian, as piexif writes it
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = UNICODE + text.encode("utf-16-be")
    return exif.tobytes()


def save_webp(frames, path, parameters=None, fps=DEFAULT_FPS):
    """An animated WebP of PIL `frames` at `fps` frames a second, looping, with `parameters` in its EXIF; written
    atomically (temporary name, then rename). Lossy at quality 90: a preview, the PNGs are the frames."""
    exif = exif_parameters(parameters) if parameters else b""
    duration = max(1, round(1000 / fps))  # milliseconds per frame
    checkpoint.atomic_write(path, lambda f: frames[0].save(
        f, format="WEBP", save_all=True, append_images=frames[1:], duration=duration, loop=0, quality=90, exif=exif))


def read_parameters(path):
    """The `parameters` text of a frame PNG (its text chunk) or a preview WebP (its EXIF UserComment); None if the
    file has none."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("parameters")
        if text is not None:
            return text
        exif = image.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(UNICODE):
        return comment[len(UNICODE):].decode("utf-16-le" if exif.endian == "<" else "utf-16-be")
    return None


def save_video(frames, folder, name, parameters=None, fps=DEFAULT_FPS):
    """Write one video as folder/name/FFF.png (every frame with `parameters`) and folder/name.webp; returns the
    frames' folder. Nothing half-written is ever seen under these names: the frames go into a hidden temporary
    folder that is renamed when complete, the WebP to a temporary name that is renamed after it."""
    target, preview = os.path.join(folder, name), os.path.join(folder, name + ".webp")
    if os.path.exists(target):
        raise UserError(f"{target} exists already; sample into another --out, or move it.")
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        os.makedirs(tmp)
        for k, frame in enumerate(frames):
            images.save_png(frame, os.path.join(tmp, f"{k:03d}.png"), parameters)
        save_webp(frames, preview, parameters, fps)  # the preview first: a folder of frames is never without it
        try:
            os.rename(tmp, target)
        except OSError:
            os.remove(preview)  # nor a preview without its frames
            raise
    except OSError as e:
        raise UserError(f"cannot write the video {target} ({e.strerror or e}); check that --out is writable.")
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def frame_paths(folder):
    """The frames of a video folder in order (000.png, 001.png, ...); [] when `folder` holds none."""
    names = [n for n in os.listdir(folder) if FRAME.fullmatch(n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(FRAME.fullmatch(n).group(1)))]


def is_video_folder(path):
    """Whether `path` is a folder of frames as `save_video` writes them."""
    return os.path.isdir(path) and bool(frame_paths(path))


def check_frames(folder):
    """A video folder's frames must be numbered 000 ... F−1 with none missing (a frame deleted by hand would make
    its frame-averaged score that of another video), and be readable images; returns their paths."""
    paths = frame_paths(folder)
    numbers = [int(FRAME.fullmatch(os.path.basename(p)).group(1)) for p in paths]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise UserError(f"{folder} lacks frame {missing[0]:03d}.png of its {max(numbers) + 1}; sample the video "
                        "again, or remove the folder.")
    for path in paths:  # the headers only: Image.open reads no pixels
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{path} is not a readable PNG ({e}); remove its video or sample it again.")
    return paths
