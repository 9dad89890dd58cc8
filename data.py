"""Training data: preference pairs for DPO / NPO (reading them, augmenting them, batching them resumably), and
prompts files (`read_prompts`) for sampling and reward training.

A pair is a prompt with a preferred (winner, `x_w`) and a rejected (loser, `x_l`) image. `open_pairs(path)`
reads three layouts:

- `pairs.jsonl`: one object per line, `{"prompt": ..., "chosen": "a.png", "rejected": "b.png"}`; image paths
  are relative to the folder of the JSONL file (absolute paths work too). Blank lines are ignored.
- a folder with `w/` and `l/` subfolders holding images of the same file names (`w/0001.png` beat `l/0001.png`).
  The caption of pair `0001` is `captions/0001.txt` (next to `w/` and `l/`) or else `w/0001.txt`. Pairs are
  taken in sorted file-name order, so the dataset is the same on every machine.
- a Pick-a-Pic `.parquet` file with columns `caption`, `jpg_0`, `jpg_1` (encoded image bytes) and `label_0`:
  `label_0 == 1` means `jpg_0` won, `0` that `jpg_1` won, `0.5` is a tie and is dropped. Needs the optional
  `pyarrow` (`pip install npo[parquet]`). The file's image bytes are held in memory (Pick-a-Pic ships ~0.5 GB
  shards); decoding is lazy.

Every row's images are checked when the dataset is opened (file present, image header readable; pixels are
decoded only when a pair is used). A bad row is an error naming the row (JSONL lines count from 1, parquet rows
from 0), or, with `skip_bad_rows=True`, is skipped and counted in `dataset.skipped`.

Training reads the pairs through `batches(...)`: an endless, deterministic stream of batches. Batch `step`
depends only on `(seed, step)` and the global batch size, never on global RNG or on what was read before, so a
resumed run passes the number of batches it has consumed as `start_step` and continues exactly. Preprocessing
follows the Diffusion-DPO recipes (diffusers' `train_diffusion_dpo.py`, Salesforce's DiffusionDPO): bilinear resize
of the short side to the resolution, center (or random) crop, random horizontal flip, values in [-1, 1]. Unlike
those scripts, which draw the crop and flip separately for each image, both images of a pair get the same crop
and flip here, so the two differ only in what the preference is about.

The appendix's table 7 degrades NPO's data after the stream: `shuffle_prompts` (--perturb-prompts) and
`gaussian_blur` (--corrupt blur:SIGMA, parsed by `parse_corruption`).
"""
import io
import itertools
import json
import math
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from . import shards
from .checkpoint import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
SKIP_HINT = "skip_bad_rows=True, or --skip-bad-rows on the command line"


class Pair(NamedTuple):
    prompt: str
    preferred: Image.Image
    rejected: Image.Image


class PairDataset:
    """A list of preference pairs; `dataset[i]` decodes pair i into a `Pair` of RGB PIL images.

    Images are kept as sources (a file path, or encoded bytes for parquet) until used. `skipped` counts the
    bad rows left out (with `skip_bad_rows=True`), `ties` the Pick-a-Pic ties dropped."""

    def __init__(self, path, kind, rows, row_name, skipped=0, ties=0):
        self.path, self.kind = path, kind
        self.rows = rows  # (row id, prompt, preferred source, rejected source); row_name.format(row id) names it
        self.row_name, self.skipped, self.ties = row_name, skipped, ties

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        _, prompt, *sources = self.rows[i]
        images = []
        for which, source in zip(("preferred", "rejected"), sources):
            try:
                with _open_image(source) as image:
                    images.append(image.convert("RGB"))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
                raise UserError(f"{self.where(i)}: the {which} image could not be decoded ({e}); replace or remove it.")
        return Pair(prompt, *images)

    def where(self, i):
        return f"{self.row_name.format(self.rows[i][0])} of {self.path}"

    def __repr__(self):
        return (f"PairDataset({self.kind} {self.path!r}: {len(self)} pairs, "
                f"{self.skipped} bad rows skipped, {self.ties} ties dropped)")


def read_prompts(path, negatives=False):
    """The prompts of a prompts file: a .txt with one prompt per line, a .jsonl with a "prompt" per row, or a
    Pick-a-Pic .parquet file, whose `caption` column gives its unique captions in order of first appearance (the
    paper's prompts are the 500 of Pick-a-Pic's test split; one caption there has several image pairs).

    With `negatives=True`, a list of (prompt, negative prompt or None) instead: a JSONL row may carry its own
    "negative_prompt" (a .txt line or a caption never does). Blank lines are skipped; an empty file, an unreadable
    one, a JSONL row without a "prompt" or with a "negative_prompt" that is not a string is a UserError."""
    if str(path).lower().endswith(".parquet"):
        captions = _read_captions(path)
        return [(c, None) for c in captions] if negatives else captions
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({e}); pass a readable UTF-8 .txt or .jsonl file.")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line]
    if str(path).lower().endswith(".jsonl"):
        rows = []
        for n, line in numbered:
            try:
                row = json.loads(line)
                rows.append((str(row["prompt"]), row.get("negative_prompt")))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path} line {n} is not a JSON object with a \"prompt\"; fix or remove that line.")
            if not isinstance(rows[-1][1], (str, type(None))):
                raise UserError(f"{path} line {n}: \"negative_prompt\" is not a string; write it as text or leave it out.")
    else:
        rows = [(line, None) for _, line in numbered]
    if not rows:
        raise UserError(f"the prompts file {path} holds no prompts; write one prompt per line.")
    return rows if negatives else [prompt for prompt, _ in rows]


def _read_captions(path):
    captions = _parquet_columns(path, ["caption"], "pass a Pick-a-Pic parquet file, or a .txt with a prompt per line.")
    for r, caption in enumerate(captions["caption"]):
        if not isinstance(caption, str):
            raise UserError(f"row {r} of {path} has the caption {caption!r}, not text; fix or drop that row.")
    prompts = list(dict.fromkeys(c.strip() for c in captions["caption"] if c.strip()))
    if not prompts:
        raise UserError(f"{path} holds no captions; pass a Pick-a-Pic parquet file with a caption column.")
    return prompts


def open_pairs(path, skip_bad_rows=False, ties="drop", shuffle_buffer=2):
    """Open a `.jsonl` file, a folder with `w/` and `l/`, or a Pick-a-Pic `.parquet` file as a `PairDataset`; or a
    folder / glob of Pick-a-Pic parquet shards as a streamed `shards.Shards` (`shuffle_buffer` row groups)."""
    path = os.fspath(path)
    if shards.is_sharded(path) and not os.path.isdir(os.path.join(path, "w")):
        return shards.open_shards(path, ties, skip_bad_rows, shuffle_buffer)
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass a .jsonl file, a Pick-a-Pic .parquet file "
                        "or a folder with w/ and l/ subfolders.")
    if os.path.isdir(path):
        dataset = _read_folder(path, skip_bad_rows)
    elif path.lower().endswith(".jsonl"):
        dataset = _read_jsonl(path, skip_bad_rows)
    elif path.lower().endswith(".parquet"):
        dataset = _read_parquet(path, skip_bad_rows, ties)
    else:
        raise UserError(f"{path} is neither a .jsonl nor a .parquet file; pass one of those "
                        "or a folder with w/ and l/ subfolders.")
    if len(dataset) == 0:
        raise UserError(f"{path} has no usable pairs ({dataset.skipped} bad rows skipped, {dataset.ties} ties dropped); "
                        "give it at least one pair with a clear winner.")
    return dataset


def _open_image(source):
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _image_problem(source, name):
    """None if `source` (a path or bytes) has a readable image header, else what is wrong with it."""
    if isinstance(source, str) and not os.path.isfile(source):
        return f"image {name} does not exist"
    if source is None:
        return f"image {name} is empty"
    try:
        with _open_image(source):  # reads the header only: cheap, and catches what is not an image at all
            return None
    except Exception:
        return f"{name} is not an image"


def _bad_row(where, problem, skip_bad_rows):
    if not skip_bad_rows:
        raise UserError(f"{where}: {problem}; fix it or skip bad rows ({SKIP_HINT}).")


def _read_jsonl(path, skip_bad_rows):
    root = os.path.dirname(os.path.abspath(path))
    rows, skipped = [], 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable UTF-8 text file ({e}); write it as JSON lines in UTF-8.")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n} of {path}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}); "
                            'write one {"prompt": ..., "chosen": ..., "rejected": ...} object per line.')
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise UserError(f"{where} has no string '{key}'; every line needs \"prompt\", \"chosen\" and "
                                "\"rejected\" (image paths relative to the JSONL file).")
        w, l = os.path.join(root, row["chosen"]), os.path.join(root, row["rejected"])
        problem = _image_problem(w, row["chosen"]) or _image_problem(l, row["rejected"])
        if problem:
            _bad_row(where, problem, skip_bad_rows)
            skipped += 1
            continue
        rows.append((n, row["prompt"], w, l))
    return PairDataset(path, "jsonl", rows, "line {}", skipped)


def _read_folder(path, skip_bad_rows):
    w_dir, l_dir = os.path.join(path, "w"), os.path.join(path, "l")
    if not (os.path.isdir(w_dir) and os.path.isdir(l_dir)):
        raise UserError(f"folder {path} has no w/ and l/ subfolders; put the preferred images in w/ and the "
                        "rejected ones, under the same file names, in l/.")
    names = [{n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTENSIONS)} for d in (w_dir, l_dir)]
    unmatched = sorted(names[0] ^ names[1])
    if unmatched and not skip_bad_rows:
        few = ", ".join(unmatched[:3]) + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else "")
        raise UserError(f"{len(unmatched)} image names in {path} are in only one of w/ and l/ ({few}); "
                        f"give every image in w/ a partner of the same name in l/, or skip them ({SKIP_HINT}).")
    rows, skipped = [], len(unmatched)
    for name in sorted(names[0] & names[1]):
        stem = os.path.splitext(name)[0]
        where = f"pair {name!r} of {path}"
        captions = [c for c in (os.path.join(path, "captions", stem + ".txt"), os.path.join(w_dir, stem + ".txt"))
                    if os.path.isfile(c)]
        w, l = os.path.join(w_dir, name), os.path.join(l_dir, name)
        if captions:
            problem = _image_problem(w, "w/" + name) or _image_problem(l, "l/" + name)
        else:
            problem = f"no caption (write captions/{stem}.txt)"
        if problem:
            _bad_row(where, problem, skip_bad_rows)
            skipped += 1
            continue
        try:
            with open(captions[0], encoding="utf-8-sig") as f:
                prompt = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{captions[0]} is not a readable UTF-8 text file ({e}); write the caption in UTF-8.")
        rows.append((name, prompt, w, l))
    return PairDataset(path, "folder", rows, "pair {!r}", skipped)


def _parquet_columns(path, columns, hint):
    """The named columns of a parquet file, as Python lists (with the optional pyarrow)."""
    try:
        import pyarrow.parquet as pq  # optional: only this input format needs it
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow, which is not installed; "
                        "run `pip install pyarrow` (or `pip install npo[parquet]`).")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; {hint}")
        table = pq.read_table(path, columns=list(columns))
    except UserError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise UserError(f"{path} is not a readable parquet file ({e}); download or export it again.")
    return {c: table.column(c).to_pylist() for c in columns}  # from here the images live once, as Python bytes


def _read_parquet(path, skip_bad_rows, ties_mode="drop"):
    """One parquet file, read whole (a small one; a folder of shards streams instead: shards.py)."""
    columns = _parquet_columns(path, PICKAPIC_COLUMNS,
                               f"a Pick-a-Pic parquet file has the columns {', '.join(PICKAPIC_COLUMNS)}.")
    rows, skipped, ties = [], 0, 0
    for r, (caption, jpg_0, jpg_1, label_0) in enumerate(zip(*(columns[c] for c in PICKAPIC_COLUMNS))):
        if label_0 == 0.5 and ties_mode == "drop":
            ties += 1
            continue
        where = f"row {r} of {path}"
        if label_0 not in (0, 0.5, 1):
            problem = f"label_0 is {label_0!r}, not 0, 0.5 or 1"
        elif not isinstance(caption, str):
            problem = f"caption is {caption!r}, not text"
        else:
            problem = _image_problem(jpg_0, "jpg_0") or _image_problem(jpg_1, "jpg_1")
        if problem:
            _bad_row(where, problem, skip_bad_rows)
            skipped += 1
            continue
        w, l = (jpg_1, jpg_0) if label_0 == 0 else (jpg_0, jpg_1)  # a kept tie: jpg_0 wins
        rows.append((r, caption, w, l))
    return PairDataset(path, "parquet", rows, "row {}", skipped, ties)


# ---- preprocessing -------------------------------------------------------------------------------------------

def preprocess_pair(preferred, rejected, resolution, generator, random_crop=False, hflip=True, sizes=False):
    """Both images of a pair → float tensors (3, R, R) in [-1, 1], with the *same* crop and flip.

    Each image is resized (bilinear, antialiased) so its short side is R, then cropped to R x R at the center or,
    with `random_crop`, at one random relative position shared by both images, then mirrored left-right with
    probability 1/2 if `hflip`. Three numbers are drawn from `generator` whatever the options. With `sizes`, a
    third item: the preferred image's (original H, W, crop top, crop left) as a LongTensor (4,), in the resized
    image's pixels (what SDXL's size conditioning needs)."""
    crop_x, crop_y, coin = torch.rand(3, generator=generator).tolist()
    flip = hflip and coin < 0.5
    where = (crop_x, crop_y) if random_crop else None
    pixels = tuple(_resize_crop_flip(image, resolution, where, flip) for image in (preferred, rejected))
    if not sizes:
        return pixels
    w, h = preferred.size
    _, _, left, top = _crop_box(w, h, resolution, where)
    return (*pixels, torch.tensor([h, w, top, left]))


def _crop_box(w, h, size, where):
    """(new_w, new_h, left, top): the image resized so its short side is `size`, and the crop's corner in it."""
    # short side to `size`, long side scaled and rounded down (as torchvision's Resize(int) does)
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if where is None:  # center crop, rounded as torchvision's CenterCrop
        return new_w, new_h, round((new_w - size) / 2), round((new_h - size) / 2)
    # u ∈ [0, 1) → each of the new_w − size + 1 offsets equally likely
    return new_w, new_h, math.floor(where[0] * (new_w - size + 1)), math.floor(where[1] * (new_h - size + 1))


def _resize_crop_flip(image, size, where, flip):
    w, h = image.size
    new_w, new_h, left, top = _crop_box(w, h, size, where)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # HWC → CHW
    return pixels.float() / 127.5 - 1


# ---- the appendix's table 7: NPO trained on corrupted data ---------------------------------------------------
# The paper (appendix II.3) tries two ways to make NPO's negative data: captions "randomly shuffled within batches"
# (mismatched image-text pairs), and "controlled degradations, such as Gaussian blur, to negative images". The
# trainer applies them to each micro-batch as the stream hands it over (method_dpo.py); these are the operations.

CORRUPTIONS = ("blur",)


def parse_corruption(spec):
    """`--corrupt KIND:STRENGTH` → (kind, strength); today `blur:SIGMA`, σ > 0 in pixels. A UserError otherwise."""
    kind, _, value = str(spec).partition(":")
    if kind not in CORRUPTIONS:
        raise UserError(f"--corrupt {spec}: unknown corruption {kind!r}; pass blur:SIGMA, a Gaussian blur of "
                        "SIGMA pixels, e.g. blur:1.5.")
    try:
        sigma = float(value)
    except ValueError:
        raise UserError(f"--corrupt {spec}: SIGMA must be a number of pixels, e.g. blur:1.5.")
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"--corrupt {spec}: SIGMA must be a positive finite number of pixels, e.g. blur:1.5.")
    return kind, sigma


def corrupt(images, spec):
    """The images (N, C, H, W) degraded as `--corrupt spec` says (parse_corruption)."""
    _, sigma = parse_corruption(spec)
    return gaussian_blur(images, sigma)


def gaussian_blur(images, sigma):
    """Gaussian blur of images (N, C, H, W), σ in pixels: each output pixel is Σ_k w_k x[i + k] along the rows, then
    the columns, with w_k ∝ exp(−k² / 2σ²) for |k| ≤ r = ⌈3σ⌉, normalised to sum 1 (so a flat image stays flat). The
    image is extended by reflection at the borders (… c b | a b c … x y | x w …, the edge pixel not repeated), and
    again for a kernel wider than the image, so every σ works at every size."""
    radius = math.ceil(3 * sigma)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-k**2 / (2 * sigma**2))
    w = (w / w.sum()).to(images.dtype)
    c = images.shape[1]
    for dim in (2, 3):  # H, then W; the kernel is symmetric, so correlation and convolution agree
        n = images.shape[dim]
        padded = images.index_select(dim, _reflect(torch.arange(-radius, n + radius), n))
        kernel = w.view(1, 1, -1, 1) if dim == 2 else w.view(1, 1, 1, -1)
        images = torch.nn.functional.conv2d(padded, kernel.expand(c, 1, *kernel.shape[2:]), groups=c)
    return images


def _reflect(i, n):
    """Indices i (any integers) folded into 0 … n−1 by reflection about the first and last pixel (period 2n − 2)."""
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * n - 2)
    return torch.where(i < n, i, 2 * n - 2 - i)


def shuffle_prompts(prompts, generator):
    """The captions of one batch in a uniformly random order drawn from `generator` (table 7's text perturbation):
    pair j trains with caption π(j). A plain shuffle, as the paper words it, so a pair keeps its own caption with
    probability 1/B."""
    order = torch.randperm(len(prompts), generator=generator)
    return [prompts[j] for j in order.tolist()]


# ---- the training stream -------------------------------------------------------------------------------------

def steps_per_epoch(num_pairs, global_batch):
    """Full batches per pass over the data; the `num_pairs % global_batch` pairs left over (different ones each
    epoch, as the order is reshuffled) are not used that epoch."""
    return num_pairs // global_batch


def epoch_generator(seed, epoch):
    """The torch.Generator that orders epoch `epoch`. numpy's SeedSequence keeps the (seed, epoch) streams apart
    (with `seed + epoch`, seed 1 epoch 0 would replay seed 0 epoch 1)."""
    state = np.random.SeedSequence(seed, spawn_key=(epoch,)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class _Stream(torch.utils.data.Dataset):
    """Example `i` of the endless training stream, `i = step · global_batch + slot`, a function of (seed, i) only.

    Epoch `e` visits the pairs in the order `randperm(n)` drawn from `epoch_generator(seed, e)`, which also draws
    one seed per position for that example's caption dropout, crop and flip."""

    def __init__(self, dataset, seed, global_batch, resolution, random_crop, hflip, caption_dropout, sizes=False):
        self.dataset, self.seed, self.global_batch = dataset, seed, global_batch
        self.resolution, self.random_crop, self.hflip, self.caption_dropout = resolution, random_crop, hflip, caption_dropout
        self.sizes = sizes
        self.steps_per_epoch = steps_per_epoch(len(dataset), global_batch)
        self._plan = (None, None, None)  # (epoch, order, example seeds) of the last epoch used

    def epoch_plan(self, epoch):
        if self._plan[0] != epoch:
            g = epoch_generator(self.seed, epoch)
            n = len(self.dataset)
            self._plan = (epoch, torch.randperm(n, generator=g), torch.randint(2**62, (n,), generator=g))
        return self._plan[1:]

    def __getitem__(self, i):
        step, slot = divmod(i, self.global_batch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order, seeds = self.epoch_plan(epoch)
        position = step_in_epoch * self.global_batch + slot
        g = torch.Generator().manual_seed(int(seeds[position]))
        try:
            prompt, preferred, rejected = self.dataset[int(order[position])]
        except UserError as e:  # an image damaged past its header: passed on as data (see _collate)
            return e
        if torch.rand((), generator=g).item() < self.caption_dropout:
            prompt = ""  # train the unconditional prediction too, as CFG needs
        return (prompt, *preprocess_pair(preferred, rejected, self.resolution, g, self.random_crop, self.hflip,
                                         self.sizes))


class _Positions:
    """The stream indices of one rank's batches from `start_step` on: rank r takes the r-th contiguous slice of
    `batch_size` examples of each global batch."""

    def __init__(self, start_step, batch_size, rank, world_size):
        self.start_step, self.batch_size, self.rank, self.world_size = start_step, batch_size, rank, world_size

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


def _collate(examples):
    """A batch from examples; or, if one is a UserError (found in a worker process, whose own exception would
    reach the main process wrapped in a traceback), that error, which _closing raises there."""
    error = next((e for e in examples if isinstance(e, UserError)), None)
    if error is not None:
        return error
    prompts, *tensors = zip(*examples)
    return (list(prompts), *(torch.stack(t) for t in tensors))


def batches(dataset, batch_size, seed, resolution, start_step=0, random_crop=False, hflip=True,
            caption_dropout=0.0, rank=0, world_size=1, num_workers=0, start_state=None, sizes=False):
    """Endless batches `(prompts: list[str], preferred: (B,3,R,R), rejected: (B,3,R,R))`, B = `batch_size` per rank,
    and with `sizes` a fourth item (B, 4): each pair's original size and crop corner (`preprocess_pair`).

    The k-th batch yielded is training step `start_step + k`; to resume, pass the number of batches already
    consumed (per rank; with gradient accumulation, micro-batches). Data-parallel ranks each take a contiguous
    slice of the global batch of `batch_size · world_size` examples: concatenating the batches of ranks 0..w−1 in
    order gives exactly the batch of a single process with batch size `batch_size · world_size`, including each
    example's crop, flip and caption dropout. A run may therefore resume on another number of ranks as long as
    the global batch stays the same. `caption_dropout` is the probability of replacing a prompt by "".
    `num_workers` > 0 decodes in background processes; the batches are identical either way. Call `close()` on the
    result when done: it stops those processes."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise UserError(f"caption dropout must be a probability in [0, 1], got {caption_dropout}; pass e.g. 0.1.")
    if isinstance(dataset, shards.Shards):  # streamed: the position is the stream's own (see ShardBatches)
        stream = _ShardStream(dataset, batch_size, seed, resolution, start_state or (0, 0), random_crop, hflip,
                              caption_dropout, rank, world_size, sizes)
        return ShardBatches(stream, num_workers, start_state or (0, 0))
    global_batch = batch_size * world_size
    if len(dataset) < global_batch:
        raise UserError(f"{dataset.path} has {len(dataset)} pairs, fewer than one batch of {global_batch}; "
                        "lower the batch size or add pairs.")
    stream = _Stream(dataset, seed, global_batch, resolution, random_crop, hflip, caption_dropout, sizes)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=_collate, num_workers=num_workers,
                                         sampler=_Positions(start_step, batch_size, rank, world_size))
    return _closing(iter(loader))


def _closing(iterator):
    """The batches, as a generator whose `close()` also stops the DataLoader's worker processes (torch's iterator
    has no public close; without this they live until the iterator is garbage-collected). A UserError that comes
    as an item (from _collate) is raised here, in the main process, as its one sentence."""
    try:
        for item in iterator:
            if isinstance(item, UserError):
                raise item
            yield item
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # present when num_workers > 0
        if shutdown is not None:
            shutdown()


# ---- the training stream of parquet shards -------------------------------------------------------------------

class _ShardStream(torch.utils.data.IterableDataset):
    """This rank's rows of shards.Shards.rows from `start` on, decoded, in chunks of `batch_size` consecutive rows.

    Worker k of n decodes chunks k, k + n, ... (each worker walks the whole row stream, which costs reading and
    header checks, not decoding), and the DataLoader hands the chunks out in that round-robin order, so the rows
    come in stream order whatever n. Chunks are cut by rows, not by usable pairs, so that no worker needs another's
    decoding to know where its chunks are. A chunk is a list of (state, counts, outcome) per row: `state` the stream
    position after the row, `counts` the stream's tallies of dropped ties and skipped rows so far, `outcome` an
    example (prompt, preferred, rejected[, sizes]), None for a row the stream dropped, "bad" for a row whose images
    do not decode (with skip_bad_rows), or a UserError for the main process to raise (raised in a worker, it would
    arrive wrapped in a traceback). Decoding here is a row's full check: the stream reads only the headers."""

    def __init__(self, dataset, batch_size, seed, resolution, start, random_crop, hflip, caption_dropout, rank,
                 world_size, sizes=False):
        self.dataset, self.batch_size, self.seed, self.resolution, self.start = dataset, batch_size, seed, resolution, start
        self.random_crop, self.hflip, self.caption_dropout = random_crop, hflip, caption_dropout
        self.rank, self.world_size, self.sizes = rank, world_size, sizes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = self.dataset.rows(self.seed, self.rank, self.world_size, self.start)
        for index in itertools.count():
            mine, chunk = index % workers == worker, []
            try:
                for state, pair in itertools.islice(rows, self.batch_size):
                    outcome = self._example(state, pair) if mine and pair else None
                    chunk.append((state, dict(self.dataset.counts), outcome))
            except UserError as e:  # a bad row without skip_bad_rows, or a row group that cannot be read
                if mine:
                    yield chunk + [(None, None, e)]
                return
            if mine:
                yield chunk

    def _example(self, state, pair):
        """One row's example, its images decoded in full; crop, flip and caption dropout drawn from a generator of
        (seed, epoch, rank, position): the same after a resume."""
        epoch, position = state
        images = []
        for data, column, which in zip((pair.winner, pair.loser), pair.columns, ("preferred", "rejected")):
            try:
                with _open_image(data) as image:
                    images.append(image.convert("RGB"))
            except Exception as e:  # PIL: OSError ("image file is truncated"), SyntaxError, ValueError...
                if self.dataset.skip_bad_rows:
                    return "bad"
                raise UserError(f"{pair.where}: {column} (the {which} image) could not be decoded ({e}); "
                                f"fix it or skip bad rows ({SKIP_HINT}).")
        g = shards._generator(self.seed, 1, epoch, self.rank, position)
        prompt = "" if torch.rand((), generator=g).item() < self.caption_dropout else pair.caption
        return (prompt, *preprocess_pair(*images, self.resolution, g, self.random_crop, self.hflip, self.sizes))


def _as_is(chunk):
    return chunk


class ShardBatches:
    """The batches `(prompts, preferred, rejected[, sizes])` of a sharded dataset; `state` is the stream position after
    the last one, (epoch, rows consumed in it), which a checkpoint stores; `counts` the ties dropped and rows skipped.

    A stream that yields no usable pair would be read forever: when a whole epoch of this rank's rows has gone by
    without one (every row a dropped tie or a skipped bad row), the next batch is a UserError instead. With one rank
    that means the shards hold none; with W ranks, one rank's share (a different 1/W of the row groups each epoch)
    held none, which is refused too: so few usable rows are not worth W ranks."""

    def __init__(self, stream, num_workers, start):
        # batch_size=None with the identity as collate_fn: each chunk as the worker made it (no list for tuple)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        self.path, self.batch_size, self.rank = stream.dataset.path, stream.batch_size, stream.rank
        self.state, self.counts = tuple(start), dict(stream.dataset.counts)
        self._barren = tuple(start)  # the position since which no usable pair has come
        self._previous = None  # (state, counts) of the last row read
        self._undecodable = 0  # rows skipped because an image did not decode (the stream's counts miss them)
        self._chunks = _closing(iter(loader))
        self._rows = (row for chunk in self._chunks for row in chunk)

    def __iter__(self):
        return self

    def __next__(self):
        examples = []
        while len(examples) < self.batch_size:
            state, counts, outcome = next(self._rows)
            if isinstance(outcome, UserError):
                raise outcome
            if state[1] == 1 and self._barren <= (state[0] - 1, 0):  # epoch state[0] − 1 was read whole, in vain
                self._no_pair_left(*self._previous)
            self._undecodable += outcome == "bad"
            counts = {**counts, "bad": counts.get("bad", 0) + self._undecodable}
            if isinstance(outcome, tuple):
                examples.append(outcome)
                self._barren, self.state, self.counts = state, state, counts
            self._previous = state, counts
        return _collate(examples)

    def _no_pair_left(self, last, counts):
        epoch, rows = last
        raise UserError(f"{self.path} has no usable pair left: all {rows} rows of epoch {epoch} (rank {self.rank}) "
                        f"were dropped ties or skipped bad rows ({counts.get('ties', 0)} ties dropped, "
                        f"{counts['bad']} bad rows skipped so far); keep ties (--ties keep), fix the bad rows, "
                        "or pass shards with usable pairs.")

    def close(self):
        self._chunks.close()
