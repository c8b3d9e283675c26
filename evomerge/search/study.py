"""Optuna plumbing: samplers, pruners, storage (crash recovery, several workers), the budget.

Budget rule (exact across workers and resumes): a trial counts toward --n-trials when it is
COMPLETE, PRUNED, or FAIL because the candidate itself failed (NaN, OOM, CandidateError: its
evaluation was spent, and a space full of failing candidates must still end). Trials abandoned
by Ctrl-C or by a dead worker (heartbeat stale) do not count; a dead worker's trial is re-queued
with the same parameters (RetryHeartbeatStaleTrialCallback, RDB storages), so re-running the same
command finishes the budget with no completed trial lost or run twice.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import optuna

    from evomerge.search.space import SearchSpace

CONSTRAINED_SAMPLERS = ("tpe", "nsga2", "gp")  # read trial.constraints (set_constraint)
FAIL_KIND = "fail_kind"  # trial user attr: "candidate" (counts), "interrupted", "over_budget"
STOPPED_AT = "stopped_at_docs"  # trial user attr: documents scored when the pruner stopped it


def trial_state(trial: Any) -> str:
    """The state evomerge shows and ranks by: Optuna's, except "PRUNED" for a trial the pruner
    stopped. Such a trial is COMPLETE in Optuna, valued by its estimate from the documents it
    scored (Optuna's documented workaround, see loop.py): every sampler learns from it, and it
    never ranks as best, is never re-scored on held-out and is never exported."""
    if trial.state.name == "COMPLETE" and trial.user_attrs.get(STOPPED_AT):
        return "PRUNED"
    return trial.state.name


def _dirichlet_sampler_cls() -> type:
    import numpy as np
    import optuna

    class DirichletSampler(optuna.samplers.BaseSampler):
        """Random search with flat Dirichlet draws on each simplex and uniform draws elsewhere:
        the baseline published merges use. One draw per simplex per trial, cached while the
        trial asks for the simplex's parameters one by one; written in the `-log(u)`
        parameterization as x_i = exp(-w_i), which decodes to exactly w."""

        def __init__(self, groups: Sequence[Sequence[str]], seed: int | None = None) -> None:
            self._group_of = {name: tuple(g) for g in groups for name in g}
            self._rng = np.random.RandomState(seed)
            self._random = optuna.samplers.RandomSampler(seed=seed)
            self._draws: dict[tuple[int, tuple[str, ...]], dict[str, float]] = {}

        def reseed_rng(self) -> None:
            self._rng = np.random.RandomState()
            self._random.reseed_rng()

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            group = self._group_of.get(name)
            if group is None:
                return self._random.sample_independent(study, trial, name, dist)
            key = (trial.number, group)
            if key not in self._draws:
                ws = self._rng.dirichlet(np.ones(len(group)))  # (n_models,)
                self._draws[key] = {n: float(np.exp(-w)) for n, w in zip(group, ws, strict=True)}
            return self._draws[key][name]

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            for key in [k for k in self._draws if k[0] == trial.number]:
                del self._draws[key]

    return DirichletSampler


def make_sampler(
    name: str,
    space: SearchSpace,
    seed: int | None,
    n_objectives: int,
    options: dict[str, Any] | None = None,
) -> optuna.samplers.BaseSampler:
    """A seeded sampler; it also switches the space to this sampler's simplex parameterization.

    `options` (the space's `search.sampler_options`) are keyword arguments of the Optuna
    sampler's constructor, over evomerge's defaults. Constraints reach tpe/nsga2/gp through
    `trial.set_constraint` (Optuna 5 deprecates constraints_func); the loop penalizes the
    objective for the other samplers."""
    import optuna

    space.use_sampler(name)
    if name == "dirichlet":
        groups = [g for m in space.spec.methods for g in space.simplex_groups(m)]
        check_options("dirichlet", _dirichlet_sampler_cls(), options, {"groups", "seed"})
        return _dirichlet_sampler_cls()(groups, seed=seed, **(options or {}))
    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"unknown sampler '{name}'")
    cls = getattr(optuna.samplers, SAMPLER_CLASSES[name])
    kwargs = {"seed": seed, **sampler_defaults(name, space), **(options or {})}
    check_options(name, cls, options, {"seed"})
    return _construct(name, cls, kwargs, options)


def _construct(name: str, cls: Any, kwargs: dict[str, Any], options: Any) -> Any:
    """cls(**kwargs), a bad option value being bad input (ConfigError), not a crash."""
    import optuna

    with warnings.catch_warnings():  # QMC and WilcoxonPruner are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} options {options}: {exc}") from None


def options_for(search: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    """The options of sampler or pruner `name` from a space's `search:` section:
    `sampler_options: {gp: {n_startup_trials: 8}}` (keyed by name, so `--sampler` can switch)."""
    table = search.get(f"{kind}_options") or {}
    if not isinstance(table, dict):
        raise ConfigError(
            f"search.{kind}_options: expected a mapping {{{kind} name: {{keyword: value}}}}, "
            f"but got {table!r}"
        )
    return table.get(name)


SAMPLER_CLASSES = {
    "tpe": "TPESampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "nsga2": "NSGAIISampler",
    "qmc": "QMCSampler",
}


def sampler_defaults(name: str, space: SearchSpace) -> dict[str, Any]:
    """evomerge's defaults for each Optuna sampler (see README, search benchmark)."""
    if name == "tpe":
        return {"multivariate": True, "constant_liar": True, "n_startup_trials": 10}
    if name == "cmaes":
        return {"n_startup_trials": 1, "warn_independent_sampling": False}
    if name == "gp":
        return {}
    if name == "nsga2":
        return {"population_size": 16}
    if name == "qmc":
        return {"scramble": True, "warn_independent_sampling": False}
    return {}


def check_options(name: str, cls: Any, options: dict[str, Any] | None, reserved: set[str]) -> None:
    """ConfigError for sampler/pruner options its constructor does not take."""
    import inspect

    if not options:
        return
    if not isinstance(options, dict):
        raise ConfigError(
            f"{name} options: expected a mapping of keyword arguments, got {options!r}"
        )
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in reserved and p != "self"]
    for key, value in options.items():
        if key in reserved:
            raise ConfigError(f"{name} options: '{key}' is set by evomerge (use search.{key})")
        if key not in accepted:
            what = f"keyword argument of {cls.__name__}"
            raise ConfigError(f"{name} options: {did_you_mean(key, accepted, what)}")
        default = params[key].default  # a scalar default says the type the value must have
        want = type(default) if isinstance(default, (bool, int, float)) else None
        if want is not None and not _is_kind(value, want):
            raise ConfigError(
                f"{name} options: '{key}' must be {want.__name__}, like its default "
                f"{default!r}, but got {value!r}"
            )


def _is_kind(value: Any, want: type) -> bool:
    """value fits a parameter whose default is of type `want` (an int is a float; a bool is
    neither: YAML's `1` and `true` differ)."""
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    return isinstance(value, int) if want is int else isinstance(value, (int, float))


def make_pruner(
    name: str, n_objectives: int, enabled: bool = True, options: dict[str, Any] | None = None
) -> tuple[Any, str]:
    """(pruner, report mode). Mode "examples": one report per example with step = a stable
    example id (WilcoxonPruner's paired test against the best trial); mode "docs": one report
    per chunk with step = number of docs scored so far. Multi-objective studies cannot prune.
    `options` (the space's `search.pruner_options`) go to the Optuna pruner's constructor."""
    import optuna

    if not enabled or name == "none" or n_objectives > 1:
        return optuna.pruners.NopPruner(), "none"
    if name not in PRUNER_CLASSES:
        raise ConfigError(f"unknown pruner '{name}'")
    cls_name, mode, defaults = PRUNER_CLASSES[name]
    cls = getattr(optuna.pruners, cls_name)
    check_options(name, cls, options, set())
    return _construct(name, cls, {**defaults, **(options or {})}, options), mode


PRUNER_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wilcoxon": ("WilcoxonPruner", "examples", {"p_threshold": 0.1, "n_startup_steps": 8}),
    "median": ("MedianPruner", "docs", {"n_startup_trials": 5, "n_warmup_steps": 0}),
    "halving": ("SuccessiveHalvingPruner", "docs", {}),
}


def storage_url(storage: str | None, study_dir: Path) -> str:
    """None -> SQLite in the study folder; "journal" or a *.log path -> a journal file (safe for
    many processes on one file system, no heartbeats); anything else is an Optuna URL."""
    if storage is None:
        return f"sqlite:///{study_dir / 'study.db'}"
    if storage == "journal":
        return f"journal:{study_dir / 'journal.log'}"
    if storage.endswith((".log", ".journal")) and "://" not in storage:
        return f"journal:{storage}"
    if "://" not in storage and not storage.startswith("journal:"):
        raise ConfigError(
            f"--storage: expected an Optuna URL (sqlite:///x.db, postgresql://...), "
            f"'journal' or a *.log file, but got '{storage}'"
        )
    return storage


def open_storage(url: str, heartbeat: int = 30, grace: int | None = None) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal:"):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _rdb(url, kwargs, heartbeat, grace)


def _rdb(url: str, kwargs: dict | None, heartbeat: int, grace: int | None) -> Any:
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    last: Exception | None = None
    for _ in range(5):  # workers starting together race to create the schema (PostgreSQL types)
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat,
                grace_period=grace or 4 * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
            if url.startswith("sqlite"):
                _fast_sqlite(storage.engine)
            return storage
        except ImportError as exc:  # the URL's database driver is not installed
            raise ConfigError(
                f"--storage '{url}': no database driver for it ({exc}); for PostgreSQL "
                "pip install psycopg2-binary and use postgresql+psycopg2://..."
            ) from None
        except SQLAlchemyError as exc:
            last = exc
            time.sleep(0.5 + random.random())
    first = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise ConfigError(f"--storage '{url}': cannot open the database: {first}")


def _fast_sqlite(engine: Any) -> None:
    """WAL journal + synchronous=NORMAL on every connection: a trial makes a dozen small
    writes (params, user attrs, reports), and SQLite's default (a rollback journal synced on
    every commit) made that bookkeeping cost more than scoring a pruned candidate (measured
    ~6x less per trial). Committed trials still survive a killed process; WAL also lets
    `evomerge status` read while workers write. Connections opened before this are dropped."""
    from sqlalchemy import event

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()


def open_study(
    name: str, storage: Any, sampler: Any, pruner: Any, directions: list[str]
) -> optuna.Study:
    """Create the study or continue it (load_if_exists); several workers may race here."""
    import optuna

    last: Exception | None = None
    for _ in range(5):  # concurrent first creation of the SQLite tables can collide
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                directions=directions,
                load_if_exists=True,
            )
            break
        except ValueError as exc:
            raise ConfigError(f"study '{name}' exists with other objectives: {exc}") from None
        except Exception as exc:  # OperationalError ("database is locked") on first creation
            last = exc
            time.sleep(0.5)
    else:
        raise ConfigError(f"cannot open study '{name}': {last}")
    if list(study.directions) and [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study '{name}' was created with directions "
            f"{[d.name.lower() for d in study.directions]}, but this space asks "
            f"for {directions}; use another --study name"
        )
    return study


def counts_toward_budget(trial: Any) -> bool:
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_KIND) == "candidate"


def budget_state(study: Any) -> tuple[int, int]:
    """(trials counted toward the budget, trials running now)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(counts_toward_budget(t) for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)


def docs_budget(full_trials: float) -> Callable[[Any], bool]:
    """stop(study) for run_search: True once the counted trials have scored as many documents
    as `full_trials` fully evaluated trials (a budget that pruned and unpruned searches can
    share: pruned trials cost only the documents they scored)."""

    def stop(study: Any) -> bool:
        docs = [
            (int(t.user_attrs.get("docs_scored", 0)), trial_state(t) == "COMPLETE")
            for t in study.get_trials(deepcopy=False)
            if counts_toward_budget(t)
        ]
        full = max((d for d, complete in docs if complete), default=0)
        return bool(full) and sum(d for d, _ in docs) >= full_trials * full

    return stop


def over_budget(study: Any, number: int, n_trials: int | None) -> bool:
    """True if trial `number` is beyond the budget: as many counted or running trials were
    created before it. Trial numbers order trials the same way in every worker, so two workers
    that asked at the same moment agree on which of them is surplus."""
    from optuna.trial import TrialState

    if n_trials is None:
        return False
    ahead = sum(
        counts_toward_budget(t) or t.state == TrialState.RUNNING
        for t in study.get_trials(deepcopy=False)
        if t.number < number
    )
    return ahead >= n_trials


def enqueue(study: Any, trials: list[tuple[str, dict[str, Any]]]) -> int:
    """Enqueue baseline trials unless a trial with the same params exists (resumes, workers)."""
    before = len(study.get_trials(deepcopy=False))
    for label, params in trials:
        study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False)) - before
