"""Preference-pair reading, augmentation and the resumable batch stream, on small images made here with PIL.

The test images encode their pixel coordinates (red = x, green = y) and their identity (blue), so the output
of the pipeline shows which image is preferred and which crop and flip were applied."""
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import npo
from npo.checkpoint import UserError
from conftest import within
from npo.data import batches, open_pairs, preprocess_pair, read_prompts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def coord_image(blue, size=(48, 32)):
    """RGB image with red = x, green = y (both scaled to 0..255) and a constant blue that names the image."""
    w, h = size
    x = np.linspace(0, 255, w).round().astype(np.uint8)
    y = np.linspace(0, 255, h).round().astype(np.uint8)
    pixels = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y[:, None], (h, w)), np.full((h, w), blue, np.uint8)], -1)
    return Image.fromarray(pixels)


def encode(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def blue_of(image):
    return image.getpixel((0, 0))[2]


def assert_one_sentence(error):
    message = str(error.value)
    assert message.endswith(".") and ";" in message and "\n" not in message, message


def write_jsonl(folder, rows):
    path = folder / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def jsonl_pairs(folder, n, size=(48, 32)):
    """n pairs: preferred images have blue 200 + i, rejected 50 + i; prompts 'prompt i'."""
    (folder / "img").mkdir()
    rows = []
    for i in range(n):
        coord_image(200 + i, size).save(folder / "img" / f"good{i}.png")
        coord_image(50 + i, size).save(folder / "img" / f"bad{i}.png")
        rows.append({"prompt": f"prompt {i}", "chosen": f"img/good{i}.png", "rejected": f"img/bad{i}.png"})
    return write_jsonl(folder, rows)


def write_parquet(path, rows, **columns):
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0); `columns` overrides or removes (None) columns."""
    data = dict(caption=pa.array([r[0] for r in rows]), jpg_0=pa.array([r[1] for r in rows], pa.binary()),
                jpg_1=pa.array([r[2] for r in rows], pa.binary()), label_0=pa.array([r[3] for r in rows], pa.float64()))
    data.update(columns)
    pq.write_table(pa.table({k: v for k, v in data.items() if v is not None}), path)
    return path


# ---- sources and orientation ---------------------------------------------------------------------------------

def test_jsonl_pairs(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 3))
    assert len(ds) == 3 and ds.kind == "jsonl" and ds.skipped == 0
    pair = ds[1]
    assert pair.prompt == "prompt 1" and blue_of(pair.preferred) == 201 and blue_of(pair.rejected) == 51
    assert pair.preferred.mode == "RGB"


def test_folder_pairs_with_both_caption_places(tmp_path):
    for d in ("w", "l", "captions"):
        (tmp_path / d).mkdir()
    for i, name in enumerate(["a.png", "b.png"]):
        coord_image(200 + i).save(tmp_path / "w" / name)
        coord_image(50 + i).save(tmp_path / "l" / name)
    (tmp_path / "captions" / "a.txt").write_text("a cat\n")
    (tmp_path / "w" / "b.txt").write_text("a dog")
    ds = open_pairs(tmp_path)
    assert [ds[i].prompt for i in range(2)] == ["a cat", "a dog"]
    assert [(blue_of(ds[i].preferred), blue_of(ds[i].rejected)) for i in range(2)] == [(200, 50), (201, 51)]


def test_parquet_label_orientation_and_ties(tmp_path):
    zero, one = coord_image(10), coord_image(240)  # jpg_0 is blue 10, jpg_1 blue 240
    rows = [("jpg_0 won", encode(zero), encode(one), 1.0),
            ("a tie", encode(zero), encode(one), 0.5),
            ("jpg_1 won", encode(zero, "JPEG"), encode(one, "JPEG"), 0.0)]
    ds = open_pairs(write_parquet(tmp_path / "p.parquet", rows))
    assert len(ds) == 2 and ds.ties == 1 and ds.kind == "parquet"
    assert ds[0].prompt == "jpg_0 won" and blue_of(ds[0].preferred) == 10 and blue_of(ds[0].rejected) == 240
    assert ds[1].prompt == "jpg_1 won" and blue_of(ds[1].preferred) > 200 and blue_of(ds[1].rejected) < 50  # JPEG is lossy


# ---- preprocessing -------------------------------------------------------------------------------------------

def test_same_crop_and_flip_for_both_images():
    w, l = coord_image(200), coord_image(50)
    flips, lefts = set(), set()
    for seed in range(40):
        a, b = preprocess_pair(w, l, 16, torch.Generator().manual_seed(seed), random_crop=True, hflip=True)
        assert a.shape == b.shape == (3, 16, 16) and a.dtype == torch.float32
        assert torch.equal(a[:2], b[:2])  # identical red/green = identical crop, resize and flip
        assert torch.allclose(a[2], torch.tensor(200 / 127.5 - 1)) and torch.allclose(b[2], torch.tensor(50 / 127.5 - 1))
        assert torch.equal(a[1, :, 0], a[1, :, -1])  # short side: the full height is kept, only x is cropped
        flipped = bool(a[0, 0, 0] > a[0, 0, -1])  # red decreases left to right
        flips.add(flipped)
        lefts.add(round(float(a[0, 0, -1 if flipped else 0]), 3))
    assert flips == {False, True} and len(lefts) > 3  # both flips and several crop offsets occur


def test_center_crop_of_the_resized_short_side():
    # 64x32 of red | green (middle half) | blue: short side 32 -> 16, width 32, center crop keeps the green half
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:48, 1] = pixels[:, 48:, 2] = 255
    image = Image.fromarray(pixels)
    a, b = preprocess_pair(image, image, 16, torch.Generator().manual_seed(0), random_crop=False, hflip=False)
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    inner = a[:, :, 1:-1]  # the outermost columns may blend with the neighbours under bilinear resizing
    assert torch.allclose(inner[1], torch.ones(())) and torch.allclose(inner[[0, 2]], -torch.ones(()))


# ---- the batch stream ----------------------------------------------------------------------------------------

def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for (p1, w1, l1), (p2, w2, l2) in zip(xs, ys):
        assert p1 == p2 and torch.equal(w1, w2) and torch.equal(l1, l2)


def test_batches_are_deterministic_and_resumable(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 5))
    opts = dict(resolution=16, random_crop=True, caption_dropout=0.3)
    run = take(batches(ds, 2, seed=7, **opts), 6)
    prompts, preferred, rejected = run[0]
    assert len(prompts) == 2 and preferred.shape == rejected.shape == (2, 3, 16, 16)
    assert_same_batches(run, take(batches(ds, 2, seed=7, **opts), 6))
    assert_same_batches(run[3:], take(batches(ds, 2, seed=7, start_step=3, **opts), 3))  # resume at step 3
    other = take(batches(ds, 2, seed=8, **opts), 6)
    assert any(a[0] != b[0] or not torch.equal(a[1], b[1]) for a, b in zip(run, other))
    # 5 pairs, batch 2: 2 steps per epoch, so each epoch uses 4 distinct pairs (told apart by their blue)
    for epoch in range(3):
        blues = torch.cat([b[1][:, 2, 0, 0] for b in run[2 * epoch: 2 * epoch + 2]])
        assert len(set(blues.tolist())) == 4
    for prompts, preferred, rejected in run:  # orientation survives batching: winners are blue >= 200
        assert (preferred[:, 2] > rejected[:, 2]).all()


def test_sharding_matches_one_process_with_the_global_batch(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 9))
    opts = dict(seed=3, resolution=16, random_crop=True, caption_dropout=0.5)
    single = take(batches(ds, 4, **opts), 5)  # 9 // 4 = 2 steps per epoch: crosses two epoch boundaries
    ranks = [take(batches(ds, 2, rank=r, world_size=2, **opts), 5) for r in range(2)]
    merged = [(r0[0] + r1[0], torch.cat([r0[1], r1[1]]), torch.cat([r0[2], r1[2]])) for r0, r1 in zip(*ranks)]
    assert_same_batches(single, merged)


def test_background_workers_give_the_same_batches(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 4))
    opts = dict(seed=1, resolution=16, random_crop=True)
    assert_same_batches(take(batches(ds, 2, **opts), 3), take(batches(ds, 2, num_workers=2, **opts), 3))


def test_caption_dropout(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 4))
    assert all(p == "" for b in take(batches(ds, 2, seed=0, resolution=8, caption_dropout=1.0), 4) for p in b[0])
    assert all(p != "" for b in take(batches(ds, 2, seed=0, resolution=8, caption_dropout=0.0), 4) for p in b[0])
    with pytest.raises(UserError):
        batches(ds, 2, seed=0, resolution=8, caption_dropout=1.5)


# ---- bad input -----------------------------------------------------------------------------------------------

def expect_error(match, fn, *args, **kwargs):
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert_one_sentence(e)


def test_missing_path_and_unknown_kinds(tmp_path):
    expect_error("does not exist", open_pairs, tmp_path / "nope.jsonl")
    (tmp_path / "w").mkdir()
    expect_error("no w/ and l/", open_pairs, tmp_path)
    (tmp_path / "pairs.csv").write_text("x")
    expect_error("neither a .jsonl nor a .parquet", open_pairs, tmp_path / "pairs.csv")


def test_no_usable_pairs(tmp_path):
    expect_error("no usable pairs", open_pairs, write_jsonl(tmp_path, ["", "  "]))
    image = encode(coord_image(0))
    ties = write_parquet(tmp_path / "ties.parquet", [("a", image, image, 0.5), ("b", image, image, 0.5)])
    expect_error(r"no usable pairs \(0 bad rows skipped, 2 ties dropped\)", open_pairs, ties)


def no_pair_layouts(folder):
    """A .jsonl file, a w/ + l/ folder and two .parquet files, each without a usable pair once bad rows are skipped
    (and ties dropped): {path: (bad rows, ties)}."""
    image = encode(coord_image(0))
    (folder / "pairs" / "w").mkdir(parents=True)
    (folder / "pairs" / "l").mkdir()
    coord_image(1).save(folder / "pairs" / "w" / "a.png")  # no partner in l/
    coord_image(2).save(folder / "pairs" / "l" / "b.png")  # no partner in w/
    coord_image(3).save(folder / "pairs" / "w" / "c.png")
    coord_image(4).save(folder / "pairs" / "l" / "c.png")  # a pair, but without a caption
    return {write_jsonl(folder, [{"prompt": "p", "chosen": "nowhere.png", "rejected": "nowhere.png"}] * 2): (2, 0),
            folder / "pairs": (3, 0),
            write_parquet(folder / "bad.parquet", [("a", image, b"garbage", 1.0), (None, image, image, 0.0)]): (2, 0),
            write_parquet(folder / "mixed.parquet", [("a", image, image, 0.5), ("b", image, image, 0.3)]): (1, 1)}


def test_no_usable_pairs_when_every_row_is_skipped(tmp_path):
    for path, (bad, ties) in no_pair_layouts(tmp_path).items():
        with within(60):
            expect_error(rf"no usable pairs \({bad} bad rows skipped, {ties} ties dropped\)", open_pairs, path,
                         skip_bad_rows=True)


def test_training_without_usable_pairs_exits_2_in_every_layout(tiny_model, tmp_path, capsys):
    model, _ = tiny_model
    for n, (path, (bad, ties)) in enumerate(no_pair_layouts(tmp_path).items()):
        out = tmp_path / f"out{n}"
        with within(120):
            code = npo.main(["train", "--model", model, "--data", str(path), "--out", str(out), "--resolution", "16",
                             "--device", "cpu", "--batch-size", "1", "--steps", "1", "--skip-bad-rows"])
        err = capsys.readouterr().err
        assert code == 2 and f"no usable pairs ({bad} bad rows skipped, {ties} ties dropped)" in err, err
        assert err.count("\n") == 1 and not out.exists()  # refused when opened: one line, nothing written


def test_bad_jsonl_lines(tmp_path):
    good = json.loads(jsonl_pairs(tmp_path, 1).read_text())
    expect_error("line 2 .* not valid JSON", open_pairs, write_jsonl(tmp_path, [good, "{not json"]))
    expect_error("line 1 .* no string 'rejected'", open_pairs, write_jsonl(tmp_path, [{"prompt": "p", "chosen": "a.png"}]))
    expect_error("line 1 .* no string 'prompt'", open_pairs, write_jsonl(tmp_path, [["a list"]]))


def test_bad_jsonl_images_fail_or_are_skipped(tmp_path):
    path = jsonl_pairs(tmp_path, 3)
    rows = path.read_text().splitlines()
    (tmp_path / "img" / "junk.png").write_bytes(b"this is not a png")
    rows[1] = json.dumps({"prompt": "x", "chosen": "img/missing.png", "rejected": "img/bad1.png"})
    rows.append(json.dumps({"prompt": "y", "chosen": "img/good0.png", "rejected": "img/junk.png"}))
    path.write_text("\n".join(rows) + "\n")
    expect_error("line 2 .* img/missing.png does not exist", open_pairs, path)
    ds = open_pairs(path, skip_bad_rows=True)
    assert len(ds) == 2 and ds.skipped == 2 and [ds[i].prompt for i in range(2)] == ["prompt 0", "prompt 2"]
    rows[1] = rows.pop()  # the junk row alone, now on line 2
    path.write_text("\n".join(rows) + "\n")
    expect_error("line 2 .* img/junk.png is not an image", open_pairs, path)


def test_image_damaged_after_its_header_fails_when_decoded(tmp_path):
    path = jsonl_pairs(tmp_path, 1)
    good = tmp_path / "img" / "good0.png"
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    good.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    ds = open_pairs(path)
    expect_error("line 1 .* could not be decoded", ds.__getitem__, 0)
    for workers in (0, 2):  # from a worker process too, as the sentence alone (not wrapped in its traceback)
        stream = batches(ds, 1, seed=0, resolution=8, num_workers=workers)
        with within(60):
            expect_error(r"^line 1 of \S*pairs.jsonl: the preferred image could not be decoded", next, stream)
        stream.close()


def test_folder_mismatch_and_missing_caption(tmp_path):
    for d in ("w", "l"):
        (tmp_path / d).mkdir()
    for name in ("a.png", "b.png", "c.png"):
        coord_image(200).save(tmp_path / "w" / name)
        (tmp_path / "w" / name.replace(".png", ".txt")).write_text("caption")
    coord_image(50).save(tmp_path / "l" / "a.png")
    coord_image(50).save(tmp_path / "l" / "b.png")
    coord_image(50).save(tmp_path / "l" / "z.png")
    expect_error(r"2 image names .* only one of w/ and l/ \(c.png, z.png\)", open_pairs, tmp_path)
    (tmp_path / "w" / "b.txt").unlink()
    ds = open_pairs(tmp_path, skip_bad_rows=True)
    assert len(ds) == 1 and ds.skipped == 3 and ds[0].prompt == "caption"
    (tmp_path / "w" / "c.png").unlink()
    (tmp_path / "l" / "z.png").unlink()
    expect_error(r"pair 'b.png' .* no caption \(write captions/b.txt\)", open_pairs, tmp_path)


def test_bad_parquet_rows_columns_and_files(tmp_path):
    image = encode(coord_image(0))
    rows = [("ok", image, image, 1.0), ("broken", image, b"garbage", 0.0), ("odd label", image, image, 0.7)]
    path = write_parquet(tmp_path / "p.parquet", rows)
    expect_error("row 1 .* jpg_1 is not an image", open_pairs, path)
    ds = open_pairs(path, skip_bad_rows=True)
    assert len(ds) == 1 and ds.skipped == 2
    expect_error("lacks the column.* jpg_1, label_0", open_pairs,
                 write_parquet(tmp_path / "q.parquet", rows, jpg_1=None, label_0=None))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    expect_error("not a readable parquet file", open_pairs, tmp_path / "fake.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "p.parquet", [("ok", encode(coord_image(0)), encode(coord_image(1)), 1.0)])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expect_error(r"pip install pyarrow", open_pairs, path)


def test_dataset_smaller_than_a_batch(tmp_path):
    ds = open_pairs(jsonl_pairs(tmp_path, 3))
    expect_error("3 pairs, fewer than one batch of 4", batches, ds, 2, seed=0, resolution=8, world_size=2)


def test_prompts_from_a_pick_a_pic_parquet(tmp_path):
    image = encode(coord_image(0))
    rows = [("a cat", image, image, 1.0), (" a dog ", image, image, 0.0), ("a cat", image, image, 0.5), ("", image, image, 1.0)]
    path = write_parquet(tmp_path / "test.parquet", rows)
    assert read_prompts(path) == ["a cat", "a dog"]  # unique captions in order, blank ones skipped
    expect_error("lacks the column.* caption", read_prompts,
                 write_parquet(tmp_path / "nocaption.parquet", rows, caption=None))
    expect_error("row 1 .* not text", read_prompts,
                 write_parquet(tmp_path / "null.parquet", rows, caption=pa.array(["a", None, "b", "c"])))


def test_prompts_files_with_negative_prompts(tmp_path):
    """read_prompts: the prompts alone (what reward training reads), or (prompt, negative or None) per row."""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "negative_prompt": "blurry"}\n\n{"prompt": "a dog"}\n'
                     '{"prompt": "a cow", "negative_prompt": ""}\n')
    assert read_prompts(str(jsonl)) == ["a cat", "a dog", "a cow"]
    assert read_prompts(str(jsonl), negatives=True) == [("a cat", "blurry"), ("a dog", None), ("a cow", "")]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\n")
    assert read_prompts(str(txt), negatives=True) == [("a cat", None), ("a dog", None)]
    jsonl.write_text('{"prompt": "a cat", "negative_prompt": ["blurry"]}\n')
    expect_error("line 1: \"negative_prompt\" is not a string", read_prompts, str(jsonl), negatives=True)
    jsonl.write_text('["a list"]\n')
    expect_error("line 1 is not a JSON object", read_prompts, str(jsonl))
