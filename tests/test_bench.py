"""bench.py gpu, the GPU table's command, runs its CPU fallback end to end (tiny random weights): every row it would
time on a CUDA machine is computed, so the command is ready when a GPU is."""
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_command_cpu_fallback(tmp_path):
    table = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "gpu", "--cpu", "--tiny", "--size", "8",
                        "--repeats", "1", "--weights", str(tmp_path / "weights"), "--out", str(table), "--sdxl", "small",
                        "--sdxl-size", "8"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names == ["UNet forward, bfloat16, ours", "UNet forward, bfloat16, diffusers",
                     "guided step, bfloat16, plain CFG", "guided step, bfloat16, NPO (η, δ unmerged)",
                     "DPO step, ours, --mixed-precision bf16", "DPO step, ours, fp32", "DPO step, diffusers recipe, fp32",
                     "SDXL UNet forward, bfloat16, ours", "SDXL UNet forward, bfloat16, diffusers",
                     "SDXL guided step, bfloat16, plain CFG", "SDXL guided step, bfloat16, NPO (η, δ unmerged)"]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)
