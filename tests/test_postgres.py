"""Several `evomerge search` workers on one PostgreSQL study: the budget is met exactly, and a
worker killed mid-trial has its trial failed by heartbeat and re-run by the others.

Needs a server: `export EVOMERGE_TEST_PG_URL=$(scripts/ci_postgres.sh)`; skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from _search_fakes import fake_space, kill_while_running, poll_trials, spawn_with_fakes

optuna = pytest.importorskip("optuna")
PG_URL = os.environ.get("EVOMERGE_TEST_PG_URL")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PG_URL, reason="EVOMERGE_TEST_PG_URL is unset (start one: scripts/ci_postgres.sh)"
    ),
]
TESTS = Path(__file__).resolve().parent

SPACE = fake_space()

# a worker = `evomerge search` with the fake workbench (scores a known function of the weights)
WORKER = """
import evomerge.loop.workbench as wb
from evomerge.cli import main
import evomerge.loop.run as run
wb.LiveWorkbench.from_space = classmethod(lambda cls, *a, **k: f.FakeWorkbench(sleep={sleep}))
# the fake stands in for the models and tasks, so preflight skips them as for a given workbench
run.preflight = lambda *a, _p=run.preflight, **k: _p(*a, **{{**k, "resources": False}})
sys.exit(main(["search", {space!r}, "--study", {study!r}, "--storage", {url!r},
               "--n-trials", "{n}", "--results", {results!r}, "--no-prune"]))
"""


def _spawn(tmp_path: Path, study: str, n: int, sleep: float) -> subprocess.Popen:
    code = WORKER.format(space=str(tmp_path / "space.yaml"), study=study, url=PG_URL, n=n,
                         results=str(tmp_path / "r"), sleep=sleep)  # fmt: skip
    return spawn_with_fakes(code, env={**os.environ, "PYTHONPATH": str(TESTS.parent)})


def _trials(study: str) -> list:
    return poll_trials(study, PG_URL)


def _counted(study: str) -> list:
    from evomerge.search.study import counts_toward_budget

    return [t for t in _trials(study) if counts_toward_budget(t)]


def _wait_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read().decode()[-2000:]


@pytest.fixture
def study(tmp_path: Path):
    (tmp_path / "space.yaml").write_text(SPACE)
    name = f"pg-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:
        pass


def test_four_workers_meet_the_budget_exactly(tmp_path: Path, study: str):
    procs = [_spawn(tmp_path, study, n=16, sleep=0.2) for _ in range(4)]
    _wait_all(procs)
    trials = _trials(study)
    assert len(_counted(study)) == 16
    assert not [t for t in trials if t.state.name == "RUNNING"]
    # every trial number is counted once: no worker ran a trial another had taken
    assert len({t.number for t in _counted(study)}) == 16
    baselines = {t.user_attrs.get("baseline") for t in trials} - {None}
    assert baselines == {"uniform:linear", "expert:a:linear", "expert:b:linear", "expert:c:linear"}


def test_killed_worker_trial_is_recovered_by_heartbeat(tmp_path: Path, study: str):
    victim = _spawn(tmp_path, study, n=10, sleep=30.0)  # its first trial takes 30 s
    killed = kill_while_running(victim, lambda: _trials(study))
    _wait_all([_spawn(tmp_path, study, n=10, sleep=0.1) for _ in range(3)])

    trials = _trials(study)
    assert len(_counted(study)) == 10  # the budget is met exactly, the dead trial not counted
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert trials[killed.number].state.name == "FAIL"  # failed by fail_stale_trials
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == killed.params  # re-run with the same parameters
