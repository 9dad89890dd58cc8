"""A non-editable install: the wheel holds every module and the embedded model, and `npo sample` works from any
folder with the model that came in the wheel (not the source tree's)."""
import glob
import os
import shutil
import subprocess
import sys

import torch

from conftest import ROOT


def test_wheel_installs_and_samples_from_another_folder(tmp_path):
    source = tmp_path / "source"  # a copy, so the build's own files (build/, *.egg-info) stay out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out", "results"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = glob.glob(str(tmp_path / "dist" / "npo-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # torch and the other dependencies come from this environment (a path line: its .pth files, such as an editable
    # install of npo, are not run); npo itself only from the wheel
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True,
                   capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(venv / "bin" / "npo"), "sample", "--steps", "2", "--out", "out"], cwd=elsewhere,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(elsewhere / "out") == ["00000-seed0.png"]
    where = subprocess.run([python, "-c", "import pipeline; print(pipeline.DEFAULT_MODEL)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == os.path.join(site, "weights") and os.path.isfile(os.path.join(where, "unet", "config.json"))
