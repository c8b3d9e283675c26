"""One line per trial as the search prints it: the recipe's values (gradients by their layer
groups), the proxy scores, the objective and the best so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.recipe import Recipe
from evomerge.search import keys
from evomerge.search.results import ranked
from evomerge.search.study import trial_state


def _fmt(v: Any, groups: int | None) -> str:
    """One recipe value for a trial line: a number, a gradient as its searched layer-group
    values (`(0.41,0.77)`: the first layer of each of `groups` groups, as decode.py writes
    them; runs of equal values when the group count is unknown), a filter list as
    `{mlp:0.5,*:0.3}`."""
    from evomerge.recipe import FilterEntry

    if not isinstance(v, list):
        one = f"{v:.3g}" if isinstance(v, float) else str(v)
        # a layered value decode wrote as a scalar (every group equal) still shows its groups
        return "(" + ",".join([one] * groups) + ")" if groups and groups > 1 else one
    if v and isinstance(v[0], FilterEntry):
        return "{" + ",".join(f"{e.filter or '*'}:{_fmt(e.value, groups)}" for e in v) + "}"
    n = len(v)
    if groups and groups <= n:
        picks = [v[-(-g * n // groups)] for g in range(groups)]
    else:
        picks = [x for i, x in enumerate(v) if i == 0 or x != v[i - 1]]
    return "(" + ",".join(_fmt(x, None) for x in picks) + ")"


def space_groups(space: Any, method: str) -> dict[str, int]:
    """{parameter: layer groups} of a method's searched parameters in a SpaceSpec (a relative
    parameter varies with its bound's groups)."""
    specs = {p.name: p for p in space.params.get(method, [])}
    out = {}
    for p in specs.values():
        dep = specs.get(p.relative_to or "")
        k = max(
            p.groups if p.searched else 1, dep.groups if dep is not None and dep.searched else 1
        )
        if k > 1:
            out[p.name] = k
    return out


def summary(recipe: Recipe, limit: int = 6, groups: dict[str, int] | None = None) -> str:
    """Short params text: per-model values, then global ones; `groups` ({parameter: layer
    groups}) shows a per-layer value as its group values."""
    st = recipe.final
    g = groups or {}
    parts = [st.merge_method]
    if st.slices is not None:  # a layer stack: its slices, after the weight stage's summary
        head = summary(Recipe(recipe.stages[:-1]), limit, groups) if len(recipe.stages) > 1 else ""
        return f"{head} stack={'+'.join(_slice_text(sl) for sl in st.slices)}".strip()
    for name in list(st.models[0].parameters)[:limit] if st.models else []:
        vals = ",".join(_fmt(m.parameters.get(name), g.get(name)) for m in st.models)
        parts.append(f"{name}=({vals})")
    parts += [f"{k}={_fmt(v, g.get(k))}" for k, v in st.parameters.items()]
    return " ".join(parts)


def _slice_text(sl: Any) -> str:
    """`add[0:2]`, `merged[3:4]x0.78` (the slice's scale on o_proj/down_proj)."""
    src = sl.sources[0]
    text = f"{Path(str(src.model)).name}[{src.layer_range[0]}:{src.layer_range[1]}]"
    scale = src.parameters.get("scale")
    return text + (f"x{scale[0].value:.2f}" if isinstance(scale, list) else "")


def trial_line(
    st: Any, number: int, recipe: Recipe | None, seconds: float, space: Any = None
) -> str:
    """`#12 COMPLETE ties weight=(...) | add 0.61 rev 0.40 | obj 0.647 | 3.2s | best #9 0.70`
    (`space`: the SpaceSpec, whose layer groups the per-layer values are shown by)."""
    t = _get(st, number)
    state = trial_state(t)
    scores = " ".join(f"{k} {v:.3f}" for k, v in keys.proxy_scores(t.user_attrs).items())
    vals = " ".join(f"{v:.4f}" for v in (t.values or [])) if state == "COMPLETE" else ""
    what = t.user_attrs.get(keys.FAIL_KIND, "")
    if recipe is not None:
        groups = space_groups(space, recipe.final.merge_method) if space is not None else None
        what = summary(recipe, groups=groups)
    line = f"#{t.number} {state} {what} | {scores} | obj {vals or '-'} | {seconds:.1f}s"
    if t.user_attrs.get(keys.FAIL_REASON):
        line += f" | {t.user_attrs[keys.FAIL_REASON]}"
    top = ranked(st) if len(st.directions) == 1 else []
    return line + (f" | best #{top[0].number} {top[0].value:.4f}" if top else "")


def _get(st: Any, number: int) -> Any:
    for t in st.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise KeyError(number)
