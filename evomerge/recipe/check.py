"""Recipe validation: every rule that can be checked before a tensor is read.

Bounds and kinds of parameter values come from the merge method table's declarations
(Param.check); errors are one-line ConfigErrors naming the YAML location, e.g.
`recipe[stage 2].models[1].parameters.density: 'density' must be in (0, 1], but got 1.5`.

This is the recipe package's one import from `merge`: the method table (merge.table and the
types in merge.contract) is pure data -- names, parameter declarations, flags, and each tensor
function as a "module:function" string resolved only when a merge runs -- so validating a
recipe imports no torch, and nothing the table imports comes back to the recipe package.
"""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.merge.contract import Method, Param
from evomerge.merge.table import get_method
from evomerge.recipe.schema import (
    FilterEntry,
    MergeStage,
    ModelRef,
    ParamValue,
    Recipe,
    Scalar,
    evaluate_setting,
    is_number,
)

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def stage_where(where: str, i: int, n: int) -> str:
    return where if n == 1 else f"{where}[stage {i + 1}]"


def _model_locations(stage: MergeStage, loc: str) -> list[tuple[str, ModelRef]]:
    """(YAML location, model) of every model reference of a stage, in stage_models order."""
    out = [(f"{loc}.base_model", stage.base_model)] if stage.base_model is not None else []
    out += [(f"{loc}.models[{i}].model", m.model) for i, m in enumerate(stage.models)]
    for i, sl in enumerate(stage.slices or []):
        out += [
            (f"{loc}.slices[{i}].sources[{j}].model", s.model) for j, s in enumerate(sl.sources)
        ]
    return out


Row = tuple[str, ModelRef, list[dict]]  # (location, model, parameter blocks, most specific first)


def _groups(stage: MergeStage, method: Method, loc: str) -> list[tuple[str, list[Row], list[dict]]]:
    """Per merge (the models list, or one slice): its location, the input rows whose model-scope
    parameters the method reads, and the blocks global parameters come from. As in the engine,
    an unlisted base_model is one more input, and its parameters are read only by methods that
    merge the base as a plain input (base_is_input)."""
    if stage.slices is None:
        shared = [stage.parameters]
        rows = [
            (f"{loc}.models[{i}]", m.model, [m.parameters, *shared])
            for i, m in enumerate(stage.models)
        ]
        groups = [(loc, rows, shared)]
    else:
        groups = []
        for i, sl in enumerate(stage.slices):
            shared = [sl.parameters, stage.parameters]
            sloc = f"{loc}.slices[{i}]"
            rows = [
                (f"{sloc}.sources[{j}]", s.model, [s.parameters, *shared])
                for j, s in enumerate(sl.sources)
            ]
            groups.append((sloc, rows, shared))
    base = stage.base_model
    out = []
    for gloc, rows, shared in groups:
        if base is not None and base not in [r[1] for r in rows]:
            rows = [*rows, (f"{loc}.base_model", base, [{}, *shared])]
        read = [r for r in rows if method.base_is_input or r[1] != base]
        out.append((gloc, read, shared))
    return out


def _param_blocks(stage: MergeStage, loc: str) -> list[tuple[str, dict[str, ParamValue], bool]]:
    """(location, parameters, whether the block belongs to one model) for every block."""
    blocks = [(f"{loc}.parameters", stage.parameters, False)]
    blocks += [
        (f"{loc}.models[{i}].parameters", m.parameters, True) for i, m in enumerate(stage.models)
    ]
    for i, sl in enumerate(stage.slices or []):
        blocks.append((f"{loc}.slices[{i}].parameters", sl.parameters, False))
        blocks += [
            (f"{loc}.slices[{i}].sources[{j}].parameters", s.parameters, True)
            for j, s in enumerate(sl.sources)
        ]
    return blocks


def _scalars(value: ParamValue, where: str) -> list[tuple[str, Scalar]]:
    """Every scalar inside a value (the value itself, gradient elements, filter values)."""
    if not isinstance(value, list):
        return [(where, value)]
    if not value:
        raise ConfigError(f"{where}: expected a non-empty gradient or filter list, but got []")
    out: list[tuple[str, Scalar]] = []
    for i, item in enumerate(value):
        if isinstance(item, FilterEntry):
            out += _scalars(item.value, f"{where}[{i}].value")
        else:
            out.append((f"{where}[{i}]", item))
    return out


def _check_params(
    params: dict[str, ParamValue], method: Method, where: str, per_model: bool
) -> None:
    for name, value in params.items():
        ploc, spec = f"{where}.{name}", method.param(name)
        for vloc, x in _scalars(value, ploc):
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{vloc}: '{name}' must be finite, but got {x!r}")
            if spec is not None:
                spec.check(x, vloc)
        if spec is None:
            close = difflib.get_close_matches(name, method.param_names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            _warn(
                f"{ploc}: merge method '{method.name}' does not read parameter '{name}'; it is "
                f"ignored.{hint} Its parameters: {', '.join(method.param_names) or 'none'}"
            )
        elif per_model and spec.scope == "global":
            _warn(
                f"{ploc}: '{name}' is one value for the whole merge, read from the top-level "
                "(or slice) 'parameters:' only; this per-model value is ignored"
            )


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def _check_count(method: Method, refs: list[ModelRef], stage: MergeStage, where: str) -> None:
    """Count the inputs as the engine does: the listed models, plus an unlisted base_model."""
    base = stage.base_model
    seen = refs + ([base] if base is not None and base not in refs else [])
    want = method.model_count_rule(len(seen))
    if want is None:
        return
    raise ConfigError(
        f"{where}: merge method '{method.name}' takes {want} models (base_model included), "
        f"but got {len(seen)}: {', '.join(map(str, seen))}"
    )


def _check_required(stage: MergeStage, method: Method, loc: str) -> None:
    for spec in (p for p in method.params if p.required):
        for gloc, rows, shared in _groups(stage, method, loc):
            places = rows if spec.scope == "model" else [(gloc, None, shared)]
            for where, ref, blocks in places:
                if not any(spec.name in b for b in blocks):
                    model = f" for model '{ref}'" if ref is not None else ""
                    raise ConfigError(
                        f"{where}: merge method '{method.name}' needs parameter '{spec.name}' "
                        f"({spec.doc}){model}, but it is set neither here nor in 'parameters:'"
                    )


def _lookup(chain: list[dict], spec: Param) -> ParamValue | None:
    return next((b[spec.name] for b in chain if spec.name in b), spec.default)


def _check_della(stage: MergeStage, method: Method, loc: str) -> None:
    """DELLA keeps each entry with a probability in [density - eps, density + eps] (not 0 or 1)."""
    d_spec, e_spec = method.param("density"), method.param("epsilon")
    if d_spec is None or e_spec is None:
        return
    for where, ref, chain in (r for _, rows, _ in _groups(stage, method, loc) for r in rows):
        dens, eps = _lookup(chain, d_spec), _lookup(chain, e_spec)
        probes = {e.filter or "" for v in (dens, eps) if isinstance(v, list) for e in v
                  if isinstance(e, FilterEntry)} | {"\0"}  # fmt: skip
        for t in (0.0, 1.0):
            for probe in sorted(probes):
                try:
                    d, e = evaluate_setting(dens, probe, t), evaluate_setting(eps, probe, t)  # type: ignore[arg-type]
                except (KeyError, ValueError):
                    continue  # a filter list with no entry for this probe: nothing to check
                if (
                    not (is_number(d) and is_number(e))
                    or not 0 < d < 1
                    or (d - e > 0 and d + e < 1)
                ):
                    continue  # density >= 1 keeps everything; other kinds fail Param.check
                at = f" (t={t:g}{f', filter {probe!r}' if probe != chr(0) else ''})"
                at = at if isinstance(dens, list) or isinstance(eps, list) else ""
                raise ConfigError(
                    f"{where}.parameters: {method.name} needs density ± epsilon inside (0, 1) for "
                    f"model '{ref}', but density={d:g}, epsilon={e:g} gives [{d - e:g}, {d + e:g}]"
                    f"{at}"
                )


def _check_finite_tree(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, but got {value!r}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()  # fmt: skip
    for k, v in items:
        _check_finite_tree(v, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]")


def _validate_stage(stage: MergeStage, loc: str) -> None:
    try:
        method = get_method(stage.merge_method)
    except ConfigError as exc:
        raise ConfigError(f"{loc}.merge_method: {exc}") from None
    for key in ("dtype", "out_dtype"):
        value = getattr(stage, key)
        if value is not None and value not in DTYPES:
            raise ConfigError(f"{loc}.{key}: {did_you_mean(str(value), DTYPES, 'dtype')}")
    if method.needs_base and stage.base_model is None:
        raise ConfigError(
            f"{loc}: merge method '{method.name}' needs a base_model, but none is set"
        )
    if stage.slices is None:
        if not stage.models:
            raise ConfigError(f"{loc}.models: expected a non-empty list of models, but got []")
        _check_count(method, [m.model for m in stage.models], stage, f"{loc}.models")
    for i, sl in enumerate(stage.slices or []):
        sloc = f"{loc}.slices[{i}].sources"
        if not sl.sources:
            raise ConfigError(f"{sloc}: expected a non-empty list of sources, but got []")
        _check_count(method, [s.model for s in sl.sources], stage, sloc)
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            if not 0 <= a < b:
                raise ConfigError(
                    f"{sloc}[{j}].layer_range: expected 0 <= start < end, but got {[a, b]}"
                )
        spans = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(spans) > 1:
            got = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sl.sources)
            raise ConfigError(f"{sloc}: every source must span the same number of layers: {got}")
    for where, params, per_model in _param_blocks(stage, loc):
        _check_params(params, method, where, per_model)
    _check_required(stage, method, loc)
    _check_della(stage, method, loc)
    _check_finite_tree(stage.provenance, f"{loc}.provenance")


def validate_recipe(recipe: Recipe, where: str = "recipe") -> None:
    """Every check that needs no model files (load_recipe and parse_recipe run it). Call it on
    recipes built in code, e.g. by the search; ConfigError names the YAML location."""
    if not recipe.stages:
        raise ConfigError(f"{where}: the recipe has no stages")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        loc = stage_where(where, i, len(recipe.stages))
        if stage.name is not None and stage.name in names[:i]:
            first = names.index(stage.name) + 1
            raise ConfigError(
                f"{loc}.name: stage name '{stage.name}' is defined twice "
                f"(stages {first} and {i + 1})"
            )
        later = {n for n in names[i:] if n is not None}
        for mloc, ref in _model_locations(stage, loc):
            if ref.path in later:
                what = "this stage's own name" if ref.path == stage.name else "a later stage"
                raise ConfigError(
                    f"{mloc}: '{ref.path}' is used before it is defined ({what}); a stage can "
                    "only use stages named before it"
                )
        _validate_stage(stage, loc)


def validate_layer_ranges(
    stage: MergeStage, num_layers: dict[str, int], where: str | None = None
) -> None:
    """Once model configs are known: every slice source's layer_range lies in its model.

    num_layers maps a model (str(ModelRef), or its path) to its layer count; models missing
    from it are not checked. `where` prefixes locations (e.g. "recipe[stage 2]").
    """
    prefix = f"{where}." if where else ""
    for i, sl in enumerate(stage.slices or []):
        for j, src in enumerate(sl.sources):
            n = num_layers.get(str(src.model), num_layers.get(src.model.path))
            a, b = src.layer_range
            if n is not None and not 0 <= a < b <= n:
                raise ConfigError(
                    f"{prefix}slices[{i}].sources[{j}].layer_range: {[a, b]} is out of bounds "
                    f"for '{src.model}' ({n} layers)"
                )
