"""A non-editable install: the wheel holds one import package, `npo` (every module and the embedded model), plus the
`npo` command, and nothing else. Installed into an environment that already has modules named `clip` and `evaluate`
(OpenAI's CLIP in A1111 environments, Hugging Face's evaluate), both still import their own, and `npo sample` works
from any folder with the model that came in the wheel (not the source tree's)."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import torch

from conftest import ROOT


def build_wheel(tmp_path):
    source = tmp_path / "source"  # a copy, so the build's own files (build/, *.egg-info) stay out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out", "results"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                        str(source)], check=True, capture_output=True, text=True)
    # every folder the wheel takes files from is a listed package (setuptools warns of one that is not)
    assert "is absent from the `packages` configuration" not in r.stdout + r.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "npo-*.whl"))
    return wheel


def venv_with_others(tmp_path):
    """A fresh venv whose site-packages already holds a `clip` and an `evaluate` of other projects."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # torch and the other dependencies come from this environment (a path line: its .pth files, such as an editable
    # install of npo, are not run); npo itself only from the wheel
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    for name in ("clip", "evaluate"):
        with open(os.path.join(site, f"{name}.py"), "w") as f:
            f.write(f"OWNER = 'another project ({name})'\n")
    return venv, python, site


def test_the_wheel_holds_one_package(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        assert z.read("npo-0.1.0.dist-info/top_level.txt").decode().split() == ["npo"]
        assert "npo/weights/unet/diffusion_pytorch_model.safetensors" in z.namelist()
        for name in ("npo_model.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "scheduler/scheduler_config.json"):  # the embedded video model, whose other parts are weights/'s
            assert f"npo/weights/video/{name}" in z.namelist()
        assert "[console_scripts]\nnpo = npo.npo:main" in z.read("npo-0.1.0.dist-info/entry_points.txt").decode()
    assert tops == {"npo", "npo-0.1.0.dist-info"}


def test_wheel_installs_beside_clip_and_evaluate_and_samples_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    venv, python, site = venv_with_others(tmp_path)
    before = set(os.listdir(site))
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python, "install",
                    "--no-deps", "--no-index", wheel], check=True, capture_output=True)
    assert set(os.listdir(site)) - before == {"npo", "npo-0.1.0.dist-info"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(venv / "bin" / "npo"), "sample", "--prompt", "a red circle", "--steps", "2", "--out",
                        "out"], cwd=elsewhere, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(elsewhere / "out") == ["00000-seed0.png"]
    check = ("import clip, evaluate; from npo import npo as cli, pipeline; import clip as c2, evaluate as e2; "
             "print(clip.OWNER, evaluate.OWNER, c2 is clip, e2 is evaluate, pipeline.DEFAULT_MODEL, sep='|')")
    out = subprocess.run([python, "-c", check], cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    clip_owner, evaluate_owner, same_clip, same_evaluate, where = out.strip().split("|")
    assert (clip_owner, evaluate_owner) == ("another project (clip)", "another project (evaluate)")
    assert same_clip == same_evaluate == "True"  # importing all of npo (its CLI imports every module) replaced neither
    assert where == os.path.join(site, "npo", "weights") and os.path.isfile(os.path.join(where, "unet", "config.json"))
