"""`npo.py experiment` keys every piece of work by the settings that made it: a rerun reuses what is done, a changed
setting redoes only what it affects, and an interrupted run continues from its last checkpoint."""
import glob
import os
import re

import pytest

import npo
from npo import train

QUICK = ["--seeds", "0", "--lr-sweep", "", "--pairs-per-prompt", "2", "--train-steps", "2", "--reward-steps", "1",
         "--eval-seeds", "1", "--steps", "2"]


def folders(out, name):
    """The work folders NAME-KEY (KEY: 12 hex digits)."""
    return sorted(f for f in os.listdir(out) if re.fullmatch(rf"{name}-[0-9a-f]{{12}}", f))


def test_reuse_redo_and_resume(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "results")
    # interrupted: killed after the DPO run's last checkpoint, before its result file
    finish = train.finish

    def killed(*args):
        raise SystemExit(130)
    monkeypatch.setattr(train, "finish", killed)
    with pytest.raises(SystemExit):
        npo.main(["experiment", "--out", out, *QUICK])
    monkeypatch.setattr(train, "finish", finish)
    (dpo,) = folders(out, "dpo")
    assert os.listdir(os.path.join(out, dpo, "checkpoints")) == ["step-000002"]
    assert not os.path.exists(os.path.join(out, dpo, "lora.safetensors"))
    capsys.readouterr()

    assert npo.main(["experiment", "--out", out, *QUICK]) == 0  # continues: the DPO run resumes at its last step
    assert f"resuming from {os.path.join(out, dpo, 'checkpoints', 'step-000002')}" in capsys.readouterr().err
    report = open(os.path.join(out, "results.md")).read()
    first = {name: folders(out, name) for name in ("pairs", "dpo", "npo", "npo-reward")}
    assert all(len(v) == 1 for v in first.values())

    def never(args):
        raise AssertionError("a finished training ran again")
    monkeypatch.setattr(train, "train", never)
    assert npo.main(["experiment", "--out", out, *QUICK]) == 0  # everything reused
    assert open(os.path.join(out, "results.md")).read().split("\n")[:-2] == report.split("\n")[:-2]  # all but the time

    trained = []
    monkeypatch.setattr(train, "train", lambda config: trained.append(config.out) or experiment_train(config))
    changed = [*QUICK]
    changed[changed.index("--train-steps") + 1] = "3"
    assert npo.main(["experiment", "--out", out, *changed]) == 0  # only the DPO and NPO runs depend on it
    assert sorted(os.path.basename(p).rsplit("-", 1)[0] for p in trained) == ["dpo", "npo"]
    assert folders(out, "pairs") == first["pairs"] and folders(out, "npo-reward") == first["npo-reward"]
    assert len(folders(out, "dpo")) == 2  # the earlier run is kept, not overwritten
    assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)  # every file was written atomically


experiment_train = train.train
