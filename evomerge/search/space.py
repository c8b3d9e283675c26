"""SearchSpace: optuna parameters <-> merge recipes.

Optuna parameter names read like the recipe: `weight[expert_a]`, `density[expert_a][mlp][g2]`,
`lambda`, `method` (categorical methods prefix theirs: `ties.density[expert_a]`). Simplex weights
are searched through a parameterization (see simplex.py) chosen by the sampler; `decode` detects
it from the names, so it is a pure function of stored trial params (export relies on that).

Granularity conventions (what decode writes is exactly what the merge evaluates):
- `layer_groups: k` splits the L layers into k contiguous groups (layer l is in group
  floor(l * k / L)); the value is written as a gradient list of length L, one entry per layer,
  so mergekit's interpolation at t = l / (L - 1) lands exactly on layer l's group value.
  Tensors outside the layers (embeddings, final norm) take layer 0's value (mergekit's t = 0).
- `filters: [self_attn, mlp]` writes a filter list, one entry per filter plus a default entry
  (no filter) for every other tensor; its value is `rest:` if given, else searched too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import FilterEntry, InputModel, MergeStage, ModelRef, Recipe
from evomerge.search import simplex
from evomerge.search.params import ParamSpec
from evomerge.search.spec import SpaceSpec, check_sampler, parse_space

STICK_SAMPLERS = ("cmaes", "gp")  # continuous optimizers: no redundant simplex dimension
Cell = tuple[int | None, str | None, int | None]  # (model index, filter, layer group)


@dataclass(frozen=True)
class RawParam:
    """One optuna parameter: a float/int box or a categorical choice."""

    name: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    is_int: bool = False
    choices: tuple[Any, ...] = ()


def _sfx(spec: ParamSpec, labels: list[str], cell: Cell) -> str:
    i, f, g = cell
    return (
        (f"[{labels[i]}]" if i is not None else "")
        + (f"[{f}]" if f else "")
        + (f"[g{g}]" if g is not None else "")
    )


class SearchSpace:
    def __init__(self, spec: SpaceSpec, parameterization: str = "logu") -> None:
        self.spec = spec
        self.parameterization = parameterization

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"search space file '{path}' not found")
        return cls.from_text(path.read_text(), source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<space>") -> SearchSpace:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        return cls(parse_space(data, source))

    def use_sampler(self, sampler: str) -> SearchSpace:
        """Validate the sampler against the space and pick its simplex parameterization."""
        check_sampler(self.spec, sampler)
        self.parameterization = "stick" if sampler in STICK_SAMPLERS else "logu"
        return self

    # ---- cells and names ----------------------------------------------------------------
    def _prefix(self, spec: ParamSpec) -> str:
        return f"{spec.method}.{spec.name}" if self.spec.categorical else spec.name

    def cells(self, spec: ParamSpec) -> list[Cell]:
        models = range(len(self.spec.models)) if spec.per_model else [None]
        filters: list[str | None] = [None]
        if spec.filters:
            filters = [*spec.filters, *(["rest"] if spec.rest is None else [])]
        groups = range(spec.groups) if spec.groups > 1 else [None]
        return [(i, f, g) for f in filters for g in groups for i in models]

    def raw_params(self, method: str) -> list[RawParam]:
        """The optuna parameters of one method's branch, in a fixed order."""
        out: list[RawParam] = []
        labels = self.spec.labels
        for spec in self.spec.params[method]:
            if not spec.searched:
                continue
            pre = self._prefix(spec) + ("_frac" if spec.relative_to else "")
            cells = self.cells(spec)
            if spec.simplex and self.parameterization == "stick":
                for cell in cells:
                    if cell[0] == 0:
                        n = len(self.spec.models)
                        out += [
                            RawParam(f"{pre}[stick{k}]" + _sfx(spec, labels, (None, *cell[1:])))
                            for k in range(n - 1)
                        ]
                continue
            for cell in cells:
                name = pre + _sfx(spec, labels, cell)
                if spec.choices:
                    out.append(RawParam(name, choices=spec.choices))
                elif spec.simplex:
                    out.append(RawParam(name, low=simplex.LOGU_LOW, high=1.0))
                else:
                    out.append(
                        RawParam(
                            name,
                            spec.low,
                            spec.high,
                            spec.log,
                            spec.step,
                            is_int=spec.kind == "int",
                        )
                    )
        return out

    def simplex_groups(self, method: str) -> list[list[str]]:
        """Names of the logu parameters that together form one simplex (for the dirichlet
        sampler)."""
        groups: dict[str, list[str]] = {}
        for spec in self.spec.params[method]:
            if spec.searched and spec.simplex:
                for cell in self.cells(spec):
                    key = self._prefix(spec) + _sfx(spec, self.spec.labels, (None, *cell[1:]))
                    groups.setdefault(key, []).append(
                        self._prefix(spec) + _sfx(spec, self.spec.labels, cell)
                    )
        return list(groups.values())

    # ---- sampling -----------------------------------------------------------------------
    def suggest(self, trial: Any) -> Recipe:
        """Ask the trial for every parameter of the (chosen) method, return the recipe."""
        method = self.spec.methods[0]
        if self.spec.categorical:
            method = trial.suggest_categorical("method", self.spec.methods)
        for p in self.raw_params(method):
            if p.choices:
                trial.suggest_categorical(p.name, list(p.choices))
            elif p.is_int:
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        return self.decode(trial.params)

    # ---- decoding -----------------------------------------------------------------------
    def _cell_values(self, spec: ParamSpec, params: dict[str, Any]) -> dict[Cell, Any]:
        pre = self._prefix(spec) + ("_frac" if spec.relative_to else "")
        labels, cells = self.spec.labels, self.cells(spec)
        name = {c: pre + _sfx(spec, labels, c) for c in cells}
        try:
            if not spec.simplex:
                return {c: params[name[c]] for c in cells}
            out: dict[Cell, Any] = {}
            for c in (c for c in cells if c[0] == 0):
                members = [(i, *c[1:]) for i in range(len(self.spec.models))]
                stick0 = f"{pre}[stick0]" + _sfx(spec, labels, (None, *c[1:]))
                if stick0 in params:
                    us = [
                        params[stick0.replace("[stick0]", f"[stick{k}]", 1)]
                        for k in range(len(members) - 1)
                    ]
                    ws = simplex.stick_decode(us)
                else:
                    ws = simplex.logu_decode([params[name[m]] for m in members])
                out.update(zip(members, ws, strict=True))
            return out
        except KeyError as exc:
            raise ConfigError(
                f"trial parameters lack {exc.args[0]!r} (a different search "
                f"space?); got {sorted(params)}"
            ) from None

    def decode(self, params: dict[str, Any]) -> Recipe:
        """Trial params -> Recipe. Pure: depends only on `params` and the space."""
        method = params.get("method", self.spec.methods[0])
        if method not in self.spec.params:
            raise ConfigError(f"trial parameter method={method!r} is not in {self.spec.methods}")
        specs = {s.name: s for s in self.spec.params[method]}
        values = {s.name: self._cell_values(s, params) for s in specs.values() if s.searched}
        n_layers = self.spec.num_layers or 1

        def at(spec: ParamSpec, i: int, f: str | None, layer: int) -> Any:
            if not spec.searched:
                return spec.fixed
            fk = (f if f in spec.filters else "rest") if spec.filters else None
            if fk == "rest" and spec.rest is not None:
                return spec.rest
            g = layer * spec.groups // n_layers if spec.groups > 1 else None
            v = values[spec.name][(i if spec.per_model else None, fk, g)]
            if spec.relative_to:
                d = float(at(specs[spec.relative_to], i, f, layer))
                return v * min(d, 1.0 - d)
            return v

        def build(spec: ParamSpec, i: int) -> Any:
            dep = specs.get(spec.relative_to or "")
            eff = [spec, dep] if dep is not None and dep.searched else [spec]
            layered = any(s.groups > 1 for s in eff if s.searched)
            filters = list(dict.fromkeys(f for s in eff if s.searched for f in s.filters))

            def series(f: str | None) -> Any:
                vals = [at(spec, i, f, layer) for layer in range(n_layers if layered else 1)]
                if len(set(vals)) > 1:  # a constant list is the same as its scalar
                    return [_num(v) for v in vals]
                return _num(vals[0])

            if not filters:
                return series(None)
            return [FilterEntry(f, series(f)) for f in filters] + [FilterEntry(None, series(None))]

        models = [InputModel(ModelRef.parse(m)) for m in self.spec.models]
        stage_params: dict[str, Any] = {}
        for spec in specs.values():
            if spec.per_model:
                for i, im in enumerate(models):
                    im.parameters[spec.name] = build(spec, i)
            else:
                stage_params[spec.name] = build(spec, 0)
        base = ModelRef.parse(self.spec.base_model) if self.spec.base_model else None
        stage = MergeStage(
            merge_method=method,
            models=models,
            base_model=base,
            parameters=stage_params,
            dtype=self.spec.dtype,
            random_seed=self.spec.random_seed,
        )
        return Recipe(stages=[stage])

    # ---- encoding (baselines, warm starts) -----------------------------------------------
    def encode(self, method: str, want: Any) -> dict[str, Any]:
        """Logical values -> trial params. `want(spec, cell)` gives the value wanted in a cell;
        values are clipped to the search bounds, simplex weights normalized."""
        params: dict[str, Any] = {"method": method} if self.spec.categorical else {}
        labels = self.spec.labels
        specs = {s.name: s for s in self.spec.params[method]}
        for spec in (s for s in specs.values() if s.searched):
            pre = self._prefix(spec) + ("_frac" if spec.relative_to else "")
            cells = self.cells(spec)
            if spec.simplex:
                for c in (c for c in cells if c[0] == 0):
                    members = [(i, *c[1:]) for i in range(len(self.spec.models))]
                    ws = [max(float(want(spec, m)), 0.0) for m in members]
                    ws = ws if sum(ws) > 0 else [1.0] * len(ws)
                    if self.parameterization == "stick":
                        sfx = _sfx(spec, labels, (None, *c[1:]))
                        for k, u in enumerate(simplex.stick_encode(ws)):
                            params[f"{pre}[stick{k}]{sfx}"] = u
                    else:
                        for m, x in zip(members, simplex.logu_encode(ws), strict=True):
                            params[pre + _sfx(spec, labels, m)] = x
                continue
            for c in cells:
                v = want(spec, c)
                if spec.relative_to:
                    dep = specs[spec.relative_to]
                    d = float(want(dep, c) if dep.searched else dep.fixed)
                    d = min(max(d, dep.low), dep.high) if dep.searched else d
                    bound = min(d, 1.0 - d)
                    v = float(v) / bound if bound > 0 else spec.low
                if spec.choices:
                    v = v if v in spec.choices else spec.choices[0]
                else:
                    v = min(max(float(v), spec.low), spec.high)
                    v = round(v) if spec.kind == "int" else v
                params[pre + _sfx(spec, labels, c)] = v
        return params


def _num(v: Any) -> Any:
    """Plain Python numbers in recipes (numpy scalars from samplers dump badly to YAML)."""
    if isinstance(v, bool) or isinstance(v, str):
        return v
    return int(v) if isinstance(v, int) or type(v).__name__.startswith("int") else float(v)


def load_space(path: str | Path, sampler: str | None = None) -> SearchSpace:
    space = SearchSpace.from_yaml(path)
    return space.use_sampler(sampler or space.spec.search.get("sampler", "tpe"))
