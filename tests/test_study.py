"""Samplers (seeded, each parameterization), the dirichlet sampler, storage URLs, the budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _search_fakes import ensure_methods

from evomerge.errors import ConfigError
from evomerge.search.keys import FAIL_KIND
from evomerge.search.samplers import make_pruner, make_sampler
from evomerge.search.space import SearchSpace
from evomerge.search.study import (
    budget_state,
    open_storage,
    open_study,
    over_budget,
    storage_url,
)  # fmt: skip

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)
ensure_methods()

SPACE = """
base_model: base
models: [a, b, c]
method: task_arithmetic
parameters:
  weight: {simplex: true}
  lambda: {low: 0.5, high: 1.5}
tasks: [t1]
"""
TARGET = (0.6, 0.3, 0.1)


def _score(recipe) -> float:
    ws = [m.parameters["weight"] for m in recipe.final.models]
    return (
        -sum((w - t) ** 2 for w, t in zip(ws, TARGET, strict=True))
        - (recipe.final.parameters["lambda"] - 1.0) ** 2
    )


def _run(sampler: str, seed: int, n: int) -> list[dict]:
    sp = SearchSpace.from_text(SPACE, "s.yaml")
    smp = make_sampler(sampler, sp.spec, seed)
    study = optuna.create_study(sampler=smp, direction="maximize")
    codec = sp.codec(sampler)  # the parameterization this sampler searches in
    study.optimize(lambda t: _score(codec.suggest(t)), n_trials=n)
    return [t.params for t in study.trials]


@pytest.mark.parametrize(
    ("sampler", "n"), [("tpe", 14), ("cmaes", 8), ("nsga2", 20), ("qmc", 6), ("dirichlet", 6)]
)
def test_same_seed_same_trials(sampler, n):
    a, b = _run(sampler, 3, n), _run(sampler, 3, n)
    assert a == b
    assert a != _run(sampler, 4, n)


def test_gp_seeded():
    assert _run("gp", 0, 12) == _run("gp", 0, 12)


def test_tpe_beats_random_start():
    """After its 10 random start-up trials, TPE's proposals score better on average."""
    sp = SearchSpace.from_text(SPACE, "s.yaml")
    study = optuna.create_study(sampler=make_sampler("tpe", sp.spec, 0), direction="maximize")
    study.optimize(lambda t: _score(sp.codec("tpe").suggest(t)), n_trials=40)
    vals = [t.value for t in study.trials]
    assert sum(vals[-10:]) / 10 > sum(vals[:10]) / 10


def test_dirichlet_sampler_draws_flat_dirichlet_exactly_on_the_simplex():
    sp = SearchSpace.from_text(SPACE, "s.yaml")
    smp = make_sampler("dirichlet", sp.spec, 0)
    study = optuna.create_study(sampler=smp)
    ws = []
    for _ in range(600):
        trial = study.ask()
        stage = sp.codec("dirichlet").suggest(trial).final
        study.tell(trial, 0.0)
        w = [m.parameters["weight"] for m in stage.models]
        assert sum(w) == pytest.approx(1.0)
        assert 0.5 <= stage.parameters["lambda"] <= 1.5
        ws.append(w)
    for k in range(3):  # flat Dirichlet(1, 1, 1): E[w_k] = 1/3, Var = 1/18 (sd of mean 0.0096)
        assert sum(w[k] for w in ws) / len(ws) == pytest.approx(1 / 3, abs=0.035)
    var0 = sum((w[0] - 1 / 3) ** 2 for w in ws) / len(ws)
    assert var0 == pytest.approx(1 / 18, rel=0.2)


def test_storage_urls(tmp_path: Path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path / 'study.db'}"
    assert storage_url("journal", tmp_path) == f"journal:{tmp_path / 'journal.log'}"
    assert storage_url("x/j.log", tmp_path) == "journal:x/j.log"
    assert storage_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="expected an Optuna URL"):
        storage_url("nonsense", tmp_path)


def test_pruners():
    assert make_pruner("wilcoxon", 1)[1] == "examples"
    assert make_pruner("median", 1)[1] == "docs"
    assert make_pruner("median", 2)[1] == "none"  # multi-objective: Optuna cannot prune
    assert make_pruner("median", 1, enabled=False)[1] == "none"


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_budget_counts_and_surplus(tmp_path: Path, kind: str):
    url = storage_url(None if kind == "sqlite" else "journal", tmp_path)
    study = open_study("s", open_storage(url), None, None, ["maximize"])
    study.tell(study.ask(), 1.0)  # complete: counts
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)  # counts
    t = study.ask()
    t.set_user_attr(FAIL_KIND, "candidate")
    study.tell(t, state=optuna.trial.TrialState.FAIL)  # a failed candidate: counts
    t = study.ask()
    t.set_user_attr(FAIL_KIND, "interrupted")
    study.tell(t, state=optuna.trial.TrialState.FAIL)  # Ctrl-C: does not count
    running = study.ask()
    assert budget_state(study) == (3, 1)
    assert not over_budget(study, running.number, 4)
    late = study.ask()  # asked while `running` still runs: with a budget of 4 it is surplus
    assert over_budget(study, late.number, 4) and not over_budget(study, late.number, 5)
    assert not over_budget(study, late.number, None)


def test_reopen_with_other_directions_is_a_config_error(tmp_path: Path):
    url = storage_url(None, tmp_path)
    open_study("s", open_storage(url), None, None, ["maximize"])
    with pytest.raises(ConfigError, match="directions"):
        open_study("s", open_storage(url), None, None, ["maximize", "minimize"])


def test_sampler_and_pruner_options_reach_optuna():
    sp = SearchSpace.from_text(SPACE, "s.yaml")
    # n_startup_trials=2: TPE proposes from its model from the third trial on, so the third
    # proposal differs from what the default (10 random start-up trials) would draw
    runs = []
    for options in (None, {"n_startup_trials": 2}):
        study = optuna.create_study(
            sampler=make_sampler("tpe", sp.spec, 0, options), direction="maximize"
        )
        study.optimize(lambda t: _score(sp.codec("tpe").suggest(t)), n_trials=3)
        runs.append([t.params for t in study.trials])
    assert runs[0][:2] == runs[1][:2] and runs[0][2] != runs[1][2]
    pruner, mode = make_pruner("median", 1, options={"n_startup_trials": 7})
    assert mode == "docs" and pruner._n_startup_trials == 7
    # the default pruner: successive halving whose first rung is the first evaluation chunk
    pruner, mode = make_pruner("halving", 1, first_docs=128)
    assert mode == "docs" and (pruner._min_resource, pruner._reduction_factor) == (128, 3)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("gp", {"n_startup_trial": 3}, "Did you mean 'n_startup_trials'"),
        ("gp", {"seed": 3}, "'seed' is set by evomerge (use search.seed)"),
        (
            "tpe",
            {"n_startup_trials": "many"},
            "'n_startup_trials' must be int, like its default 10",
        ),
        ("tpe", {"group": 1}, "'group' must be bool"),
        ("median", {"n_warmup_steps": -1}, "median options {'n_warmup_steps': -1}"),
    ],
)
def test_bad_options_are_config_errors(kind, options, message):
    sp = SearchSpace.from_text(SPACE, "s.yaml")
    with pytest.raises(ConfigError) as err:
        if kind == "median":
            make_pruner(kind, 1, options=options)
        else:
            make_sampler(kind, sp.spec, 0, options)
    assert message in str(err.value)


def test_options_table_is_checked_when_the_space_loads():
    text = SPACE + "search: {sampler_options: {gpp: {n_startup_trials: 3}}}\n"
    with pytest.raises(ConfigError, match=r"unknown sampler 'gpp'\. Did you mean 'gp'"):
        SearchSpace.from_text(text, "s.yaml")
    with pytest.raises(ConfigError, match=re.escape("expected {pruner name: {keyword: value}}")):
        SearchSpace.from_text(SPACE + "search: {pruner_options: {median: 3}}\n", "s.yaml")


def test_a_proposal_equal_to_a_finished_trial_is_replaced():
    """NoRepeats: the inner sampler proposes x = 0.5 every time; from the second trial on it
    is replaced by the inner sampler's independent draw."""
    from evomerge.search.samplers import _no_repeats_cls

    class Stuck(optuna.samplers.RandomSampler):
        def infer_relative_search_space(self, study, trial):
            return {"x": optuna.distributions.FloatDistribution(0, 1)}

        def sample_relative(self, study, trial, search_space):
            return {"x": 0.5}

    study = optuna.create_study(sampler=_no_repeats_cls()(Stuck(seed=0)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    xs = [t.params["x"] for t in study.trials]
    assert xs[0] == 0.5 and all(x != 0.5 for x in xs[1:]) and len(set(xs)) == 4
