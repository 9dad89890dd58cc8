"""The paper's table 4 (NPO across training length): every checkpoint a training run saves samples as it is, with
its LoRA file (OUT/checkpoints/step-XXXXXX/lora.safetensors) or its folder given to --npo / --lora."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from npo import checkpoint
import npo
from npo import sample
from npo import runs
from conftest import write_random_pairs

TRAIN = ["--resolution", "16", "--log-every", "1", "--lr", "1e-2", "--device", "cpu", "--npo"]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A 3-step NPO run with a checkpoint every step (all kept), and a 1-step run of the same settings."""
    root = tmp_path_factory.mktemp("table4")
    pairs = write_random_pairs(root, 4, seed=0)
    runs_ = {}
    for steps in (3, 1):
        out = str(root / f"run{steps}")
        assert npo.main(["train", "--model", tiny_model[0], "--data", pairs, "--out", out, *TRAIN, "--steps", str(steps),
                         "--checkpoint-every", "1", "--keep-checkpoints", "0"]) == 0
        runs_[steps] = out
    return runs_


def sampled(tiny_model, out, *flags):
    assert npo.main(["sample", "--model", tiny_model[0], "--seed", "2", "--steps", "3", "--height", "16", "--width",
                     "16", "--out", str(out), *flags]) == 0
    return Image.open(out)


def test_checkpoints_sample_as_the_loras_they_hold(tiny_model, trained, tmp_path):
    """The last checkpoint samples as the run's final lora.safetensors; the first as the result of a 1-step run (the
    same weights, trained another time), given as its file or as its folder."""
    folders = runs.list_checkpoints(os.path.join(trained[3], "checkpoints"))
    assert [os.path.basename(f) for f in folders] == ["step-000001", "step-000002", "step-000003"]
    last = sampled(tiny_model, tmp_path / "last.png", "--npo", os.path.join(folders[-1], "lora.safetensors"))
    final = sampled(tiny_model, tmp_path / "final.png", "--npo", os.path.join(trained[3], "lora.safetensors"))
    assert np.array_equal(np.asarray(last), np.asarray(final))
    first = sampled(tiny_model, tmp_path / "first.png", "--npo", folders[0])  # the folder itself
    one_step = sampled(tiny_model, tmp_path / "one.png", "--npo", trained[1])  # a run's folder: its lora.safetensors
    assert np.array_equal(np.asarray(first), np.asarray(one_step))
    assert not np.array_equal(np.asarray(first), np.asarray(last))  # training moved δ: the checkpoints differ
    for k, folder in enumerate(folders, 1):
        meta = checkpoint.read_safetensors_metadata(os.path.join(folder, "lora.safetensors"))
        assert meta["npo_role"] == "delta" and meta["npo_steps"] == str(k)
    # the PNG says which checkpoint made it
    assert "NPO: step-000001/lora.safetensors," in first.text["parameters"]
    assert "NPO: lora.safetensors," in one_step.text["parameters"]


def test_joint_checkpoint_folder(tiny_model, trained, tmp_path):
    """A --joint run's folder holds eta.safetensors and delta.safetensors: --lora takes η's, --npo δ's."""
    folder = tmp_path / "step-000007"
    folder.mkdir()
    source = os.path.join(trained[1], "lora.safetensors")
    shutil.copy(source, folder / "delta.safetensors")
    shutil.copy(source, folder / "eta.safetensors")
    args = npo.build_parser().parse_args(["sample", "--lora", f"{folder}:0.5", "--npo", str(folder)])
    sample.check_sample_arguments(args)
    assert args.lora == [(os.path.join(folder, "eta.safetensors"), 0.5)]
    assert args.npo == os.path.join(folder, "delta.safetensors")


def test_folder_without_a_lora(tiny_model, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert npo.main(["sample", "--model", tiny_model[0], "--npo", str(tmp_path / "empty"), "--steps", "1",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder without delta.safetensors or lora.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
