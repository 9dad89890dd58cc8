"""Sampling and scoring under torchrun: N gloo processes on the CPU write the very files one process writes (names
and bytes), with nothing lost or written twice; and torchrun's own parser leaves npo.py's flags alone."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.run import get_args_parser

from npo import distributed
from npo import evaluate
import npo
from npo.checkpoint import UserError
from conftest import ROOT

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def torchrun(ranks, *argv):
    """npo.py ARGV on `ranks` gloo processes, one thread each, as a user runs it (with -- before the script)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "--",
               os.path.join(ROOT, "npo.py"), *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def one_process(*argv):
    """npo.main(ARGV) in this process, on one thread as each torchrun rank runs (a matmul's rounding may depend on
    how many threads split it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert npo.main(list(argv)) == 0
    finally:
        torch.set_num_threads(threads)


def folder_bytes(folder):
    """{file name: bytes} of a folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def earlier_run(folder):
    """A folder that already holds an earlier run's picture number 6, so that both runs must number on from 7."""
    os.makedirs(folder)
    with open(os.path.join(folder, "00006-seed99.png"), "wb") as f:
        f.write(b"an earlier picture")
    return str(folder)


def test_two_ranks_sample_and_score_the_files_of_one_process(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # 9 images in batches of 3: batches 0 and 2 to rank 0, 1 to rank 1. An image's last bits depend on the size of
    # its batch (the shapes of the matmuls), so cutting each rank's share of the jobs into batches anew would not do
    flags = ["sample", "--prompts-file", str(prompts), "--steps", "3", "--batch-size", "3", "--seed", "10"]
    one, two = earlier_run(tmp_path / "one"), earlier_run(tmp_path / "two")
    one_process(*flags, "--n", "3", "--out", one)
    torchrun(2, *flags, "--n", "3", "--out", two)
    expected = folder_bytes(one)
    assert sorted(expected) == ["00006-seed99.png"] + [f"{7 + i:05d}-seed{10 + i}.png" for i in range(9)]
    assert folder_bytes(two) == expected

    # a second folder of the same prompts and seeds at another guidance, to pair against; scored in batches of 2
    other = str(tmp_path / "other")
    one_process(*flags, "--n", "3", "--guidance", "3", "--out", other)
    for folder in (one, two):
        os.remove(os.path.join(folder, "00006-seed99.png"))  # not a sample: evaluate would refuse it
    score = ["evaluate", one, other, "--scorer", "rewards:brightness", "--batch-size", "2"]
    one_process(*score, "--out", str(tmp_path / "report1"))
    torchrun(2, *score, "--out", str(tmp_path / "report2"))
    report = folder_bytes(tmp_path / "report1")
    assert sorted(report) == ["results.json", "results.md"] and folder_bytes(tmp_path / "report2") == report
    assert json.loads(report["results.json"])["pairs"] == 9


def test_rank_shares_of_scores_gather_into_the_one_process_order(tmp_path, monkeypatch):
    """Each rank scores every other batch, cut as one process cuts them; gathered, they are one process's scores in
    its order (here with a reward that gives image i the score i, so any lost, doubled or moved score shows)."""
    paths = [str(tmp_path / f"{i}.png") for i in range(7)]
    index = {p: float(i) for i, p in enumerate(paths)}
    monkeypatch.setattr(evaluate, "read_rgb", lambda path: path)

    def reward(batch, texts):  # "pixels" are the paths here; a batch of 3 would see 3 of them
        return torch.tensor([index[p] for p in batch])
    reward.score_pil = reward
    progress = evaluate.Progress(len(paths), show=False)
    shares = [evaluate.score_images(reward, paths, ["p"] * 7, 3, "cpu", progress, "spec", rank, 2) for rank in (0, 1)]
    assert sorted(shares[0]) == [0, 2] and sorted(shares[1]) == [1]  # batches [0:3], [3:6], [6:7]
    monkeypatch.setattr(distributed, "gather", lambda mine: [{"f": shares[0]}, {"f": shares[1]}])
    torch.testing.assert_close(evaluate.gather_scores({"f": shares[0]})["f"], torch.arange(7.0, dtype=torch.float64))


def sample_and_evaluate_flags():
    """(subcommand, flag) for every long flag of npo.py's subcommands."""
    sub = next(a for a in npo.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, flag) for name, p in sub.choices.items() for a in p._actions for flag in a.option_strings
            if flag.startswith("--")]


def test_torchrun_leaves_npo_flags_to_npo(capsys):
    """The --n trap: torchrun's parser takes an abbreviation of its own flags wherever it stands, and --n could be
    --nnodes or --nproc-per-node, so `torchrun ... npo.py sample --n 4` stops in torchrun. Every other flag passes
    through untouched; --n passes after `--` (the README's command line), and --images-per-prompt needs no `--`."""
    parser = get_args_parser()
    trapped = []
    for name, flag in sample_and_evaluate_flags():
        try:
            parsed = parser.parse_args(["--nproc-per-node", "2", "npo.py", name, flag, "4"])
            assert parsed.training_script_args == [name, flag, "4"]
        except SystemExit:
            trapped.append(flag)
        parsed = parser.parse_args(["--nproc-per-node", "2", "--", "npo.py", name, flag, "4"])
        assert parsed.training_script == "npo.py" and parsed.training_script_args == [name, flag, "4"]
    capsys.readouterr()
    assert trapped == ["--n"]
    args = npo.build_parser().parse_args(["sample", "--images-per-prompt", "4"])
    assert args.n == 4


def test_grids_refuse_torchrun_before_anything_runs(tiny_model, offsets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, _ = tiny_model
    out = tmp_path / "grid"
    for grid in (["--compare"], ["--sweep-beta", "0,1"]):
        assert npo.main(["sample", "--model", model, "--npo", offsets["delta"], *grid, "--out", str(out)]) == 2
        assert "without torchrun" in capsys.readouterr().err and not out.exists()


def test_more_ranks_than_gpus_is_one_sentence(monkeypatch):
    """Rank r runs on cuda:LOCAL_RANK: a rank beyond the machine's GPUs is refused before it joins the group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="has 1 CUDA device, one per rank; pass --nproc-per-node 1 or fewer"):
        with distributed.processes("cuda"):
            pass
    assert not distributed.joined()
