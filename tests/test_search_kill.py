"""`evomerge search` (the real CLI, real tiny models, a real multiple-choice task) SIGKILLed at
seeded random moments three times, then resumed to completion, evaluates exactly the candidates of
an uninterrupted run with the same seed: the budget is met exactly, no completed trial is lost or
changed, no candidate is evaluated twice, and the best trial (parameters and score) is the same.

The sampler is qmc: its n-th proposal is a function of the seed and n, and n is stored on the
trial before its parameters (search/qmc.py), so an uninterrupted run is a reference for the
resumed one wherever a kill lands, between a draw and its storage included (that point, and the
others of a trial, are killed at on purpose in tests/test_search_resume.py). (TPE and the others
are reseeded on resume so as not to replay their start-up draws; their runs differ from an
uninterrupted one.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _search_fakes import poll_trials
from test_eval_support import build_tiny_model, mc_records, write_task

N_TRIALS = 12


def _space(tmp_path: Path) -> Path:
    models = [build_tiny_model(tmp_path / n, seed=s) for s, n in enumerate(["b", "e1", "e2"])]
    task = write_task(tmp_path / "tasks", "kc", "mc", mc_records(150))  # kills land mid-trial
    space = tmp_path / "kc.yaml"
    space.write_text(f"""
name: kc
base_model: {models[0]}
models: [{models[1]}, {models[2]}]
method: task_arithmetic
parameters: {{weight: {{low: 0.0, high: 1.0}}}}
tasks: [{task}]
eval: {{device: cpu}}
search: {{n_trials: {N_TRIALS}, seed: 5, sampler: qmc, heartbeat: 1, grace_period: 2}}
baselines: []
""")
    return space


def _spawn(space: Path, results: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evomerge", "search", str(space), "--results", str(results),
           "--no-prune", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _trials(results: Path) -> list:
    db = results / "kc" / "study.db"
    return poll_trials("kc", f"sqlite:///{db}") if db.exists() else []


def _complete(results: Path) -> dict[int, tuple[tuple, float]]:
    return {t.number: (tuple(sorted(t.params.items())), t.value)
            for t in _trials(results) if t.state.name == "COMPLETE"}  # fmt: skip


@pytest.mark.slow  # five `evomerge search` processes, three killed (~1-2 min on a loaded machine)
def test_search_cli_killed_three_times_matches_an_uninterrupted_run(tmp_path: Path):
    pytest.importorskip("optuna")
    from evomerge.search.qmc import qmc_index

    space = _space(tmp_path)
    ref = _spawn(space, tmp_path / "ref")  # the uninterrupted run
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    expected = list(_complete(tmp_path / "ref").values())
    assert len(expected) == N_TRIALS

    results, rng, seen = tmp_path / "r", random.Random(22), {}
    for kill in range(3):
        proc = _spawn(space, results)
        target = len(seen) + 1  # some progress each time, then a random moment
        deadline = time.time() + 240
        while len(_complete(results)) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, f"finished before kill {kill}: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        now = _complete(results)
        assert all(now.get(n) == v for n, v in seen.items()), kill  # nothing lost or changed
        seen = now
    assert len(seen) < N_TRIALS  # the kills did interrupt the search
    final = _spawn(space, results)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]

    trials = _trials(results)
    done = _complete(results)
    assert all(done[n] == v for n, v in seen.items())
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len(done) == N_TRIALS  # the budget, exactly
    params = [p for p, _ in done.values()]
    assert len(set(params)) == len(params)  # no candidate evaluated twice
    # a kill mid-trial fails that trial (heartbeat); once it drew its point of the sequence, its
    # retry evaluates that point (a trial killed before its draw has none, and nothing to re-run)
    index = {qmc_index(t): t for t in trials if t.state.name == "COMPLETE"}
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert 1 <= len(failed) <= 3, [t.params for t in failed]
    for t in failed:
        if qmc_index(t) is None:
            assert not t.params
        else:  # whole or part of the dead trial's point is what its retry evaluated
            assert t.params.items() <= index[qmc_index(t)].params.items()
    # exactly the uninterrupted run's candidates, with the same scores, and the same best
    assert sorted(done.values()) == sorted(expected)
    best = max(v for _, v in expected)
    assert {p for p, v in done.values() if v == best} == {p for p, v in expected if v == best}
