"""The benchmarks (benchmarks/, run as `python -m benchmarks.X` from the repository root) at toy size: the timing
harness against what it is given, the GPU table's CPU fallback end to end (every row it would time on a CUDA
machine), and single-file loading in a fresh child process, so each command is ready to run at full size."""
import os
import subprocess
import sys

import torch

from benchmarks import harness
from conftest import ROOT


def run_benchmark(tmp_path, *argv):
    """`python -m benchmarks.ARGV...` from the repository root, its random weights under tmp_path."""
    env = dict(os.environ, NPO_BENCH_DIR=str(tmp_path / "weights" / "sd15"))
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def table_rows(text):
    return [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_harness_counts_warmup_and_repeats_and_sees_an_allocation():
    calls, held = [], []

    def fn():  # each timed call keeps 64 MiB resident, written so that the pages are really there
        calls.append(1)
        held.append(torch.ones(16 * 2**20))
    timing = harness.measure(fn, repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0 < timing.seconds and timing.mean > 0
    assert timing.extra_gib >= 3 * 0.0625 * 0.9  # three 64 MiB tensors made while timed
    assert timing.process_peak_gib >= timing.peak_gib >= timing.extra_gib


def test_gpu_command_cpu_fallback(tmp_path):
    table = tmp_path / "gpu.md"
    run_benchmark(tmp_path, "benchmarks.gpu", "--cpu", "--tiny", "--size", "8", "--repeats", "1", "--weights",
                  str(tmp_path / "weights" / "tiny"), "--out", str(table), "--sdxl", "small", "--sdxl-size", "8",
                  "--vc2", "small", "--vc2-steps", "2")
    rows = table_rows(table.read_text())
    names = [row[0].removeprefix("| ") for row in rows]
    assert names == ["UNet forward, bfloat16, ours", "UNet forward, bfloat16, diffusers",
                     "guided step, bfloat16, plain CFG", "guided step, bfloat16, NPO (η, δ unmerged)",
                     "DPO step, ours, --mixed-precision bf16", "DPO step, ours, fp32", "DPO step, diffusers recipe, fp32",
                     "SPO epoch (sampling + update), fp32", "SPO sampling alone, fp32",
                     "SDXL UNet forward, bfloat16, ours", "SDXL UNet forward, bfloat16, diffusers",
                     "SDXL guided step, bfloat16, plain CFG", "SDXL guided step, bfloat16, NPO (η, δ unmerged)",
                     "VideoCrafter2 UNet forward 2x64x64, bfloat16, ours",
                     "VideoCrafter2 UNet forward 2x64x64, bfloat16, diffusers UNet3DConditionModel",
                     "VideoCrafter2 2 DDIM steps + decode 2x64x64, bfloat16, plain CFG",
                     "VideoCrafter2 2 DDIM steps + decode 2x64x64, bfloat16, NPO (η, δ unmerged)"]
    assert all(float(row[1]) > 0 for row in rows)


def test_sdxl_command_at_toy_size(tmp_path):
    """benchmarks.sampling sdxl end to end on SDXL's layout at toy size: the UNet and text rows against diffusers /
    transformers, and the guided step of each way of running it (each a fresh process)."""
    out = run_benchmark(tmp_path, "benchmarks.sampling", "sdxl", "--preset", "small", "--size", "8", "--repeats", "1",
                        "--threads", "1")
    rows = [row for row in table_rows(out) if row[0] != "| guided step (CFG 5)"]  # the second table's header
    assert [row[0].removeprefix("| ") for row in rows] == [
        "UNet, CFG batch of 2", "both text encoders, 2 prompts", "plain CFG",
        "NPO, one copy of θ, η and δ unmerged (rank 8)", "authors' way: two merged UNets, two passes"]
    assert all(float(row[1]) > 0 for row in rows)


def test_single_file_loads_in_a_fresh_process(tmp_path, monkeypatch):
    """The singlefile benchmark's parts: a tiny SD1 folder written as an LDM single file by benchmarks/ldm.py, loaded
    in a child process (harness.run_child) and the folder in this one: the same weights, byte for byte."""
    from benchmarks import files
    monkeypatch.setattr(files, "WEIGHTS", str(tmp_path / "sd15"))
    folder = files.bench_folder(small=True)
    single = files.single_file_of(folder, ".safetensors")
    child = harness.run_child("benchmarks.files", "_load", single, threads=1)
    here = files.load_one(folder)
    assert child["weights_gib"] == here["weights_gib"] > 0 and child["seconds"] > 0


def test_video_unet_and_decode_at_toy_size(tmp_path, monkeypatch):
    """benchmarks.video: the UNet row (ours and diffusers' UNet3DConditionModel, each in its own process) end to end,
    and a chunked decode in this process, at toy size."""
    out = run_benchmark(tmp_path, "benchmarks.video", "unet", "--preset", "tiny", "--frames", "2", "--size", "8",
                        "--repeats", "1", "--threads", "1")
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["| 2 x 2 frames, latent 8x8"]
    assert all(float(v.strip(" |x")) > 0 for v in rows[0][1:7])
    from benchmarks import video
    monkeypatch.setattr(video, "WEIGHTS", str(tmp_path / "weights" / "sd15"))
    r = video.decode_one(video.vae_folder("tiny"), 3, 8, 2, 1)
    assert r["seconds"] > 0 and r["peak_gib"] > 0


def test_vader_memory_command_at_toy_size(tmp_path):
    """benchmarks.vader at toy size: a row per sampling-step count at K = 1 and the contrast row with a graph through
    every step (K = steps), each with its time and the training loop's peak memory."""
    out = run_benchmark(tmp_path, "benchmarks.vader", "--tiny", "--size", "8", "--frames", "3", "--sample-steps", "1,2",
                        "--threads", "1")
    rows = table_rows(out)
    assert [(row[0].removeprefix("| "), row[1]) for row in rows] == [("1", "1"), ("2", "1"), ("2", "2")]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and float(row[4].removesuffix(" |")) > 0 for row in rows)
