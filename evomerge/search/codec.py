"""The search-space codec: a space read through one sampler's simplex parameterization.

`Codec(space, parameterization)` is immutable plain data, like Optuna's distributions: it emits
the Optuna distributions of a method's branch, asks a trial for them, and encodes logical values
(baselines, warm starts) into trial parameters. Decoding needs no parameterization (decode.py
reads it off the names), so a stored trial decodes without knowing its sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.search import catalog, simplex, stacking
from evomerge.search.cells import Cell, cells, param_name, simplex_cells
from evomerge.search.decode import decode
from evomerge.search.params import ParamSpec
from evomerge.search.spec import SpaceSpec, check_sampler
from evomerge.search.study import reached

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from evomerge.recipe import Recipe

Want = Callable[[ParamSpec, Cell], Any]  # the logical value wanted in one cell


@dataclass(frozen=True)
class Codec:
    space: SpaceSpec
    parameterization: str = "logu"  # "logu" or "stick" (simplex.py)

    @classmethod
    def for_sampler(cls, space: SpaceSpec, sampler: str) -> Codec:
        """The codec `sampler` searches with; ConfigError if it cannot handle the space."""
        check_sampler(space, sampler)
        return cls(space, catalog.parameterization(sampler))

    # ---- distributions and sampling ------------------------------------------------------
    def distributions(self, method: str) -> dict[str, BaseDistribution]:
        """The Optuna distributions of one method's branch, in a fixed order ("method" first
        when the space chooses between methods)."""
        from optuna.distributions import CategoricalDistribution

        out: dict[str, BaseDistribution] = {}
        if self.space.categorical:
            out["method"] = CategoricalDistribution(self.space.methods)
        for param in self.space.params[method]:
            if param.searched:
                out.update(self._param_distributions(param))
        if self.space.stacking is not None:
            out.update(stacking.distributions(self.space.stacking))
        return out

    def _param_distributions(self, param: ParamSpec) -> dict[str, BaseDistribution]:
        from optuna.distributions import FloatDistribution

        space = self.space
        if param.simplex and self.parameterization == "stick":
            n = len(space.models)
            unit = FloatDistribution(0.0, 1.0)
            return {
                param_name(space, param, members[0], stick=k): unit
                for members in simplex_cells(space, param)
                for k in range(n - 1)
            }
        if param.simplex:
            box = FloatDistribution(simplex.LOGU_LOW, 1.0)
            return {param_name(space, param, c): box for c in cells(space, param)}
        dist = _box(param)
        return {param_name(space, param, c): dist for c in cells(space, param)}

    def suggest(self, trial: Any) -> Recipe:
        """Ask the trial for every parameter of the (chosen) method, return the recipe."""
        method = self.space.methods[0]
        if self.space.categorical:
            method = trial.suggest_categorical("method", self.space.methods)
        for name, dist in self.distributions(method).items():
            if name != "method":
                suggest_value(trial, name, dist)
                reached("param-stored")
        return self.decode(trial.params)

    def decode(self, params: Mapping[str, Any]) -> Recipe:
        return decode(self.space, params)

    def simplex_groups(self, method: str) -> list[list[str]]:
        """Names of the logu parameters that together form one simplex (the dirichlet
        sampler draws each group at once)."""
        return [
            [param_name(self.space, p, c) for c in members]
            for p in self.space.params[method]
            if p.searched and p.simplex
            for members in simplex_cells(self.space, p)
        ]

    # ---- encoding (baselines, warm starts) -----------------------------------------------
    def encode(self, method: str, want: Want, stack_source: str | None = None) -> dict[str, Any]:
        """Logical values -> trial params. `want(spec, cell)` gives the value wanted in a cell;
        values are clipped to the search bounds, simplex weights normalized. A stacking genome
        is the identity stack of `stack_source` (None: the weight candidate, if searched)."""
        params: dict[str, Any] = {"method": method} if self.space.categorical else {}
        if self.space.stacking is not None:
            params.update(stacking.identity(self.space.stacking, stack_source))
        specs = {s.name: s for s in self.space.params[method]}
        for param in (s for s in specs.values() if s.searched):
            if param.simplex:
                params.update(self._encode_simplex(param, want))
                continue
            dep = specs.get(param.relative_to or "")
            for c in cells(self.space, param):
                params[param_name(self.space, param, c)] = _encode_value(param, dep, c, want)
        return params

    def _encode_simplex(self, param: ParamSpec, want: Want) -> dict[str, float]:
        out: dict[str, float] = {}
        for members in simplex_cells(self.space, param):
            ws = [max(float(want(param, m)), 0.0) for m in members]
            ws = ws if sum(ws) > 0 else [1.0] * len(ws)
            if self.parameterization == "stick":
                for k, u in enumerate(simplex.stick_encode(ws)):
                    out[param_name(self.space, param, members[0], stick=k)] = u
            else:
                for m, x in zip(members, simplex.logu_encode(ws), strict=True):
                    out[param_name(self.space, param, m)] = x
        return out


def _box(param: ParamSpec) -> BaseDistribution:
    """The distribution of a non-simplex searched parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if param.choices:
        return CategoricalDistribution(list(param.choices))
    if param.kind == "int":
        step = int(param.step or 1)
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=step)
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def suggest_value(trial: Any, name: str, dist: BaseDistribution) -> Any:
    """trial.suggest_* for one distribution (Optuna's public API takes the bounds, not the
    distribution object; the distribution it builds is equal to `dist`)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)


def _encode_value(param: ParamSpec, dep: ParamSpec | None, cell: Cell, want: Want) -> Any:
    """One cell's trial value: clipped to the bounds; a relative parameter as its fraction."""
    v = want(param, cell)
    if dep is not None:
        d = float(want(dep, cell) if dep.searched else dep.fixed)
        d = min(max(d, dep.low), dep.high) if dep.searched else d
        bound = min(d, 1.0 - d)
        v = float(v) / bound if bound > 0 else param.low
    if param.choices:
        return v if v in param.choices else param.choices[0]
    v = min(max(float(v), param.low), param.high)
    return round(v) if param.kind == "int" else v
