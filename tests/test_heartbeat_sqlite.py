"""Heartbeat recovery on the default storage (SQLite, an Optuna RDBStorage): a worker killed
mid-trial has its trial failed as stale and re-run with the same parameters by the next
`evomerge search`, and the budget is met exactly. test_postgres.py checks the same on a server.

Journal storage (`--storage journal`) is not tested here because it cannot recover this way:
Optuna's JournalStorage does not implement heartbeats (it is no BaseHeartbeat, checked below,
so this file says when that changes); storage_url's docstring says so to users.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from _search_fakes import fake_space, kill_while_running, poll_trials, spawn_with_fakes

optuna = pytest.importorskip("optuna")
TESTS = Path(__file__).resolve().parent

# a worker = `evomerge search` with the fake workbench (scores a known function of the weights)
WORKER = """
import evomerge.loop.workbench as wb
from evomerge.cli import main
import evomerge.loop.run as run
wb.LiveWorkbench.from_space = classmethod(lambda cls, *a, **k: f.FakeWorkbench(sleep={sleep}))
# the fake stands in for the models and tasks, so preflight skips them as for a given workbench
run.preflight = lambda *a, _p=run.preflight, **k: _p(*a, **{{**k, "resources": False}})
sys.exit(main(["search", {space!r}, "--n-trials", "{n}", "--results", {results!r},
               "--no-prune"]))
"""


def _spawn(tmp_path: Path, n: int, sleep: float) -> subprocess.Popen:
    code = WORKER.format(space=str(tmp_path / "space.yaml"), n=n, results=str(tmp_path / "r"),
                         sleep=sleep)  # fmt: skip
    return spawn_with_fakes(code, env={**os.environ, "PYTHONPATH": str(TESTS.parent)})


def _trials(tmp_path: Path) -> list:
    db = tmp_path / "r" / "space" / "study.db"
    return poll_trials("space", f"sqlite:///{db}") if db.exists() else []


def test_journal_storage_has_no_heartbeat():
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    assert issubclass(RDBStorage, BaseHeartbeat)  # SQLite: recovery tested below
    assert not issubclass(JournalStorage, BaseHeartbeat)  # if this fails, test journal too


@pytest.mark.slow  # a 1 s heartbeat, a 2 s grace period and two subprocesses (~20 s)
def test_killed_sqlite_worker_trial_is_recovered_by_heartbeat(tmp_path: Path):
    from evomerge.search.study import counts_toward_budget

    (tmp_path / "space.yaml").write_text(fake_space())  # heartbeat 1 s, grace period 2 s
    victim = _spawn(tmp_path, n=8, sleep=30.0)  # its first trial takes 30 s
    killed = kill_while_running(victim, lambda: _trials(tmp_path))
    time.sleep(2.5)  # past the grace period: the trial is stale
    worker = _spawn(tmp_path, n=8, sleep=0.05)
    assert worker.wait(timeout=240) == 0, worker.stderr.read().decode()[-2000:]

    trials = _trials(tmp_path)
    assert len([t for t in trials if counts_toward_budget(t)]) == 8  # the dead one not counted
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert trials[killed.number].state.name == "FAIL"  # failed by fail_stale_trials
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == killed.params  # re-run with the same parameters
