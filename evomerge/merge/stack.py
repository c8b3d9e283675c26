"""A passthrough slice recipe (a frankenmerge) read as a layer plan, without reading tensors.

The disk merge (plan.py `plan_slices`) and the search's live stacked model (loop/stacking.py)
must build the same model; this is the plan the live side and export's verification follow,
written apart from plan_slices so that each checks the other. mergekit 0.1.5's rules: output
layer k is layer `layer_range[0] + j` of its slice's model (j its place in the slice, the
slice's parameters resolved at t = j / (len - 1), t = 1 for a one-layer slice); embeddings come
from the first slice's model, the final norm and lm_head from the last slice's (a tied lm_head
is the output embedding: the first slice's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.merge.arch import before_layers, layer_index
from evomerge.recipe.schema import MergeStage, ParamValue, evaluate_setting

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Position:
    """One output layer: layer `layer` of model `key`, with its slice's `scale` setting."""

    key: str
    layer: int
    t: float
    scale: ParamValue | None

    def scale_of(self, tensor_name: str) -> float | None:
        """The factor a source tensor of this layer is multiplied by (None: copied as is)."""
        if self.scale is None:
            return None
        s = float(evaluate_setting(self.scale, tensor_name, self.t))  # type: ignore[arg-type]
        return None if s != s or s == 1.0 else s  # NaN: "no scale"; x * 1.0 == x


def stack_plan(stage: MergeStage) -> list[Position]:
    """Output layers of a one-source-per-slice passthrough stage, in order."""
    if stage.merge_method != "passthrough" or not stage.slices:
        raise ConfigError(f"expected a passthrough stage with slices, got {stage.merge_method}")
    out = []
    for sl in stage.slices:
        if len(sl.sources) != 1:
            raise ConfigError(f"a stacked slice has one source, but got {len(sl.sources)}")
        src = sl.sources[0]
        lo, hi = src.layer_range
        params = {**stage.parameters, **sl.parameters, **src.parameters}
        for j in range(hi - lo):
            t = j / (hi - lo - 1) if hi - lo > 1 else 1.0
            out.append(Position(str(src.model), lo + j, t, params.get("scale")))
    return out


def outer_keys(plan: list[Position], tied: bool) -> tuple[str, str, str]:
    """(embeddings, final norm, lm_head) source keys."""
    first, last = plan[0].key, plan[-1].key
    return first, last, first if tied else last


def layer_name(name: str, index: int) -> str:
    """`model.layers.<any>.rest` with the layer index replaced."""
    head, _, rest = name.partition(".layers.")
    return f"{head}.layers.{index}.{rest.partition('.')[2]}"


def stacked_tensors(
    plan: list[Position],
    tensors_of: Callable[[str], Mapping[str, torch.Tensor]],
    names: list[str],
    tied: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stacked model's (name, tensor) pairs from its sources' tensors; `names`: the first
    source's tensor names (the output's outer tensors and layer layout)."""
    embed, norm, head = outer_keys(plan, tied)
    layer0 = [n for n in names if layer_index(n) == 0]
    for n in names:
        if layer_index(n) is None and before_layers(n):
            yield n, tensors_of(embed)[n]
    for k, pos in enumerate(plan):
        src = tensors_of(pos.key)
        for n in layer0:
            name = layer_name(n, pos.layer)
            s = pos.scale_of(name)
            yield layer_name(n, k), src[name] if s is None else src[name] * s
    for n in names:
        if layer_index(n) is None and not before_layers(n):
            key = head if "lm_head" in n else norm
            yield n, tensors_of(key)[n]
