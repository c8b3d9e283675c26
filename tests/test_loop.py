"""The ask -> merge -> eval -> tell loop on a fake workbench (scores are a known function of the
weights), resume after SIGKILL, two workers on one budget, Ctrl-C, failed candidates, status."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy.exc
from _search_fakes import FakeWorkbench, ensure_methods, fake_space, spawn_with_fakes

from evomerge.cli import main
from evomerge.errors import CandidateError
from evomerge.loop.run import run_search
from evomerge.search.results import load_study_outcome

optuna = pytest.importorskip("optuna")
ensure_methods()
TESTS = Path(__file__).resolve().parent

SPACE = fake_space("{n_trials: 20, seed: 0, heartbeat: 1, grace_period: 2}")


def write_space(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE + extra)
    return path


def counted(study) -> list:
    from evomerge.search.study import counts_toward_budget

    return [t for t in study.get_trials() if counts_toward_budget(t)]


def test_search_finds_better_than_uniform(tmp_path: Path, capsys):
    space = write_space(tmp_path)
    out = run_search(space, results=tmp_path / "r", workbench=FakeWorkbench(), quiet=True)
    study = out.study
    assert len(counted(study)) == 20
    uniform = next(t for t in study.trials if t.user_attrs.get("baseline") == "uniform:linear")
    assert uniform.state.name == "COMPLETE"
    # hand-computed: w = 1/3 each, target (0.6, 0.3, 0.1): mean of 1 - (w - t)^2, less the
    # mean per-example offset 0.01 * mean(d % 5 for d < 40) = 0.02
    expect = 1 - ((1 / 3 - 0.6) ** 2 + (1 / 3 - 0.3) ** 2 + (1 / 3 - 0.1) ** 2) / 3 - 0.02
    assert uniform.value == pytest.approx(expect)
    assert out.best_trial.value > uniform.value + 0.02
    w = [m.parameters["weight"] for m in out.best_recipe.final.models]
    assert sum(w) == pytest.approx(1.0) and w[0] > w[2]
    # held-out re-scoring is stored on the study; the best is the best held-out trial
    assert {t.number for t in out.top_trials[:5]} <= set(out.heldout)
    assert uniform.number in out.heldout and out.best_trial.number in out.heldout
    csv = (tmp_path / "r" / "space" / "trials.csv").read_text().splitlines()
    assert len(csv) == 1 + len(study.trials) and "proxy_task0" in csv[0]
    assert "heldout_task0" in csv[0]
    # `evomerge status` prints the leaderboard from storage alone
    assert main(["status", str(tmp_path / "r" / "space")]) == 0
    text = capsys.readouterr().out
    assert f"held-out test of the pick: trial {out.best_trial.number}" in text
    assert "chosen on the held-out selection part" in text
    assert "Spearman, top trials" in text and "Spearman, seeded sample of all COMPLETE" in text


def test_resume_counts_completed_trials(tmp_path: Path):
    space = write_space(tmp_path)
    kw = dict(results=tmp_path / "r", quiet=True, prune=False)
    run_search(space, n_trials=6, workbench=FakeWorkbench(), **kw)
    first = {t.number: t.params for t in load_study_outcome(tmp_path / "r" / "space").study.trials}
    out = run_search(space, n_trials=9, workbench=FakeWorkbench(), **kw)
    trials = out.study.trials
    assert len(counted(out.study)) == 9 and len(trials) == 9
    assert all(trials[n].params == p for n, p in first.items())  # nothing lost or re-run


def test_failed_candidates_and_constraint(tmp_path: Path):
    class Flaky(FakeWorkbench):
        def evaluate(self, recipe, split="search", on_chunk=None):
            if recipe is not None and recipe.final.models[2].parameters["weight"] > 0.5:
                raise CandidateError("NaN logits")
            return super().evaluate(recipe, split, on_chunk)

    space = write_space(tmp_path, "constraint: {max_drop: 10}\nbase_model: m/base\n")
    out = run_search(space, n_trials=12, results=tmp_path / "r", workbench=Flaky(), quiet=True,
                     prune=False)  # fmt: skip
    fails = [t for t in out.study.trials if t.state.name == "FAIL"]
    assert fails and all(t.user_attrs["fail_reason"] == "NaN logits" for t in fails)
    assert len(counted(out.study)) == 12  # a failed candidate spends budget
    assert out.base["search"] == pytest.approx({"task0": 0.48, "task1": 0.48, "task2": 0.48})
    for t in out.study.trials:
        if t.state.name == "COMPLETE":  # base scores 0.48 everywhere: drop = 100 * (0.48 - m)
            drop = max(100 * (0.48 - t.user_attrs[f"proxy_task{k}"]) for k in range(3))
            assert t.user_attrs["violation"] == pytest.approx(drop - 10)


def test_trial_declared_dead_by_another_worker_is_dropped_and_rerun(tmp_path: Path, capsys):
    """A worker stalled past the grace period finds its trial failed and re-queued by another
    worker: it drops that result and goes on (it used to exit with UpdateFinishedTrialError)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'r' / 'space' / 'study.db'}"

    class Stalled(FakeWorkbench):
        def evaluate(self, recipe, split="search", on_chunk=None):
            if recipe is not None and len(self.merged) == 4:  # what fail_stale_trials does
                other = optuna.load_study(study_name="space", storage=url)
                (t,) = other.get_trials(states=(TrialState.RUNNING,))
                other._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
                retry(other, other._storage.get_trial(t._trial_id))
                self.dead = t
            return super().evaluate(recipe, split, on_chunk)

    wb = Stalled()
    out = run_search(write_space(tmp_path), n_trials=8, results=tmp_path / "r", workbench=wb,
                     quiet=True, prune=False)  # fmt: skip
    assert f"trial {wb.dead.number} of study 'space' was declared dead" in capsys.readouterr().err
    trials = out.study.trials
    assert len(counted(out.study)) == 8
    assert trials[wb.dead.number].state.name == "FAIL"
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == wb.dead.number]
    assert len(rerun) == 1 and rerun[0].state.name == "COMPLETE"
    assert rerun[0].params == wb.dead.params


def test_ctrl_c_leaves_no_running_trial(tmp_path: Path):
    class Interrupt(FakeWorkbench):
        def evaluate(self, recipe, split="search", on_chunk=None):
            if recipe is not None and len(self.merged) >= 3:
                raise KeyboardInterrupt
            return super().evaluate(recipe, split, on_chunk)

    space = write_space(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_search(space, results=tmp_path / "r", workbench=Interrupt(), quiet=True)
    study = load_study_outcome(tmp_path / "r" / "space").study
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states[-1] == "FAIL"
    assert study.trials[-1].user_attrs["fail_kind"] == "interrupted"
    assert len(counted(study)) == len(states) - 1  # the interrupted trial is not counted


def test_multi_objective_pareto(tmp_path: Path):
    space = write_space(tmp_path, "objectives: [task0, task2]\n")
    out = run_search(space, n_trials=10, sampler="nsga2", results=tmp_path / "r",
                     workbench=FakeWorkbench(), quiet=True)  # fmt: skip
    assert out.directions == ["maximize", "maximize"] and out.pareto
    vals = [t.values for t in out.pareto]
    for a in vals:  # nobody on the front is dominated by another front member
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in vals)


RUNNER = """
from evomerge.loop.run import run_search
run_search({space!r}, n_trials={n}, results={results!r}, workbench=f.FakeWorkbench(sleep={sleep}),
           quiet=True, prune=False)
"""


def _spawn(tmp_path: Path, n: int, sleep: float) -> subprocess.Popen:
    return spawn_with_fakes(RUNNER.format(space=str(tmp_path / "space.yaml"), n=n,
                                          results=str(tmp_path / "r"), sleep=sleep))  # fmt: skip


def _complete(tmp_path: Path) -> list:
    db = tmp_path / "r" / "space" / "study.db"
    if not db.exists():
        return []
    try:
        study = optuna.load_study(study_name="space", storage=f"sqlite:///{db}")
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return []  # the worker is still creating the schema (both sides race to create it)
    return [t for t in study.get_trials() if t.state.name == "COMPLETE"]


@pytest.mark.slow  # two subprocesses (~10 s idle, ~30 s on a loaded machine)
def test_resume_after_sigkill(tmp_path: Path):
    write_space(tmp_path)
    proc = _spawn(tmp_path, n=8, sleep=0.4)
    deadline = time.time() + 180  # slow under a loaded CI machine
    while len(_complete(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # most likely in the middle of a trial now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in _complete(tmp_path)}
    assert len(before) >= 3, proc.stderr.read().decode()[-2000:]
    rerun = _spawn(tmp_path, n=8, sleep=0.0)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-2000:]
    after = _complete(tmp_path)
    assert len(after) == 8  # the budget is met exactly
    by_number = {t.number: t.params for t in after}
    assert all(by_number[n] == p for n, p in before.items())  # no completed trial lost
    keys = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(keys)) == len(keys)  # none run twice


@pytest.mark.slow  # two worker subprocesses
def test_two_workers_meet_the_budget_exactly(tmp_path: Path):
    write_space(tmp_path)
    # create the study first so both workers join it (they would also race safely)
    run_search(tmp_path / "space.yaml", n_trials=1, results=tmp_path / "r",
               workbench=FakeWorkbench(), quiet=True, prune=False)  # fmt: skip
    procs = [_spawn(tmp_path, n=12, sleep=0.1) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    study = optuna.load_study(
        study_name="space", storage=f"sqlite:///{tmp_path / 'r' / 'space' / 'study.db'}"
    )
    assert len(counted(study)) == 12
    assert not [t for t in study.get_trials() if t.state.name == "RUNNING"]


def test_cli_bad_space_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.replace("simplex: true", "simplex: true, low: 2, high: 1"))
    assert main(["search", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "low <= high must hold" in err
    assert main(["search", str(tmp_path / "missing.yaml")]) == 2
    assert main(["status", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow  # real lm-eval task + HF backend + CandidateMerger (~1 min on 2 busy cores)
def test_real_end_to_end_on_tiny_models(tmp_path: Path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    paths = [tiny_model(n, seed=i, num_layers=2) for i, n in enumerate(["base", "a", "b"])]
    evals = TESTS.parent / "evals" / "zoo_add.yaml"
    space = tmp_path / "space.yaml"
    space.write_text(f"""
base_model: {paths[0]}
models: [{paths[1]}, {paths[2]}]
method: task_arithmetic
parameters:
  weight: {{simplex: true}}
  lambda: {{low: 0.5, high: 1.5}}
tasks: [{evals}]
eval: {{chunks: [8, null], device: cpu, heldout_top_k: 2}}
search: {{n_trials: 4, seed: 0}}
""")
    out = run_search(space, results=tmp_path / "r", quiet=True)
    assert len(counted(out.study)) == 4
    assert [t.user_attrs.get("baseline") for t in out.study.trials[:3]] == [
        "uniform:task_arithmetic",
        "expert:a:task_arithmetic",
        "expert:b:task_arithmetic",
    ]
    # random tiny models cannot add: every score is a real 0.0 from the task's exact_match
    assert all(t.user_attrs["proxy_zoo_add"] == 0.0 for t in out.study.trials)
    assert out.best_trial.number in out.heldout and "search" in out.base
    recipe = out.best_recipe.final
    assert sum(m.parameters["weight"] for m in recipe.models) == pytest.approx(1.0)


def test_pruned_trials_tell_the_sampler_their_estimate(tmp_path: Path):
    """A trial the pruner stops is COMPLETE in Optuna with the estimate from the documents it
    scored (so GP and CMA-ES learn from it), shows as PRUNED, and never ranks or exports."""
    from evomerge.search.results import ranked
    from evomerge.search.study import trial_state

    space = write_space(tmp_path)
    wb = FakeWorkbench()
    out = run_search(space, n_trials=24, sampler="gp", results=tmp_path / "r", workbench=wb,
                     quiet=True)  # fmt: skip
    stopped = [t for t in out.study.trials if trial_state(t) == "PRUNED"]
    assert stopped, "the median pruner stopped no trial"
    for t in stopped:
        assert t.state.name == "COMPLETE" and t.user_attrs["docs_scored"] == 30  # 3 tasks x 10
        w = [m.parameters["weight"] for m in out.space.decode(t.params).final.models]
        # hand-computed estimate: mean over tasks of 1 - (w_k - t_k)^2 - 0.01 * mean(d % 5)
        # over the first 10 documents (offsets 0..4 twice: mean 0.02)
        expect = (
            sum(1 - (wk - tk) ** 2 - 0.02 for wk, tk in zip(w, (0.6, 0.3, 0.1), strict=True)) / 3
        )
        assert t.value == pytest.approx(expect)
        # held-out re-scoring: never for a pruned candidate, always for a pruned baseline
        assert (t.number in out.heldout) == bool(t.user_attrs.get("baseline"))
    assert stopped[0].number not in {t.number for t in ranked(out.study)}
    assert trial_state(out.best_trial) == "COMPLETE"
    # a repeated proposal is answered from its twin, not evaluated again
    seen: dict[tuple, object] = {}
    for t in out.study.trials:
        key = tuple(sorted(t.params.items()))
        if key in seen:
            twin = seen[key]
            assert t.user_attrs["repeat_of"] == twin.number and t.value == twin.value
            assert t.user_attrs["docs_scored"] == 0 and trial_state(t) == trial_state(twin)
        else:
            seen[key] = t
    evaluated = [r for r in wb.merged if r is not None]
    assert len(evaluated) == len(seen) + len(out.heldout)  # search + held-out re-scoring
    csv = (tmp_path / "r" / "space" / "trials.csv").read_text()
    assert ",PRUNED," in csv
