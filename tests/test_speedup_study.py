"""The arithmetic behind the speedup study's verdicts (bench/study_runs.py, bench/speedup_report.py): where a curve
reaches a target for good, how a sweep extends past an edge, and the speedups paired by seed with S's cost counted.

The study's runs take hours and are not repeated here; what turns their records into numbers is checked on
records written by hand, whose answers are known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from hyperclone_speedup import Size, SizeResult, TypeResult  # noqa: E402
from speedup_report import speedups, stats  # noqa: E402
from study_runs import Sweep, model_dict, tokens_to_reach  # noqa: E402


def record(loss: list[float], every: int = 100, tokens_per_step: int = 10, flops_per_token: float = 1.0,
           steps_run: int | None = None) -> dict:
    steps = [i * every for i in range(len(loss))]
    return {"steps": steps, "loss": loss, "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
            "steps_run": steps[-1] if steps_run is None else steps_run}


def test_tokens_to_reach_is_where_the_curve_stays_below() -> None:
    rec = record([4.0, 3.0, 2.0, 2.5, 1.0])
    assert tokens_to_reach(rec, 2.5) == pytest.approx(1500.0)  # halfway between steps 100 and 200
    # 2.0 is first touched at step 200, but the curve rises above it again: reached between steps 300 and 400
    assert tokens_to_reach(rec, 2.0) == pytest.approx(3000.0 + 1000.0 / 3)
    assert tokens_to_reach(rec, 4.5) == 0.0  # never above
    assert tokens_to_reach(rec, 0.5) is None  # never reached
    assert tokens_to_reach(record([1.0, 2.0, 3.0]), 2.5) is None  # ends above
    # a clone below the target at the widening that rises above it after (re-warmup) reaches it on its way down
    assert tokens_to_reach(record([3.0, 3.8, 3.2, 2.8]), 3.5) == pytest.approx(1500.0)


def test_sweep_extends_an_edge_until_the_best_is_interior() -> None:
    sweep = Sweep(make=lambda lr: lr, grid=(1.0, 2.0, 4.0, 8.0), max_extend=2)
    assert sweep.next_values() == [1.0, 2.0, 4.0, 8.0]
    sweep.records = {lr: record([5.0, 1.0 / lr]) for lr in (1.0, 2.0, 4.0, 8.0)}  # lower is better at higher lr
    assert sweep.best == 8.0 and sweep.at_edge and sweep.next_values() == [16.0]
    sweep.records[16.0] = record([5.0, 0.01])
    assert sweep.next_values() == [32.0]
    sweep.records[32.0] = record([5.0, 0.001])
    assert sweep.next_values() == []  # max_extend reached: the optimum stays at the edge, and the report says so
    assert sweep.at_edge
    sweep.records[32.0] = record([5.0, 0.5])  # had 32 been worse than 16, the best would be interior
    assert sweep.best == 16.0 and not sweep.at_edge and sweep.next_values() == []


def test_speedups_pair_seeds_and_count_the_small_models_cost() -> None:
    size = Size("d8", model_dict(8), small_iters=400, wide_iters=400)
    # random init: 4.0 -> 2.0 over 400 steps, on seeds 0 and 1
    rand = {s: record([4.0, 3.5, 3.0, 2.5, 2.0], flops_per_token=6.0) for s in (0, 1)}
    # the clone reaches random's final 2.0 at step 200 on seed 0 and at step 100 on seed 1
    clone = {0: record([3.0, 2.5, 2.0, 1.8, 1.7], flops_per_token=6.0),
             1: record([2.5, 2.0, 1.9, 1.8, 1.7], flops_per_token=6.0)}
    small = record([5.0, 4.0, 3.0, 2.6, 2.5], tokens_per_step=10, flops_per_token=2.0)  # 400 steps of S
    res = SizeResult(size, {"random": TypeResult(0.004, 20, seeds=rand), "fresh": TypeResult(0.008, 20, seeds=clone)},
                     small, None, (0, 1))
    table = speedups(res)
    base = 400 * 10  # random's tokens to its final loss
    assert table["fresh"]["as_is"][1.0] == pytest.approx([base / 2000, base / 1000])
    s_flops = 400 * 10 * 2.0
    assert table["fresh"]["with_s_flops"][1.0] == pytest.approx(
        [base * 6.0 / (2000 * 6.0 + s_flops), base * 6.0 / (1000 * 6.0 + s_flops)])
    assert table["fresh"]["with_s_tokens"][1.0] == pytest.approx([base / (2000 + 4000), base / (1000 + 4000)])
    assert table["random"]["as_is"][0.5] == [1.0, 1.0]
    # at the 25% target (random's 3.5 at step 100) the clone of seed 1 starts below it
    assert table["fresh"]["as_is"][0.25][1] == math.inf
    s = stats(table["fresh"]["as_is"][1.0])
    assert (s["mean"], s["min"], s["max"], s["n"]) == pytest.approx((3.0, 2.0, 4.0, 2))
    assert stats([None, None])["n"] == 0 and stats([2.0, math.inf])["mean"] == math.inf
