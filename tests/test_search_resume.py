"""A search SIGKILLed at each point of a trial between its creation and its stored parameters
(EVOMERGE_SEARCH_KILL_AT, the steps in search/study.py's KILL_STEPS: "asked" = trial created,
nothing drawn; "drawn" = the sampler drew, qmc stored the draw's sequence index, no parameter
stored; "param-stored" = one of the three parameters stored), then resumed, meets the exact
budget of search/study.py: as many COMPLETE trials as --n-trials, no candidate evaluated twice.

qmc: the evaluated candidates (parameters and scores) are exactly those of an uninterrupted run
with the same seed: proposal k is a function of (seed, k), k is stored on the trial as its first
write, and a killed trial's retry draws its k again (search/qmc.py). Breaking that (Optuna's
study-wide counter) skips one point of the sequence at "drawn" and mixes two points at
"param-stored".

tpe (like gp, cmaes, nsga2, random and dirichlet) keeps its random state in the process: the
state dies with it and is reseeded on resume (a seeded replay would propose the start-up draws
already evaluated), so a resumed run cannot be the uninterrupted one. What is asserted: the
trials before the kill are the uninterrupted run's, the budget is exact, nothing is evaluated
twice, and the part of a proposal the dead trial stored is what its retry evaluates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _search_fakes import FakeWorkbench, fake_space, spawn_with_fakes

N_TRIALS, KILLED = 8, 3  # the kill lands in trial #3 (trials 0-2 complete before it)
RUNNER = """
from evomerge.loop.run import run_search
run_search({space!r}, results={results!r}, workbench=f.FakeWorkbench(), quiet=True, prune=False)
"""


def _space(tmp_path: Path, sampler: str) -> Path:
    search = f"{{n_trials: {N_TRIALS}, seed: 3, sampler: {sampler}, heartbeat: 1, grace_period: 2}}"
    path = tmp_path / "space.yaml"
    path.write_text(fake_space(search) + "baselines: []\n")  # trial 0 is the sampler's own
    return path


def _run(space: Path, results: Path) -> list:
    from evomerge.loop.run import run_search

    out = run_search(space, results=results, workbench=FakeWorkbench(), quiet=True, prune=False)
    return out.study.get_trials()


def _killed_run(space: Path, results: Path, step: str, n_params: int) -> list:
    """Run in a subprocess that SIGKILLs itself at `step` of trial #KILLED."""
    from evomerge.search.study import KILL_AT_ENV, KILL_STEPS

    # which time the process reaches the step: once per trial ("drawn": not in trial 0, which
    # the independent sampler draws), once per parameter ("param-stored": the first of #KILLED)
    nth = {"asked": KILLED + 1, "drawn": KILLED, "param-stored": KILLED * n_params + 1}[step]
    env = {**os.environ, KILL_AT_ENV: f"{KILL_STEPS.index(step) + 1}.{nth}"}
    proc = spawn_with_fakes(RUNNER.format(space=str(space), results=str(results)), env=env)
    assert proc.wait(timeout=120) == -9, proc.stderr.read().decode()[-2000:]
    import optuna

    storage = f"sqlite:///{results / 'space' / 'study.db'}"
    return optuna.load_study(study_name="space", storage=storage).get_trials()


def _key(t) -> tuple:
    return tuple(sorted(t.params.items()))


def _check_budget(trials: list) -> list:
    """The exact budget: N counted trials, all COMPLETE, no candidate evaluated twice."""
    from evomerge.search.study import counts_toward_budget

    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sum(counts_toward_budget(t) for t in trials) == len(done) == N_TRIALS
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({_key(t) for t in done}) == N_TRIALS  # no candidate evaluated twice
    return done


def _check_kill_point(dead, step: str, n_params: int) -> None:
    """The kill landed where it was asked to: what the dead trial had stored."""
    from evomerge.search.qmc import qmc_index

    assert dead.number == KILLED and dead.state.name == "RUNNING"
    assert len(dead.params) == (1 if step == "param-stored" else 0) and n_params == 3
    if step == "asked":
        assert qmc_index(dead) is None


@pytest.mark.parametrize("step", ["asked", "drawn", "param-stored"])
def test_qmc_search_killed_between_draw_and_storage_resumes_to_the_uninterrupted_run(
    tmp_path: Path, step: str
):
    pytest.importorskip("optuna")
    from evomerge.search.qmc import qmc_index

    space = _space(tmp_path, "qmc")
    ref = [t for t in _run(space, tmp_path / "ref") if t.state.name == "COMPLETE"]
    n_params = len(ref[0].params)
    killed = _killed_run(space, tmp_path / "r", step, n_params)
    _check_kill_point(killed[KILLED], step, n_params)
    assert [(_key(t), t.value) for t in killed[:KILLED]] == [
        (_key(t), t.value) for t in ref[:KILLED]
    ]

    done = _check_budget(_run(space, tmp_path / "r"))
    assert sorted((_key(t), t.value) for t in done) == sorted((_key(t), t.value) for t in ref)
    best = max(ref, key=lambda t: t.value)
    assert max(done, key=lambda t: t.value).params == best.params  # the same best
    # each index of the QMC sequence evaluated once (trial 0: the independent sampler's draw)
    assert sorted(qmc_index(t) for t in done if t.number) == list(range(N_TRIALS - 1))
    if step != "asked":  # the dead trial drew: its retry evaluated that draw
        retry = [t for t in done if t.system_attrs.get("failed_trial") == KILLED]
        assert len(retry) == 1 and qmc_index(retry[0]) == qmc_index(ref[KILLED])
        assert _key(retry[0]) == _key(ref[KILLED])


def test_tpe_search_killed_after_a_partial_proposal_keeps_the_budget(tmp_path: Path):
    pytest.importorskip("optuna")
    space = _space(tmp_path, "tpe")
    ref = [t for t in _run(space, tmp_path / "ref") if t.state.name == "COMPLETE"]
    n_params = len(ref[0].params)
    killed = _killed_run(space, tmp_path / "r", "param-stored", n_params)
    _check_kill_point(killed[KILLED], "param-stored", n_params)
    assert [(_key(t), t.value) for t in killed[:KILLED]] == [
        (_key(t), t.value) for t in ref[:KILLED]
    ]
    stored = killed[KILLED].params

    done = _check_budget(_run(space, tmp_path / "r"))
    retry = [t for t in done if t.system_attrs.get("failed_trial") == KILLED]
    assert len(retry) == 1 and stored.items() <= retry[0].params.items()
