"""Samplers and pruners: Optuna's, with evomerge's defaults and the user's options, plus the
flat Dirichlet random-search baseline and a guard against re-proposing an evaluated point.

A space's `search:` section picks them (`sampler: gp`, `pruner: median`) and may pass keyword
arguments to the Optuna constructors, keyed by name so that `--sampler` can switch:
`sampler_options: {gp: {n_startup_trials: 8}}`, `pruner_options: {median: {...}}`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.search.catalog import (
    CONSTRAINED_SAMPLERS,
    DEFAULT_PRUNER,
    PRUNER_CLASSES,
    PRUNERS,
    SAMPLER_CLASSES,
    SAMPLERS,
)
from evomerge.search.codec import Codec
from evomerge.search.qmc import resumable_qmc_cls
from evomerge.search.study import reached

if TYPE_CHECKING:
    import optuna

    from evomerge.search.spec import SpaceSpec

__all__ = [  # the catalog's names stay importable from here (the CLI's --sampler choices)
    "CONSTRAINED_SAMPLERS",
    "DEFAULT_PRUNER",
    "PRUNERS",
    "SAMPLERS",
    "make_pruner",
    "make_sampler",
    "options_for",
]


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
    name: str, space: SpaceSpec, seed: int | None, options: dict[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    """A seeded sampler for the space (ConfigError if it cannot search it). Its trials are
    asked through `Codec.for_sampler(space, name)`, the parameterization it expects.

    `options` (the space's `search.sampler_options`) are keyword arguments of the Optuna
    sampler's constructor, over evomerge's defaults. Constraints reach tpe/nsga2/gp through
    `trial.set_constraint` (Optuna 5 deprecates constraints_func); the loop penalizes the
    objective for the other samplers."""
    import optuna

    codec = Codec.for_sampler(space, name)
    if name == "dirichlet":
        groups = [g for m in space.methods for g in codec.simplex_groups(m)]
        dirichlet = _dirichlet_sampler_cls()
        check_options("dirichlet", dirichlet, options, {"groups", "seed"})
        return dirichlet(groups, seed=seed, **(options or {}))
    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"unknown sampler '{name}'")
    if name == "qmc":  # its sequence index stored per trial: kills skip no point (qmc.py)
        cls = resumable_qmc_cls()
    else:
        cls = getattr(optuna.samplers, SAMPLER_CLASSES[name])
    kwargs = {"seed": seed, **sampler_defaults(name), **(options or {})}
    check_options(name, cls, options, {"seed"})
    return _no_repeats_cls()(_construct(name, cls, kwargs, options))


def _no_repeats_cls() -> type:
    import optuna
    from optuna.trial import TrialState

    class NoRepeats(optuna.samplers.BaseSampler):
        """Delegates to `inner`, except that a model-based proposal equal to a finished
        trial's parameters is dropped for the inner sampler's independent (random start-up)
        draw. Scoring is deterministic, so an evaluated point teaches nothing new, and a GP
        whose acquisition peaks at its incumbent would otherwise propose it again and again
        (seen on the zoo: dozens of repeats in a row)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            params = self.inner.sample_relative(study, trial, search_space)
            if search_space:
                reached("drawn")  # drawn (qmc: its index stored), no parameter stored yet
            finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if params and any(all(t.params.get(k) == v for k, v in params.items())
                              for t in finished):  # fmt: skip
                return {}
            return params

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self.inner.sample_independent(study, trial, name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self.inner.before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self.inner.after_trial(study, trial, state, values)

    return NoRepeats


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


def sampler_defaults(name: str) -> dict[str, Any]:
    """evomerge's defaults for each Optuna sampler (see README, search benchmark)."""
    if name == "tpe":
        return {"multivariate": True, "constant_liar": True, "n_startup_trials": 10}
    if name == "cmaes":
        return {"n_startup_trials": 1, "warn_independent_sampling": False}
    if name == "gp":
        return {"warn_independent_sampling": False}  # NoRepeats falls back to it on purpose
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
    name: str,
    n_objectives: int,
    enabled: bool = True,
    options: dict[str, Any] | None = None,
    first_docs: int | None = None,
) -> tuple[Any, str]:
    """(pruner, report mode). Mode "examples": one report per example with step = a stable
    example id (WilcoxonPruner's paired test against the best trial); mode "docs": one report
    per chunk with step = number of docs scored so far. Multi-objective studies cannot prune.
    `options` (the space's `search.pruner_options`) go to the Optuna pruner's constructor.

    halving (the default, asynchronous successive halving) keeps the best third at each
    rung; its first rung is the first evaluation chunk (`first_docs`, all tasks together),
    so with chunks growing ~3x (32, 96, all) every report is a rung."""
    import optuna

    if not enabled or name == "none" or n_objectives > 1:
        return optuna.pruners.NopPruner(), "none"
    if name not in PRUNER_CLASSES:
        raise ConfigError(f"unknown pruner '{name}'")
    cls_name, mode, defaults = PRUNER_CLASSES[name]
    if name == "halving":
        defaults = {**defaults, "min_resource": first_docs or "auto"}
    cls = getattr(optuna.pruners, cls_name)
    check_options(name, cls, options, set())
    return _construct(name, cls, {**defaults, **(options or {})}, options), mode
