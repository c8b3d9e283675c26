"""scripts/bench_stacking.py: paired differences, the per-arm summary and the baselines it
reports, on hand-made run records (numbers computed by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_stacking as bst


def run(test: float, docs: int = 1000, wall: float = 10.0) -> dict:
    return {"test": test, "docs": docs, "wall_s": wall}


def test_paired_differences_by_hand() -> None:
    p = bst.paired([0.6, 0.5, 0.4], [0.5, 0.5, 0.5])
    assert p["diffs"] == pytest.approx([0.1, 0.0, -0.1])
    assert p["mean"] == pytest.approx(0.0)
    assert p["sd"] == pytest.approx(0.1)  # sample sd of (0.1, 0, -0.1)
    assert p["wins_ties_losses"] == (1, 1, 1)


def test_summary_pairs_seeds_every_arm_finished() -> None:
    runs = {
        "weights:0": run(0.50, 900),
        "weights:1": run(0.54, 1100),
        "weights:2": run(0.60),  # no hybrid run for seed 2: left out of both arms
        "hybrid:0": run(0.56),
        "hybrid:1": run(0.52),
        "baselines:0": {
            "base_test": 0.2,
            "baselines": {
                "uniform:task_arithmetic": 0.33,
                "expert:add:task_arithmetic": 0.43,
                "expert:cap:task_arithmetic": 0.41,
                "defaults:task_arithmetic": 0.1,
            },
        },
    }
    s = bst.summary({"runs": runs}, ["weights", "hybrid"], 3)
    assert s["seeds"] == [0, 1]
    assert s["arms"]["weights"]["mean"] == pytest.approx(0.52)
    assert s["arms"]["weights"]["docs"][0] == pytest.approx(1000)
    vs = s["arms"]["hybrid"]["vs_weights"]
    assert vs["diffs"] == pytest.approx([0.06, -0.02]) and vs["wins_ties_losses"] == (1, 0, 1)
    assert s["ratio"] == pytest.approx(0.54 / 0.52)
    assert s["baselines"] == {
        "base": 0.2,
        "uniform merge": 0.33,
        "best single expert (expert:add:task_arithmetic)": 0.43,
    }
    text = bst.report({"runs": runs}, s, ["weights", "hybrid"])
    assert "| mean ± sd | 52.0 ± 2.8 | 54.0 ± 2.8 |" in text
    assert "hybrid - weights: +2.0 ± 5.7 (1/0/1)" in text
    assert "ratio hybrid / weights (mean test objective): 1.038" in text
