"""The layer-stacking (frankenmerge, data-flow) genome: space syntax, Optuna dimensions, decoding.

Space syntax (a top-level `stacking:` key of a search-space YAML):

    stacking:
      sources: [zoo/add, zoo/rev, merged]  # optional; default: every model, + merged (hybrid)
      depth: {low: 4, high: 8}             # output layer count D, searched in [low, high]
      window: 1                            # optional (default 1): offsets in [-window, window]
      scale: {low: 0.5, high: 1.5}         # optional: per-position residual-branch scale

`sources` are entries of `models:` or `base_model:`, or `merged`: this trial's weight-merged
candidate (the weight genome of the same space: Sakana's hybrid of parameter-space and
data-flow-space merging). A space with `stacking:` and no `method:` is stacking-only (no weight
genome, `merged` not allowed); with `method:` it is a hybrid.

Optuna dimensions (names stored in studies, never to change):
- `stack.depth`: integer D in [depth.low, depth.high];
- for each position p < depth.high: `stack.p{p:02d}.source` (categorical over the sources'
  labels), `stack.p{p:02d}.offset` (integer in [-window, window]) and, with `scale:`,
  `stack.p{p:02d}.scale` (float). Positions >= D are ignored by decoding.

Decoding: position p < D takes layer clamp(anchor(p) + offset, 0, L - 1) of its source, where
L is the sources' layer count and anchor(p) = round(p * (L - 1) / (D - 1)) (half up; 0 when
D = 1) spreads the D positions evenly over the source depth. Why this encoding:
- every point of the box is a valid model (no infeasible region for the sampler to learn);
- a layer stays near the depth it was trained at: the residual streams of fine-tunes of one
  base are most alike at equal depth (what Sakana's data-flow merge and working frankenmerges
  exploit), while the offset still allows repeats (offset -1 after 0) and skips;
- the identity stack of any source (D = L, offsets 0) is one point: a baseline, so the search
  starts from the weight merge alone (hybrid) or each expert alone;
- categorical sources and small integer offsets suit TPE (the default sampler of stacking
  spaces); CMA-ES has no categorical dimensions and is refused.
Scale multiplies the layer's residual-branch outputs (o_proj, down_proj weights and biases).
Sakana scales the hidden states passed between layers; in a pre-norm RMSNorm model scaling the
stream is equivalent (up to the norm's epsilon) to scaling what the branches add to it, and
mergekit's passthrough writes exactly that as `parameters: {scale: ...}` with filters, so the
scored candidate and the exported recipe have equal tensors.

The decoded recipe is one `passthrough` stage with one slice per run of consecutive layers of
one source and scale; a hybrid first writes the weight stage with `name: merged`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, check_keys, did_you_mean
from evomerge.recipe.schema import FilterEntry, MergeStage, ModelRef, Recipe, Slice, SliceSource

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

MERGED = "merged"  # the stage name of the weight candidate, and its source label
SCALED = ("o_proj", "down_proj")  # the residual-branch outputs a position's scale multiplies
KEYS = ("sources", "depth", "window", "scale")
CMAES_REFUSAL = (
    "sampler cmaes cannot search a stacking genome (its layer sources are categorical); use tpe"
)


@dataclass(frozen=True)
class StackSpec:
    sources: tuple[str, ...]  # model refs, or MERGED
    labels: tuple[str, ...]  # their Optuna choice labels
    depth_low: int
    depth_high: int
    window: int
    scale: tuple[float, float] | None
    num_layers: int  # L: the sources' layer count
    hybrid: bool  # the space also searches weights (MERGED is possible)


def _bounds(raw: Any, where: str, integer: bool, low_min: float) -> tuple[Any, Any]:
    check_keys(raw, ("low", "high"), where, "bound key")
    lo, hi = raw.get("low"), raw.get("high")
    kinds = int if integer else (int, float)
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, kinds) or v != v or v < low_min:
            what = "integers" if integer else "numbers"
            raise ConfigError(
                f"{where}: expected low and high {what} >= {low_min:g}, but got {raw!r}"
            )
    if lo > hi:
        raise ConfigError(f"{where}: expected low <= high, but got {raw!r}")
    return lo, hi


def parse_stacking(
    raw: Any,
    models: list[str],
    labels: list[str],
    base: str | None,
    hybrid: bool,
    num_layers: int | None,
    src: str,
) -> StackSpec:
    """Validate a `stacking:` mapping (one-line ConfigErrors naming the key)."""
    where = f"{src}: stacking"
    check_keys(raw, KEYS, where, "stacking key")
    if "depth" not in raw:
        raise ConfigError(f"{where}: expected depth: {{low: N, high: M}}, but got none")
    if not num_layers:
        raise ConfigError(f"{where} needs the layer count: give 'num_layers' (no config found)")
    lo, hi = _bounds(raw["depth"], f"{where}.depth", True, 1)
    window = raw.get("window", 1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ConfigError(f"{where}.window: expected an integer >= 0, but got {window!r}")
    scale = raw.get("scale")
    scale = None if scale is None else _bounds(scale, f"{where}.scale", False, 0)
    known = [*models, *([base] if base and base not in models else [])]
    names = dict(zip(models, labels, strict=True))
    default = [*models, *([MERGED] if hybrid else [])]
    sources = raw.get("sources", default)
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{where}.sources: expected a list of models, but got {sources!r}")
    for s in sources:
        if s == MERGED and not hybrid:
            raise ConfigError(
                f"{where}.sources: '{MERGED}' is the weight-merged candidate, but this space "
                "searches no weights (give 'method:' for a hybrid space)"
            )
        if s != MERGED and s not in known:
            raise ConfigError(
                f"{where}.sources: {did_you_mean(str(s), [*known, MERGED], 'source')}"
            )
    if len(set(sources)) < len(sources):
        raise ConfigError(f"{where}.sources: each source may be listed once, but got {sources}")
    labs = tuple(MERGED if s == MERGED else names.get(s, "base") for s in sources)
    return StackSpec(
        tuple(sources), labs, lo, hi, window, scale, int(num_layers), hybrid
    )  # fmt: skip


def pos_name(p: int, what: str) -> str:
    return f"stack.p{p:02d}.{what}"


def distributions(stack: StackSpec) -> dict[str, BaseDistribution]:
    """The stacking genome's Optuna distributions, in a fixed order."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, BaseDistribution] = {}
    out["stack.depth"] = IntDistribution(stack.depth_low, stack.depth_high)
    for p in range(stack.depth_high):
        out[pos_name(p, "source")] = CategoricalDistribution(list(stack.labels))
        if stack.window > 0:
            out[pos_name(p, "offset")] = IntDistribution(-stack.window, stack.window)
        if stack.scale is not None:
            out[pos_name(p, "scale")] = FloatDistribution(*map(float, stack.scale))
    return out


def identity(stack: StackSpec, source: str | None) -> dict[str, Any]:
    """Trial params of one source's own layers in order (D = L, clipped to the depth bounds):
    the baselines. source None: `merged` in a hybrid, else the first source."""
    label = stack.labels[stack.sources.index(source)] if source in stack.sources else None
    label = label or (MERGED if stack.hybrid and MERGED in stack.labels else stack.labels[0])
    out: dict[str, Any] = {
        "stack.depth": min(max(stack.num_layers, stack.depth_low), stack.depth_high)
    }
    for p in range(stack.depth_high):
        out[pos_name(p, "source")] = label
        if stack.window > 0:
            out[pos_name(p, "offset")] = 0
        if stack.scale is not None:
            out[pos_name(p, "scale")] = min(max(1.0, stack.scale[0]), stack.scale[1])
    return out


def probe(stack: StackSpec) -> dict[str, Any]:
    """Stacking params for the start-up self-check: the deepest stack, the sources in turn,
    offsets that reuse layers and scales that are not 1, so the check runs every path of the
    live stack (shared views, reused layers, scaled copies, outer tensors of two sources)."""
    out: dict[str, Any] = {"stack.depth": stack.depth_high}
    for p in range(stack.depth_high):
        out[pos_name(p, "source")] = stack.labels[p % len(stack.labels)]
        if stack.window > 0:
            out[pos_name(p, "offset")] = -stack.window if p % 2 else 0
        if stack.scale is not None:
            out[pos_name(p, "scale")] = stack.scale[p % 2]
    return out


def anchor(p: int, depth: int, n_layers: int) -> int:
    """round(p * (L - 1) / (D - 1)), half up, in integers (no float rounding surprises)."""
    if depth <= 1:
        return 0
    return (2 * p * (n_layers - 1) + depth - 1) // (2 * (depth - 1))


def positions(stack: StackSpec, params: Mapping[str, Any]) -> list[tuple[str, int, float | None]]:
    """(source, layer, scale or None) for each output position."""
    try:
        depth = int(params["stack.depth"])
        out = []
        for p in range(depth):
            label = params[pos_name(p, "source")]
            offset = int(params.get(pos_name(p, "offset"), 0))
            layer = min(max(anchor(p, depth, stack.num_layers) + offset, 0), stack.num_layers - 1)
            scale = params[pos_name(p, "scale")] if stack.scale is not None else None
            if label not in stack.labels:
                raise ConfigError(f"stacking source {label!r} is not in {list(stack.labels)}")
            src = stack.sources[stack.labels.index(label)]
            out.append((src, layer, None if scale is None else float(scale)))
        return out
    except KeyError as exc:
        raise ConfigError(
            f"trial parameters lack {exc.args[0]!r} (a different search space?)"
        ) from None


def scale_setting(scale: float) -> list[FilterEntry]:
    """The passthrough `scale` of a scaled slice: the residual-branch outputs only."""
    return [*(FilterEntry(f, scale) for f in SCALED), FilterEntry(None, 1.0)]


def stack_stage(stack: StackSpec, params: Mapping[str, Any], dtype: str | None) -> MergeStage:
    """One passthrough stage: a slice per run of consecutive layers of one source and scale."""
    runs: list[list[Any]] = []  # [source, first layer, end layer, scale]
    for src, layer, scale in positions(stack, params):
        last = runs[-1] if runs else None
        if last is not None and last[0] == src and last[3] == scale and last[2] == layer:
            last[2] = layer + 1
        else:
            runs.append([src, layer, layer + 1, scale])
    slices = [
        Slice(
            [
                SliceSource(
                    ModelRef.parse(src),
                    (lo, hi),
                    {} if scale is None or scale == 1.0 else {"scale": scale_setting(scale)},
                )
            ]
        )
        for src, lo, hi, scale in runs
    ]
    return MergeStage(merge_method="passthrough", slices=slices, dtype=dtype)


def stack_recipe(
    stack: StackSpec, weights: MergeStage | None, params: Mapping[str, Any], dtype: str | None
) -> Recipe:
    """The recipe of a stacking trial: [weight stage named `merged`,] passthrough stage."""
    final = stack_stage(stack, params, dtype)
    if weights is None:
        return Recipe(stages=[final])
    weights.name = MERGED
    return Recipe(stages=[weights, final])


def split_recipe(recipe: Recipe) -> tuple[MergeStage | None, MergeStage | None]:
    """(weight stage or None, stacking stage or None) of a scored recipe."""
    final = recipe.final
    if final.slices is None or final.merge_method != "passthrough":
        return final, None
    return (recipe.stages[0] if len(recipe.stages) > 1 else None), final
