"""Pick-a-Pic as published: a folder of parquet shards streamed one row group at a time (shards.py, data.batches)."""
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from npo import data
import npo
from npo import shards
from npo.checkpoint import UserError
from conftest import ROOT, within

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
from npo import data
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
    from npo.checkpoint import read_safetensors
    a, b = (read_safetensors(str(tmp_path / run / "lora.safetensors")) for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "split" / "checkpoints" / "step-000005" / "state.pt", weights_only=True)
    (epoch, position), = state["data"]["streams"]  # 9 usable rows of 11: steps 1-4 take 8, step 5 the 9th and
    assert epoch == 1 and position >= 1            # the first usable row of epoch 1
    log = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    assert Counter("loss" in line for line in log)[True] == 5


# ---- rows found bad only when decoded, and streams with no usable pair --------------------------------------

def truncated_jpeg(seed, size=64):
    """A JPEG cut in half: its header reads (PIL opens it), its pixels do not decode."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (size, size)  # what the stream's header check sees
    return data


def rewrite_shard(path, group_rows, statistics=True, **cells):
    """Set cells of a shard, given as column=(row, value) or column=[values], and write it back."""
    table = pq.read_table(path).to_pydict()
    for column, change in cells.items():
        if isinstance(change, tuple):
            table[column][change[0]] = change[1]
        else:
            table[column] = change
    written = pa.table({k: pa.array(v, pa.binary()) if k.startswith("jpg") else v for k, v in table.items()})
    pq.write_table(written, path, row_group_size=group_rows, write_statistics=statistics)


def empty_shard(folder):
    """A folder with one shard that has the columns and no rows."""
    folder.mkdir()
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
                             "jpg_1": pa.array([], pa.binary()), "label_0": pa.array([], pa.float64())}),
                   folder / "train-00000.parquet")
    return str(folder)


def captions(stream, n):
    return sorted(c for _ in range(n) for c in next(stream)[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_names_its_shard_and_row_or_is_skipped(tmp_path, workers):
    folder = tmp_path / "s"
    write_shards(folder, [4, 4], group_rows=2)
    rewrite_shard(folder / "train-00001.parquet", 2, jpg_1=(2, truncated_jpeg(0)))  # row 6 overall; jpg_0 won
    with within(60), pytest.raises(UserError) as error:
        captions(data.batches(data.open_pairs(str(folder)), 2, seed=0, resolution=8, num_workers=workers), 4)
    assert re.fullmatch(r"row 2 of \S*train-00001\.parquet: jpg_1 \(the rejected image\) could not be decoded "
                        r"\(image file is truncated[^;]*\); fix it or skip bad rows \(.*--skip-bad-rows.*\)\.",
                        str(error.value)), str(error.value)
    stream = data.batches(data.open_pairs(str(folder), skip_bad_rows=True), 2, seed=0, resolution=8,
                          num_workers=workers)
    with within(60):
        assert captions(stream, 7) == sorted([f"row {n}" for n in range(8) if n != 6] * 2)  # two epochs
    # 14 good rows end in epoch 1: at its 8th row if the bad row came before it there (then it counts twice)
    assert stream.state in ((1, 7), (1, 8)) and stream.counts == {"bad": 2 if stream.state == (1, 8) else 1}
    stream.close()


def first_batch(folder, workers=0, **options):
    stream = data.batches(data.open_pairs(str(folder), **options), 2, seed=0, resolution=8, num_workers=workers)
    try:
        with within(60):
            return next(stream)
    finally:
        stream.close()


NO_PAIR = r"no usable pair left: all 8 rows of epoch 0 \(rank 0\) were dropped ties or skipped bad rows"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_without_usable_pairs_is_one_sentence(tmp_path, workers):
    folder = tmp_path / "ties"
    write_shards(folder, [4, 4], group_rows=2, tie_every=1)  # 8 rows, all ties
    with pytest.raises(UserError, match=r"every row of .*ties is a tie .* no pair is left; keep them .*--ties keep"):
        data.open_pairs(str(folder))  # told by the shards' statistics, before a row is read
    assert len(first_batch(folder, workers, ties="keep")[0]) == 2
    for shard in ("train-00000.parquet", "train-00001.parquet"):  # without statistics, the stream finds out
        rewrite_shard(folder / shard, 2, statistics=False)
    with pytest.raises(UserError, match=NO_PAIR + r" \(8 ties dropped, 0 bad rows skipped so far\); keep ties"):
        first_batch(folder, workers)

    bad = tmp_path / "bad"  # every row bad, skipped: header-bad in one shard, truncated in the other
    write_shards(bad, [4, 4], group_rows=2)
    rewrite_shard(bad / "train-00000.parquet", 2, jpg_0=[b"garbage"] * 4)
    rewrite_shard(bad / "train-00001.parquet", 2, jpg_1=[truncated_jpeg(i) for i in range(4)])
    with pytest.raises(UserError, match=NO_PAIR + r" \(0 ties dropped, 8 bad rows skipped so far\)"):
        first_batch(bad, workers, skip_bad_rows=True)
    with pytest.raises(UserError) as error:
        first_batch(bad, workers)  # found in a worker, arrives as the sentence alone (no worker's traceback)
    assert re.fullmatch(r"row \d of \S*train-0000\d\.parquet: jpg_\d (is not an image|\(the \w+ image\) could not be "
                        r"decoded \([^)]*\)\)); fix it or skip bad rows \([^)]*\)\.", str(error.value)), str(error.value)


def test_a_single_usable_row_is_enough_and_empty_shards_are_refused(tmp_path):
    folder = tmp_path / "s"
    write_shards(folder, [4, 4], group_rows=2)
    rewrite_shard(folder / "train-00000.parquet", 2, label_0=[0.5, 0.5, 0.5, 1.0], statistics=False)
    rewrite_shard(folder / "train-00001.parquet", 2, label_0=[0.5] * 4)
    stream = data.batches(data.open_pairs(str(folder)), 2, seed=0, resolution=8)
    with within(60):
        assert [next(stream)[0] for _ in range(2)] == [["row 3", "row 3"]] * 2  # one pair an epoch: no error
    with within(60), pytest.raises(UserError, match=r"empty holds no rows with the columns caption, jpg_0"):
        data.open_pairs(empty_shard(tmp_path / "empty"))


def test_training_on_shards_without_usable_pairs_exits_2(tiny_model, tmp_path, capsys):
    model, _ = tiny_model
    ties = write_shards(tmp_path / "ties", [4, 4], group_rows=2, tie_every=1)  # the case: 8 rows, all ties
    bad = write_shards(tmp_path / "bad", [4], group_rows=2)
    rewrite_shard(tmp_path / "bad" / "train-00000.parquet", 2, jpg_1=[truncated_jpeg(i) for i in range(4)])
    empty = empty_shard(tmp_path / "empty")
    for folder, flags, words, before_model in [(ties, [], "is a tie (label_0 0.5) and ties are dropped", True),
                                               (empty, [], "holds no rows with the columns", True),
                                               (bad, ["--skip-bad-rows"], "has no usable pair left", False)]:
        out = tmp_path / f"out-{os.path.basename(folder)}"
        with within(120):
            code = npo.main(["train", "--model", model, "--data", str(folder), "--out", str(out), "--resolution", "16",
                             "--device", "cpu", "--batch-size", "2", "--steps", "2", *flags])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the run's own progress lines, if it got that far
        assert code == 2 and last.startswith("error: ") and words in last and "Traceback" not in err, err
        if before_model:  # refused when the data is opened: nothing was made
            assert not out.exists()


def test_a_place_past_the_end_of_its_epoch_is_refused(tmp_path):
    """A checkpoint's place in shards that have since lost rows would silently land in the next epoch."""
    dataset = data.open_pairs(write_shards(tmp_path / "s", [4, 4], group_rows=2))
    assert next(dataset.rows(0, start=(3, 8)))[0] == (4, 1)  # the end of epoch 3: on to epoch 4
    with within(60), pytest.raises(UserError, match=r"row 9 of epoch 3, rank 0 of 1\) is past the end of that "
                                                    r"epoch's 8 rows of .*; the shards changed"):
        next(dataset.rows(0, start=(3, 9)))
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

