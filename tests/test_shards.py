"""Pick-a-Pic as published: a folder of parquet shards streamed one row group at a time (shards.py, data.batches)."""
import io
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import npo
import shards
from checkpoint import UserError
from conftest import ROOT

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(seed, size=16):
    """A small random PNG whose first pixel's blue channel names it (seed % 256)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0, 2] = seed % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, shard_rows, group_rows, tie_every=0, size=16, extra_columns=True):
    """Shards of rows `caption = "row N"`, jpg_0 the winner when N is even; every `tie_every`-th row a tie."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for s, count in enumerate(shard_rows):
        rows = []
        for _ in range(count):
            label = 0.5 if tie_every and n % tie_every == tie_every - 1 else float(n % 2 == 0)
            rows.append((f"row {n}", png(2 * n, size), png(2 * n + 1, size), label))
            n += 1
        table = {"caption": [r[0] for r in rows], "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
                 "jpg_1": pa.array([r[2] for r in rows], pa.binary()), "label_0": [r[3] for r in rows]}
        if extra_columns:  # the published shards carry these too
            table.update(label_1=[1 - r[3] for r in rows], image_0_uid=[f"u{2 * i}" for i in range(len(rows))])
        pq.write_table(pa.table(table), folder / f"train-{s:05d}.parquet", row_group_size=group_rows)
    return str(folder)


def epoch_rows(dataset, seed=0, rank=0, world_size=1, epoch=0):
    """The captions one rank sees in one epoch (None for dropped rows)."""
    seen = []
    for (e, _), pair in dataset.rows(seed, rank, world_size, start=(epoch, 0)):
        if e != epoch:
            return seen
        seen.append(pair and pair[0])


def test_every_non_tie_row_once_per_epoch_and_orientation(tmp_path):
    folder = write_shards(tmp_path / "s", [7, 5, 9], group_rows=3, tie_every=4)
    dataset = data.open_pairs(folder)
    assert isinstance(dataset, shards.Shards) and len(dataset) == 21 and len(dataset.units) == 8
    for epoch in (0, 1):
        seen = epoch_rows(dataset, epoch=epoch)
        kept = sorted(c for c in seen if c)
        assert len(seen) == 21 and kept == sorted(f"row {n}" for n in range(21) if n % 4 != 3)
    assert epoch_rows(dataset, epoch=0) != epoch_rows(dataset, epoch=1)  # reshuffled each epoch
    assert dataset.counts["ties"] == 2 * 5 * 2  # 5 ties per epoch, two calls of each of two epochs
    for (_, _), pair in dataset.rows(0, start=(0, 0)):
        if pair:
            n = int(pair[0].split()[1])
            assert pair[1] == png(2 * n if n % 2 == 0 else 2 * n + 1)  # the winner: jpg_0 when label_0 is 1
            break
    keep = data.open_pairs(os.path.join(folder, "*.parquet"), ties="keep")  # a glob works too
    assert sorted(epoch_rows(keep)) == sorted(f"row {n}" for n in range(21))
    tie = next(p for _, p in keep.rows(0) if p[0] == "row 3")
    assert tie[1] == png(6) and tie[2] == png(7)  # a kept tie: jpg_0 wins


def test_ranks_see_disjoint_rows(tmp_path):
    dataset = data.open_pairs(write_shards(tmp_path / "s", [6, 6, 6, 6], group_rows=2))
    ranks = [epoch_rows(dataset, rank=r, world_size=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(f"row {n}" for n in range(24))


def take(stream, n):
    out = [next(stream) for _ in range(n)]
    return out, stream.state


def assert_same(a, b):
    for (pa_, wa, la), (pb, wb, lb) in zip(a, b):
        assert pa_ == pb and torch.equal(wa, wb) and torch.equal(la, lb)


def test_resume_mid_shard_and_workers_give_the_same_batches(tmp_path):
    dataset = data.open_pairs(write_shards(tmp_path / "s", [7, 5, 9], group_rows=3, tie_every=5))
    opts = dict(seed=2, resolution=8, random_crop=True, caption_dropout=0.3)
    straight, _ = take(data.batches(dataset, 3, **opts), 9)  # 17 usable rows an epoch: crosses into epoch 1
    first, state = take(data.batches(dataset, 3, **opts), 4)
    assert state[0] == 0 and 0 < state[1] < 21  # in the middle of epoch 0
    rest, _ = take(data.batches(dataset, 3, start_state=state, **opts), 5)
    assert_same(straight, first + rest)
    workers = data.batches(dataset, 3, num_workers=2, **opts)
    assert_same(straight, take(workers, 9)[0])
    workers.close()


def test_bad_rows_and_shards(tmp_path):
    folder = tmp_path / "s"
    write_shards(folder, [4], group_rows=2)
    table = pq.read_table(folder / "train-00000.parquet").to_pydict()
    table["jpg_1"][1] = b"garbage"
    table["label_0"][2] = 0.7
    pq.write_table(pa.table(table), folder / "train-00000.parquet", row_group_size=2)
    dataset = data.open_pairs(str(folder))
    with pytest.raises(UserError, match=r"row 1 of .*train-00000.parquet: jpg_1 is not an image; .*--skip-bad-rows"):
        epoch_rows(dataset)
    dataset = data.open_pairs(str(folder), skip_bad_rows=True)
    assert sorted(c for c in epoch_rows(dataset) if c) == ["row 0", "row 3"] and dataset.counts["bad"] == 2
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"x"]}), folder / "train-00001.parquet")
    with pytest.raises(UserError, match=r"train-00001.parquet lacks the column\(s\) jpg_1, label_0"):
        data.open_pairs(str(folder))
    assert data.open_pairs(str(folder), skip_bad_rows=True).counts["bad"] == 1
    (folder / "train-00002.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="train-00002.parquet is not a readable parquet file"):
        data.open_pairs(str(folder), skip_bad_rows=True)
    with pytest.raises(UserError, match="matches no parquet files"):
        data.open_pairs(str(tmp_path / "none-*.parquet"))


PEAK = """
import resource, sys
import data
dataset = data.open_pairs(sys.argv[1])
for (epoch, _), pair in dataset.rows(0):
    if epoch:
        break
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def test_memory_is_flat_in_the_number_of_shards(tmp_path):
    """One epoch over 4 and over 40 shards of about 1 MB each: the peak grows by far less than a shard's worth per
    added shard (measured: see BENCHMARKS.md); loading them all would add 36 MB."""
    peaks = []
    for count in (4, 40):
        folder = write_shards(tmp_path / f"s{count}", [8] * count, group_rows=4, size=128)
        r = subprocess.run([sys.executable, "-c", PEAK, folder], capture_output=True, text=True, cwd=ROOT, check=True)
        peaks.append(int(r.stdout.split()[-1]) / 1024)
    assert peaks[1] - peaks[0] < 12, peaks  # MiB


def test_training_on_shards_resumes_bit_for_bit(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = write_shards(tmp_path / "s", [5, 6], group_rows=3, tie_every=4, size=24)
    flags = ["--model", model, "--data", folder, "--resolution", "16", "--lr", "1e-3", "--device", "cpu",
             "--batch-size", "2", "--log-every", "1", "--checkpoint-every", "2"]
    assert npo.main(["train", *flags, "--out", str(tmp_path / "whole"), "--steps", "5"]) == 0
    assert npo.main(["train", *flags, "--out", str(tmp_path / "split"), "--steps", "3"]) == 0
    assert npo.main(["train", *flags, "--out", str(tmp_path / "split"), "--steps", "5", "--resume", "latest"]) == 0
    from checkpoint import read_safetensors
    a, b = (read_safetensors(str(tmp_path / run / "lora.safetensors")) for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "split" / "checkpoints" / "step-000005" / "state.pt", weights_only=True)
    (epoch, position), = state["data"]["streams"]  # 9 usable rows of 11: steps 1-4 take 8, step 5 the 9th and
    assert epoch == 1 and position >= 1            # the first usable row of epoch 1
    log = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    assert Counter("loss" in line for line in log)[True] == 5


def test_a_bad_row_leaves_no_run_behind(tiny_model, tmp_path, capsys):
    """A row whose image is not an image stops training with a sentence naming it, and leaves nothing behind: no
    folder when the run made it, and only what was there before when --out already existed."""
    model, _ = tiny_model
    folder = tmp_path / "s"
    write_shards(folder, [6], group_rows=3, size=24)
    table = pq.read_table(folder / "train-00000.parquet").to_pydict()
    table["jpg_1"][4] = b"garbage"
    pq.write_table(pa.table(table), folder / "train-00000.parquet", row_group_size=3)
    flags = ["--model", model, "--data", str(folder), "--resolution", "16", "--device", "cpu", "--log-every", "1",
             "--steps", "10"]
    assert npo.main(["train", *flags, "--out", str(tmp_path / "new")]) == 2
    assert "row 4 of" in capsys.readouterr().err and not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert npo.main(["train", *flags, "--out", str(existing)]) == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]

