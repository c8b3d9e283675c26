"""Joint constraints of a method's parameters, checked against a space's whole box at load time.

Each parameter's own bounds are checked where it is parsed (params.py); what one value cannot
show is a constraint between values: della's keep probabilities density ± epsilon must stay
inside (0, 1) for every density below 1, and a method's input count (slerp merges the base with
one model, model_stock needs two besides the base). A point of the box that breaks one would
fail its trial mid-search, so the space is refused up front, naming the bound that fixes it.
A searched epsilon, or one left unset while density is searched, follows density as a fraction
of min(density, 1 - density) (params.RELATIVE): every point of such a box is valid.
"""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.merge.contract import Method
from evomerge.merge.table import get_method
from evomerge.search.params import ParamSpec


def check_box(
    source: str, models: list[str], base_model: str | None, params: dict[str, list[ParamSpec]]
) -> None:
    """ConfigError (one line, naming the fix) if some point of the space's box cannot merge.
    `params`: method name -> its ParamSpecs (SpaceSpec.params)."""
    inputs = list(dict.fromkeys(models))
    if base_model and base_model not in inputs:
        inputs.append(base_model)  # counted as the merge counts: an unlisted base is an input
    for name, specs in params.items():
        method = get_method(name)
        _check_count(source, inputs, method)
        _check_della(source, method, {s.name: s for s in specs})


def _check_count(source: str, inputs: list[str], method: Method) -> None:
    want = method.model_count_rule(len(inputs))
    if want is None:
        return
    raise ConfigError(
        f"{source}: method '{method.name}' takes {want} models (base_model included), but "
        f"the space gives {len(inputs)}: {', '.join(inputs)}; list {want} models or choose "
        "another method"
    )


def density_range(d: ParamSpec | None, default: float) -> list[tuple[float, float]]:
    """The density intervals a cell can take: the box, a `rest:` value, or the fixed value."""
    if d is None:
        return [(default, default)]
    if not d.searched:
        v = float(d.fixed)
        return [(v, v)]
    out = [(d.low, d.high)]
    return out + ([(float(d.rest), float(d.rest))] if d.rest is not None else [])


def della_gap(lo: float, hi: float, eps: float) -> tuple[float, float] | None:
    """The part of [lo, hi] where 0 < density < 1 and density ± eps leaves (0, 1), or None.
    mergekit keeps everything at density >= 1 and nothing at density <= 0 (any epsilon)."""
    if eps <= 0:
        return None
    low_bad = (max(lo, 0.0), min(hi, eps)) if lo <= eps and hi > 0 else None
    high_bad = (max(lo, 1 - eps), min(hi, 1.0)) if hi >= 1 - eps and lo < 1 else None
    return low_bad or high_bad


def _check_della(source: str, method: Method, params: dict[str, ParamSpec]) -> None:
    d_param, e_param = method.param("density"), method.param("epsilon")
    if d_param is None or e_param is None:
        return
    eps = params.get("epsilon")
    if eps is not None and (eps.relative_to or eps.searched):
        return  # a fraction of min(density, 1 - density): never leaves (0, 1)
    e = float(eps.fixed) if eps is not None else float(e_param.default or 0.0)
    what = f"epsilon={e:g}" + ("" if eps is not None else " (its default)")
    d = params.get("density")
    for lo, hi in density_range(d, float(d_param.default or 1.0)):
        gap = della_gap(lo, hi, e)
        if gap is None:
            continue
        where = (
            f"density is searched in [{lo:g}, {hi:g}], which reaches [{gap[0]:g}, {gap[1]:g}]"
            if lo < hi
            else f"density={lo:g}"
        )
        raise ConfigError(
            f"{source}: method '{method.name}' needs density ± epsilon inside (0, 1) "
            f"whenever 0 < density < 1, but {what} and {where}; keep density in "
            f"({e:g}, {1 - e:g}) or exactly 1, or leave epsilon unset / search it (it then "
            "follows density as a fraction of min(density, 1 - density))"
        )
