"""Baseline trials enqueued first: uniform weights, each expert alone, the method's defaults,
and warm starts from recipe YAML files the user names.

- uniform: every model's weight equal (1/n on the simplex, the declared default when free),
  other parameters at their declared defaults.
- experts: model k alone: weight one-hot, density at its upper search bound (1 if allowed, so
  the expert is not sparsified), other parameters at their defaults.
- defaults: every parameter at its declared default (clipped to the search bounds).
- a recipe file: its values, read at each layer group's centre layer and each filter.
Values outside the search bounds are clipped, so a baseline is always a valid trial.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.table import get_method
from evomerge.recipe import evaluate_setting, load_recipe
from evomerge.search.cells import Cell
from evomerge.search.codec import Codec, Want
from evomerge.search.params import ParamSpec
from evomerge.search.space import SearchSpace


def default_value(spec: ParamSpec) -> Any:
    param = get_method(spec.method).param(spec.name)
    d = param.default if param is not None else None
    if spec.choices:
        return d if d in spec.choices else spec.choices[0]
    if isinstance(d, bool) or not isinstance(d, (int, float)):
        return (spec.low + spec.high) / 2
    return d  # for a relative parameter (epsilon) the absolute value; encode makes it a fraction


def _defaults(spec: ParamSpec, cell: Cell) -> Any:
    return default_value(spec)


def _uniform(spec: ParamSpec, cell: Cell) -> Any:
    return 1.0 if spec.simplex else default_value(spec)


def _expert(k: int) -> Want:
    def want(spec: ParamSpec, cell: Cell) -> Any:
        if spec.name == "weight":
            return 1.0 if cell[0] == k else 0.0
        if spec.name == "density":
            return spec.high
        return default_value(spec)

    return want


def _from_recipe(space: SearchSpace, path: str) -> tuple[str, Want]:
    stage = load_recipe(path).final
    if stage.merge_method not in space.spec.methods:
        raise ConfigError(
            f"baseline recipe '{path}': merge_method '{stage.merge_method}' is not "
            f"searched by this space ({space.spec.methods})"
        )
    paths = [str(m.model) for m in stage.models]
    n_layers = space.spec.num_layers or 1

    def want(spec: ParamSpec, cell: Cell) -> Any:
        i, f, g = cell
        value = stage.parameters.get(spec.name)
        if spec.per_model and i is not None and space.spec.models[i] in paths:
            value = stage.models[paths.index(space.spec.models[i])].parameters.get(spec.name, value)
        if value is None:
            return default_value(spec)
        groups = max(spec.groups, 1)
        layer = ((g or 0) * n_layers + n_layers // 2) // groups if g is not None else 0
        part = f if f and f != "rest" else "input_layernorm"
        t = layer / (n_layers - 1) if n_layers > 1 else 0.0
        return evaluate_setting(value, f"model.layers.{layer}.{part}.weight", t)

    return stage.merge_method, want


def default_params(space: SearchSpace, method: str, parameterization: str = "logu") -> dict:
    """Trial params of the `defaults` baseline: every parameter at its declared default."""
    return Codec(space.spec, parameterization).encode(method, _defaults)


def baseline_trials(
    space: SearchSpace, parameterization: str = "logu"
) -> list[tuple[str, dict[str, Any]]]:
    """(label, trial params) for every baseline the space asks for, in order, encoded in the
    searching sampler's simplex `parameterization` (decoding accepts either)."""
    codec = Codec(space.spec, parameterization)
    out: list[tuple[str, dict[str, Any]]] = []
    for name in space.spec.baselines:
        if name not in ("uniform", "experts", "defaults"):
            method, want = _from_recipe(space, name)
            out.append((f"recipe:{name}", codec.encode(method, want)))
            continue
        stack_only = space.spec.stacking is not None and not space.spec.stacking.hybrid
        if stack_only and name in ("uniform", "defaults"):
            continue  # no weights to be uniform or default: only each source's own stack
        for method in space.spec.methods:
            specs = space.spec.params[method]
            if name == "uniform":
                out.append((f"uniform:{method}", codec.encode(method, _uniform)))
            elif name == "defaults":
                out.append((f"defaults:{method}", codec.encode(method, _defaults)))
            elif any(s.name == "weight" and s.searched and s.per_model for s in specs):
                for k, label in enumerate(space.spec.labels):
                    out.append((f"expert:{label}:{method}", codec.encode(method, _expert(k))))
            elif space.spec.stacking is not None:  # stacking-only: each source's own stack
                for k, model in enumerate(space.spec.models):
                    want = codec.encode(method, _defaults, stack_source=model)
                    out.append((f"expert:{space.spec.labels[k]}", want))
    return out
