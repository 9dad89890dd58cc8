"""Pick-a-Pic as published: a folder (or glob) of parquet shards, streamed one row group at a time.

    dataset = shards.open_shards("pickapic_v1/train/")             # or "pickapic_v1/train/*.parquet"
    for (epoch, position), pair in dataset.rows(seed=0, rank=0, world_size=1):
        ...                                            # pair: shards.Pair(caption, winner, loser, where, columns) or None

The order of the rows depends only on (seed, epoch, rank, world size): each epoch shuffles the row groups of all
shards together, rank r of W takes every W-th of them (so ranks never share a row within an epoch), and the rows
of each window of `buffer` consecutive row groups are shuffled among themselves (a shuffle buffer). A rank's place
in the stream is (epoch, rows consumed in that epoch). That pair is all a checkpoint needs to continue exactly, and
it is found from the shards' metadata alone, so a resumed run seeks straight to it instead of reading what came
before. Memory holds one window of row groups, whatever the number of shards or rows.

Rows: `caption`, `jpg_0`, `jpg_1` (encoded images), `label_0` (1: jpg_0 won, 0: jpg_1 won, 0.5: a tie). Ties are
dropped (`ties="drop"`, Salesforce's Diffusion-DPO) or kept with jpg_0 as the winner (`"keep"`, the NPO authors'
runs). A row whose label, caption or image header is wrong is an error naming its shard and row, or, with
`skip_bad_rows`, is skipped; a shard without the columns likewise. Skipped rows and dropped ties are still
consumed (they count in the position), so a resume lands on the same row either way; `counts` tallies them.
Only the image headers are checked here (cheap); a pair carries `where` it came from, so whoever decodes the
images in full (data.batches) can name the shard and row of an image damaged past its header (a truncated JPEG).
`rows` itself never ends; a folder whose rows are all ties is refused when opened (from the shards' statistics),
and data.batches stops any stream in which a whole epoch gives no usable pair.
"""
import glob
import io
import os
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .checkpoint import UserError

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
SKIP_HINT = "skip_bad_rows=True, or --skip-bad-rows on the command line"


class Pair(NamedTuple):
    """A usable row: the winner's and loser's encoded images, `where` it is ("row 4 of train-00001.parquet") and
    the columns the winner and loser came from (("jpg_1", "jpg_0") when jpg_1 won), for errors found when decoding."""
    caption: str
    winner: bytes
    loser: bytes
    where: str
    columns: tuple


def is_sharded(path):
    """True for a glob pattern, or a folder that holds parquet files (and is not a w/ + l/ pair folder)."""
    path = os.fspath(path)
    if any(c in path for c in "*?["):
        return True
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.parquet")))


def _parquet():
    try:
        import pyarrow.parquet as pq  # optional: only this input format needs it
    except ImportError:
        raise UserError("reading parquet shards needs pyarrow, which is not installed; "
                        "run `pip install pyarrow` (or `pip install npo[parquet]`).")
    return pq


class Shards:
    """The row groups of a set of parquet shards, and the seeded stream over them."""

    def __init__(self, path, files, units, ties="drop", skip_bad_rows=False, buffer=2, skipped_rows=0):
        self.path, self.files, self.units = path, files, units  # units: (file index, row group, first row, rows)
        self.ties, self.skip_bad_rows, self.buffer = ties, skip_bad_rows, buffer
        self.counts = Counter(bad=skipped_rows)  # rows skipped ("bad") and ties dropped ("ties") so far

    def __len__(self):
        return sum(u[3] for u in self.units)  # rows, ties and bad rows included: they are known only when read

    def __repr__(self):
        return (f"Shards({self.path!r}: {len(self.files)} shards, {len(self.units)} row groups, {len(self)} rows, "
                f"ties {self.ties})")

    def rank_units(self, seed, epoch, rank, world_size):
        """Rank `rank`'s row groups in epoch `epoch`: every W-th of one seeded permutation of all of them."""
        order = torch.randperm(len(self.units), generator=_generator(seed, epoch))
        return [self.units[i] for i in order[rank::world_size].tolist()]

    def rows(self, seed, rank=0, world_size=1, start=(0, 0)):
        """Endless ((epoch, position), pair) from `start` on, position counting the rows consumed in the epoch;
        pair is a `Pair`, or None for a dropped tie or a skipped bad row."""
        epoch, position = start
        while True:
            units = self.rank_units(seed, epoch, rank, world_size)
            if not units:
                raise UserError(f"{self.path} has {len(self.units)} row groups, fewer than the {world_size} ranks; "
                                "use fewer ranks or shards with more row groups.")
            total = sum(u[3] for u in units)
            if position > total:  # would skip to the next epoch without a word
                raise UserError(f"the stream's place (row {position} of epoch {epoch}, rank {rank} of {world_size}) is "
                                f"past the end of that epoch's {total} rows of {self.path}; the shards changed since "
                                "it was saved: resume with the same shards, or start a new run.")
            first = 0  # rows of the epoch before this window
            for w in range(0, len(units), self.buffer):
                window = units[w:w + self.buffer]
                size = sum(u[3] for u in window)
                if first + size > position:
                    rows = self._read(window)
                    order = torch.randperm(size, generator=_generator(seed, epoch, rank, w)).tolist()
                    for k in range(position - first, size):
                        yield (epoch, first + k + 1), self._pair(*rows[order[k]])
                    position = first + size
                first += size
            epoch, position = epoch + 1, 0

    def _read(self, window):
        """The rows of a window of row groups: (caption, jpg_0, jpg_1, label_0, where) each."""
        pq, rows = _parquet(), []
        for file_index, group, first_row, _ in window:
            path = self.files[file_index]
            try:
                table = pq.ParquetFile(path).read_row_group(group, columns=list(COLUMNS))
            except Exception as e:  # pyarrow's ArrowInvalid / OSError for a damaged shard
                raise UserError(f"row group {group} of {path} is not readable ({e}); replace that shard.")
            columns = [table.column(c).to_pylist() for c in COLUMNS]
            rows += [(*values, f"row {first_row + i} of {path}") for i, values in enumerate(zip(*columns))]
        return rows

    def _pair(self, caption, jpg_0, jpg_1, label_0, where):
        if label_0 == 0.5 and self.ties == "drop":
            self.counts["ties"] += 1
            return None
        problem = (f"label_0 is {label_0!r}, not 0, 0.5 or 1" if label_0 not in (0, 0.5, 1) else
                   f"caption is {caption!r}, not text" if not isinstance(caption, str) else
                   _image_problem(jpg_0, "jpg_0") or _image_problem(jpg_1, "jpg_1"))
        if problem:
            if not self.skip_bad_rows:
                raise UserError(f"{where}: {problem}; fix it or skip bad rows ({SKIP_HINT}).")
            self.counts["bad"] += 1
            return None
        if label_0 == 0:
            return Pair(caption, jpg_1, jpg_0, where, ("jpg_1", "jpg_0"))
        return Pair(caption, jpg_0, jpg_1, where, ("jpg_0", "jpg_1"))  # a kept tie too: jpg_0 wins


def _generator(seed, *keys):
    """A torch.Generator that depends only on (seed, keys): numpy's SeedSequence keeps the streams apart."""
    state = np.random.SeedSequence(seed, spawn_key=(0x7368617264, *keys)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _image_problem(data, name):
    if not isinstance(data, bytes) or not data:
        return f"{name} is empty"
    try:
        with Image.open(io.BytesIO(data)):  # the header only: cheap, and catches what is not an image at all
            return None
    except Exception:
        return f"{name} is not an image"


def open_shards(path, ties="drop", skip_bad_rows=False, buffer=2):
    """The shards of a folder (its *.parquet files) or a glob pattern, from their metadata only (no rows read).
    Shards whose rows are all ties are refused here when ties are dropped (the footer's statistics show it)."""
    if ties not in ("drop", "keep"):
        raise UserError(f"ties must be 'drop' or 'keep', not {ties!r}.")
    if buffer < 1:
        raise UserError(f"the shuffle buffer must hold at least 1 row group (got {buffer}).")
    pattern = os.path.join(path, "*.parquet") if os.path.isdir(path) else path
    files = sorted(glob.glob(pattern))
    if not files:
        raise UserError(f"{path} matches no parquet files; pass a folder of Pick-a-Pic .parquet shards or a glob "
                        "such as 'train-*.parquet'.")
    pq, units, skipped, only_ties = _parquet(), [], 0, True
    for i, shard in enumerate(files):
        try:
            meta = pq.ParquetFile(shard).metadata
        except Exception as e:
            raise UserError(f"{shard} is not a readable parquet file ({e}); download or export it again.")
        missing = [c for c in COLUMNS if c not in meta.schema.names]
        if missing:
            if not skip_bad_rows:
                raise UserError(f"{shard} lacks the column(s) {', '.join(missing)}; a Pick-a-Pic shard has the "
                                f"columns {', '.join(COLUMNS)}, or skip such shards ({SKIP_HINT}).")
            skipped += meta.num_rows
            continue
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                units.append((i, g, first, rows))
                only_ties &= _only_ties(meta.row_group(g))
            first += rows
    if not units:
        raise UserError(f"{path} holds no rows with the columns {', '.join(COLUMNS)}; pass Pick-a-Pic shards.")
    if only_ties and ties == "drop":  # the stream would drop every row, epoch after epoch
        raise UserError(f"every row of {path} is a tie (label_0 0.5) and ties are dropped, so no pair is left; "
                        "keep them with jpg_0 as the winner (ties='keep', --ties keep) or pass shards with preferences.")
    return Shards(path, files, units, ties, skip_bad_rows, buffer, skipped)


def _only_ties(group):
    """True when a row group's statistics (in the shard's footer, written by pyarrow and most writers) show that
    every label_0 in it is 0.5; False when they cannot tell. A null label is a bad row: no pair either way."""
    for c in range(group.num_columns):
        if group.column(c).path_in_schema == "label_0":
            stats = group.column(c).statistics
            return stats is not None and stats.has_min_max and stats.min == stats.max == 0.5
    return False
