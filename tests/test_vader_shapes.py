"""benchmarks/vader_shapes.py's table on made-up scores: each NPO row's paired difference from VADER per training
seed, and across the seeds (the seeds' mean differences ± their standard error), against the formulas."""
import math

from benchmarks import vader_shapes


def test_table_pairs_videos_and_summarises_across_seeds():
    shifts = {0: 0.1, 1: 0.3, 2: 0.2}  # VADER + NPO = VADER + shift on every video of the seed, for every judge
    results = {}
    for seed, shift in shifts.items():
        vader = [0.1 * k + seed for k in range(4)]
        for row in vader_shapes.rows([1.0]):
            offset = shift if row == "VADER + NPO" else 0.0
            results[(row, seed)] = {j: [v + offset for v in vader] for j in vader_shapes.JUDGES}
    lines = vader_shapes.table(results, list(shifts), [1.0]).splitlines()
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in lines}
    for seed, shift in shifts.items():  # a constant shift: its paired differences have no spread
        assert all(c.strip(" |") == f"+{shift:.3f} ± 0.000" for c in cells[f"VADER + NPO, seed {seed}"])
        assert all(c.strip(" |") == "+0.000 ± 0.000" for c in cells[f"VADER + NPO (1 − R), seed {seed}"])
    se = math.sqrt(sum((s - 0.2) ** 2 for s in shifts.values()) / 2 / 3)  # sample sd / √n over the three seeds
    assert all(c.strip(" |") == f"+0.200 ± {se:.3f}" for c in cells["VADER + NPO, 3 seeds"])
    assert len(cells["VADER + NPO, 3 seeds"]) == len(vader_shapes.JUDGES)
