"""Searched parameters: one entry of a space's `parameters:` -> a validated ParamSpec.

Kinds, bounds and defaults come from the merge method registry (never re-declared here);
a value is searched (`{low, high, ...}`) or fixed (a plain value or `{value: ...}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, check_keys
from evomerge.merge.contract import Method, Param

PARAM_KEYS = (
    "low",
    "high",
    "log",
    "step",
    "choices",
    "simplex",
    "layer_groups",
    "filters",
    "rest",
    "shared",
    "value",
)

# a parameter searched as a fraction of a bound set by another: della's epsilon must stay below
# min(density, 1 - density), so it is sampled as eps = frac * min(d, 1 - d) and never fails
RELATIVE = {"epsilon": "density"}
# left unset while its bound is searched, such a parameter follows the bound too, at the fraction
# that gives the table's default at the bound's midpoint (della: 0.15 at density 0.5, i.e.
# epsilon = 0.3 * min(density, 1 - density)): a fixed 0.15 would break every density above 0.85
RELATIVE_MIDPOINT = 0.5


@dataclass(frozen=True)
class ParamSpec:
    name: str
    method: str
    scope: str  # "model": one value per input model unless shared; "global"
    kind: str
    searched: bool
    fixed: Any = None
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    simplex: bool = False
    per_model: bool = False
    groups: int = 1
    filters: tuple[str, ...] = ()
    rest: float | None = None  # fixed value of the filter list's default entry (else searched)
    relative_to: str | None = None


def _bound(value: Any, fallback: float | None, param: Param, where: str, side: str) -> float:
    v = fallback if value is None else value
    if v is None:
        raise ConfigError(f"{where}: '{param.name}' has no default search bounds; give '{side}'")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}.{side}: expected a number, but got {v!r}")
    return float(v)


def _param_spec(
    name: str, raw: Any, method: Method, n_models: int, defaults: dict, where: str
) -> ParamSpec:
    param = method.param(name)
    assert param is not None  # callers check membership first
    base = dict(name=name, method=method.name, scope=param.scope, kind=param.kind)
    if not isinstance(raw, dict):  # a fixed value, validated by the method's declaration
        param.check(raw, where)
        return ParamSpec(**base, searched=False, fixed=raw)
    check_keys(raw, PARAM_KEYS, where, "search-space key")
    if "value" in raw:
        param.check(raw["value"], where)
        return ParamSpec(**base, searched=False, fixed=raw["value"])
    groups = raw.get("layer_groups", defaults.get("layer_groups", 1))
    filters = raw.get("filters", defaults.get("filters", ()))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ConfigError(f"{where}.layer_groups: expected an integer >= 1, but got {groups!r}")
    if not isinstance(filters, (list, tuple)) or not all(isinstance(f, str) for f in filters):
        raise ConfigError(f"{where}.filters: expected a list of names, but got {filters!r}")
    common = dict(groups=groups, filters=tuple(filters), rest=raw.get("rest"))
    if common["rest"] is not None:
        param.check(common["rest"], f"{where}.rest")
    if param.kind in ("bool", "str") or "choices" in raw:
        choices = tuple(raw.get("choices") or ((True, False) if param.kind == "bool" else ()))
        if not choices:
            raise ConfigError(f"{where}: '{name}' is a {param.kind}; give 'choices: [...]'")
        for c in choices:
            param.check(c, where)
        return ParamSpec(
            **base, searched=True, choices=choices, per_model=param.scope == "model", **common
        )
    simplex = bool(raw.get("simplex", False))
    relative = RELATIVE.get(name) if method.param(RELATIVE.get(name, "")) else None
    if relative:  # bounds are fractions of the moving bound, in [0, 1)
        low, high = float(raw.get("low", 0.0)), float(raw.get("high", 0.9))
        if not 0.0 <= low <= high < 1.0:
            raise ConfigError(
                f"{where}: '{name}' is searched as a fraction of min({relative}, 1 - {relative});"
                f" 0 <= low <= high < 1 must hold, but got low={low}, high={high}"
            )
    else:
        lo_default = param.search_low if param.search_low is not None else param.low
        hi_default = param.search_high if param.search_high is not None else param.high
        low = _bound(raw.get("low"), lo_default, param, where, "low")
        high = _bound(raw.get("high"), hi_default, param, where, "high")
        if low > high:
            raise ConfigError(f"{where}: low <= high must hold, but got low={low}, high={high}")
        if not simplex:
            param.check(int(low) if param.kind == "int" else low, f"{where}.low")
            param.check(int(high) if param.kind == "int" else high, f"{where}.high")
    if simplex:
        if param.scope != "model" or raw.get("shared"):
            raise ConfigError(
                f"{where}: simplex needs a per-model parameter, but '{name}' is "
                f"{'shared' if raw.get('shared') else 'global'}"
            )
        if n_models < 2:
            raise ConfigError(f"{where}: simplex needs at least 2 models, but got {n_models}")
    if bool(raw.get("log")) and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, but got low={low}")
    return ParamSpec(
        **base,
        searched=True,
        low=low,
        high=high,
        log=bool(raw.get("log", False)),
        step=raw.get("step"),
        simplex=simplex,
        relative_to=relative,
        per_model=param.scope == "model" and not raw.get("shared", False),
        **common,
    )


def _searched_by_default(param: Param, space_names_some: bool) -> bool:
    """A parameter the space does not name is searched with the method's declared bounds when
    the method cannot run without it (required: weight, t), or, in a space that names no
    parameter for the method, when the table gives it a search range (density, lambda...):
    a minimal space searches what the method reads. A space that names parameters keeps the
    optional ones it leaves out at their defaults (its author chose the dimensions)."""
    if param.required:
        return True
    ranged = param.search_low is not None and param.kind in ("float", "int")
    return ranged and not space_names_some


def method_params(data: dict, method: Method, n_models: int, src: str) -> list[ParamSpec]:
    shared = data.get("parameters") or {}
    own = (data.get("method_parameters") or {}).get(method.name) or {}
    granularity = {k: shared.pop(k) for k in ("layer_groups", "filters") if k in shared}
    specs = []
    for section, entries in (("parameters", shared), (f"method_parameters.{method.name}", own)):
        for name, raw in entries.items():
            if method.param(name) is None:
                continue  # checked against the union of methods by the caller
            specs.append(
                _param_spec(name, raw, method, n_models, granularity, f"{src}: {section}.{name}")
            )
    given = {s.name for s in specs}
    for param in method.params:  # what the method reads and the space leaves out (see below)
        if param.name not in given and _searched_by_default(param, bool(shared or own)):
            where = f"{src}: method '{method.name}' parameter {param.name}"
            specs.append(_param_spec(param.name, {}, method, n_models, granularity, where))
    for spec in specs:
        if spec.relative_to and not any(s.name == spec.relative_to for s in specs):
            specs.append(
                ParamSpec(
                    name=spec.relative_to,
                    method=method.name,
                    scope="model",
                    kind="float",
                    searched=False,
                    fixed=method.param(spec.relative_to).default or 1.0,
                )
            )
    specs += _following(specs, method)
    return sorted(specs, key=lambda s: s.relative_to is not None)


def _following(specs: list[ParamSpec], method: Method) -> list[ParamSpec]:
    """Fixed relative specs for the RELATIVE parameters a space leaves unset while their
    bound is searched (see RELATIVE_MIDPOINT); decode writes their absolute values."""
    named = {s.name: s for s in specs}
    out = []
    for name, bound in RELATIVE.items():
        param, dep = method.param(name), named.get(bound)
        if param is None or name in named or dep is None or not dep.searched:
            continue
        frac = float(param.default or 0.0) / min(RELATIVE_MIDPOINT, 1 - RELATIVE_MIDPOINT)
        out.append(
            ParamSpec(
                name=name,
                method=method.name,
                scope=param.scope,
                kind=param.kind,
                searched=False,
                fixed=frac,
                relative_to=bound,
                per_model=param.scope == "model",
            )
        )
    return out
