"""Trial parameters -> Recipe: a pure function of the stored parameters and the space.

The simplex parameterization is read off the names (a `[stick0]` parameter means stick
breaking), so a stored trial decodes the same whichever sampler proposed it (export relies on it).

Granularity conventions (what decode writes is exactly what the merge evaluates):
- `layer_groups: k` splits the L layers into k contiguous groups (layer l is in group
  floor(l * k / L)); the value is written as a gradient list of length L, one entry per layer,
  so mergekit's interpolation at t = l / (L - 1) lands exactly on layer l's group value.
  Tensors outside the layers (embeddings, final norm) take layer 0's value (mergekit's t = 0).
- `filters: [self_attn, mlp]` writes a filter list, one entry per filter plus a default entry
  (no filter) for every other tensor; its value is `rest:` if given, else searched too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import FilterEntry, InputModel, MergeStage, ModelRef, Recipe
from evomerge.search import simplex
from evomerge.search.cells import Cell, cells, param_name, simplex_cells
from evomerge.search.params import ParamSpec
from evomerge.search.spec import SpaceSpec
from evomerge.search.stacking import stack_recipe


def trial_method(space: SpaceSpec, params: Mapping[str, Any]) -> str:
    """The merge method a trial chose (the only one when the space has one)."""
    method = params.get("method", space.methods[0])
    if method not in space.params:
        raise ConfigError(f"trial parameter method={method!r} is not in {space.methods}")
    return method


def simplex_weights(
    space: SpaceSpec, param: ParamSpec, members: list[Cell], params: Mapping[str, Any]
) -> list[float]:
    """The weights of one simplex, from whichever parameterization the trial used."""
    if param_name(space, param, members[0], stick=0) in params:
        n = len(members) - 1
        return simplex.stick_decode(
            [params[param_name(space, param, members[0], stick=k)] for k in range(n)]
        )
    return simplex.logu_decode([params[param_name(space, param, m)] for m in members])


def cell_values(space: SpaceSpec, param: ParamSpec, params: Mapping[str, Any]) -> dict[Cell, Any]:
    """{cell: raw searched value} of one parameter (simplex weights already normalized)."""
    try:
        if not param.simplex:
            return {c: params[param_name(space, param, c)] for c in cells(space, param)}
        out: dict[Cell, Any] = {}
        for members in simplex_cells(space, param):
            out.update(zip(members, simplex_weights(space, param, members, params), strict=True))
        return out
    except KeyError as exc:
        raise ConfigError(
            f"trial parameters lack {exc.args[0]!r} (a different search "
            f"space?); got {sorted(params)}"
        ) from None


class _Settings:
    """The decoded values of one method's parameters, read per model, filter and layer."""

    def __init__(self, space: SpaceSpec, method: str, params: Mapping[str, Any]) -> None:
        self.specs = {s.name: s for s in space.params[method]}
        self.values = {
            s.name: cell_values(space, s, params) for s in self.specs.values() if s.searched
        }
        self.n_layers = space.num_layers or 1

    def at(self, param: ParamSpec, i: int, f: str | None, layer: int) -> Any:
        """The value model i's tensor of filter f in `layer` gets."""
        if not param.searched and not param.relative_to:
            return param.fixed
        fk = (f if f in param.filters else "rest") if param.filters else None
        if fk == "rest" and param.rest is not None:
            return param.rest
        g = layer * param.groups // self.n_layers if param.groups > 1 else None
        if param.searched:
            v = self.values[param.name][(i if param.per_model else None, fk, g)]
        else:  # a fixed fraction (an unset epsilon following its searched density)
            v = param.fixed
        if param.relative_to:  # a fraction of min(d, 1 - d): never breaks its bound
            d = float(self.at(self.specs[param.relative_to], i, f, layer))
            return v * min(d, 1.0 - d)
        return v

    def series(self, param: ParamSpec, i: int, f: str | None, layered: bool) -> Any:
        """A scalar, or a per-layer gradient list when the value varies by layer."""
        vals = [self.at(param, i, f, layer) for layer in range(self.n_layers if layered else 1)]
        if len(set(vals)) > 1:  # a constant list is the same as its scalar
            return [_num(v) for v in vals]
        return _num(vals[0])

    def setting(self, param: ParamSpec, i: int) -> Any:
        """The recipe value of a parameter for model i: scalar, gradient or filter list."""
        dep = self.specs.get(param.relative_to or "")
        eff = [param, dep] if dep is not None and dep.searched else [param]
        layered = any(s.groups > 1 for s in eff if s.searched)
        filters = list(dict.fromkeys(f for s in eff if s.searched for f in s.filters))
        if not filters:
            return self.series(param, i, None, layered)
        entries = [FilterEntry(f, self.series(param, i, f, layered)) for f in filters]
        return [*entries, FilterEntry(None, self.series(param, i, None, layered))]


def decode(space: SpaceSpec, params: Mapping[str, Any]) -> Recipe:
    """Trial params -> Recipe. Pure: depends only on `params` and the space."""
    method = trial_method(space, params)
    settings = _Settings(space, method, params)
    models = [InputModel(ModelRef.parse(m)) for m in space.models]
    stage_params: dict[str, Any] = {}
    for param in settings.specs.values():
        if param.per_model:
            for i, im in enumerate(models):
                im.parameters[param.name] = settings.setting(param, i)
        else:
            stage_params[param.name] = settings.setting(param, 0)
    stage = MergeStage(
        merge_method=method,
        models=models,
        base_model=ModelRef.parse(space.base_model) if space.base_model else None,
        parameters=stage_params,
        dtype=space.dtype,
        random_seed=space.random_seed,
    )
    if space.stacking is not None:
        weights = stage if space.stacking.hybrid else None
        return stack_recipe(space.stacking, weights, params, space.dtype)
    return Recipe(stages=[stage])


def _num(v: Any) -> Any:
    """Plain Python numbers in recipes (numpy scalars from samplers dump badly to YAML)."""
    if isinstance(v, bool) or isinstance(v, str):
        return v
    return int(v) if isinstance(v, int) or type(v).__name__.startswith("int") else float(v)
