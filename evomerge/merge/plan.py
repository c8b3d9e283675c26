"""Planning a disk merge before any tensor work: the sources are compatible (architecture,
tensor names, shapes), each output tensor's inputs and gradient position, the layer map of
slice recipes (frankenmerges), and the output config (layer count, per-layer lists, vocab).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from evomerge.common.model_dir import num_layers
from evomerge.errors import ConfigError
from evomerge.merge.arch import _LAYER, before_layers, gradient_t, layer_index
from evomerge.merge.tokenizer import VocabPlan, is_vocab_tensor

if TYPE_CHECKING:
    import torch

    from evomerge.merge.io import CheckpointReader
    from evomerge.recipe.schema import MergeStage


@dataclass
class OutTensor:
    """One output tensor: where its inputs come from and how it is merged."""

    name: str
    shape: tuple[int, ...]
    sources: list[tuple[str, str]]  # (model key, tensor name) in the sub-stage's models order
    base: tuple[str, str] | None  # read separately when the base is not among the sources
    stage: MergeStage  # the stage (or a slice's view of it) that merges this tensor
    t: float


def rename_layer(name: str, index: int) -> str:
    """`model.layers.7.mlp.up_proj.weight` with index 2 -> `model.layers.2.mlp.up_proj.weight`."""
    m = _LAYER.search(name)
    assert m is not None  # only called on names that layer_index() recognised
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def _pattern(name: str) -> str:
    idx = layer_index(name)
    return name if idx is None else rename_layer(name, 0).replace(".layers.0.", ".layers.*.")


# ---- checks before any tensor work ------------------------------------------------------------


def _arch_name(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    cls = ", ".join(map(str, archs)) or "no architectures"
    return f"{cls}, model_type {config.get('model_type')!r}"


def check_compatible(readers: Mapping[str, CheckpointReader], by_pattern: bool) -> None:
    """Same architecture, same tensor names (or name patterns for slices), same shapes.

    Reads config.json and safetensors headers only. A mismatch is bad input (ConfigError,
    exit 2): it is the recipe that names models that cannot be merged."""
    keys = list(readers)
    first = readers[keys[0]]

    def arch(r: CheckpointReader) -> tuple[Any, Any]:
        return r.config.get("model_type"), tuple(r.config.get("architectures") or ())

    def names(r: CheckpointReader) -> dict[str, str]:  # pattern -> an example tensor name
        return {(_pattern(n) if by_pattern else n): n for n in r.keys()}

    ref_names = names(first)
    for k in keys[1:]:
        r = readers[k]
        if arch(r) != arch(first):
            raise ConfigError(
                f"models '{keys[0]}' ({_arch_name(first.config)}) and '{k}' "
                f"({_arch_name(r.config)}) have different architectures; a merge needs models "
                "of one architecture"
            )
        other = names(r)
        diff = sorted(set(ref_names) ^ set(other))
        if diff:
            where = keys[0] if diff[0] in ref_names else k
            raise ConfigError(
                f"models '{keys[0]}' and '{k}' have different tensors: '{diff[0]}' is only in "
                f"'{where}' ({len(diff)} differ)"
            )
        for pat, n in ref_names.items():
            if is_vocab_tensor(n):
                continue  # checked against the tokenizer plan
            s0, s1 = first.shape(n), r.shape(other[pat])
            if s0 != s1:
                raise ConfigError(
                    f"tensor '{n}' has shape {list(s0)} in '{keys[0]}' but {list(s1)} in '{k}': "
                    "the models differ in size"
                )


# ---- planning ---------------------------------------------------------------------------------


def _view(stage: MergeStage, si: int) -> MergeStage:
    """A slice seen as a plain stage: its sources are the models, its parameters on top."""
    from evomerge.recipe.schema import InputModel

    sl = stage.slices[si]  # type: ignore[index]
    models = [InputModel(s.model, dict(s.parameters)) for s in sl.sources]
    return replace(
        stage, models=models, slices=None, parameters={**stage.parameters, **sl.parameters}
    )


def plan_models(stage: MergeStage, readers: Mapping[str, CheckpointReader], base_key: str):
    from evomerge.recipe.schema import base_index

    keys = [str(m.model) for m in stage.models]
    n_layers = num_layers(readers[base_key].config) or 0  # no count: layers at t = 1
    separate_base = base_index(stage) == len(stage.models)  # an unlisted base: read apart
    out = []
    for name in readers[base_key].keys():
        base = (base_key, name) if separate_base else None
        t = gradient_t(name, n_layers)
        out.append(
            OutTensor(
                name, readers[base_key].shape(name), [(k, name) for k in keys], base, stage, t
            )
        )
    return out, None


def _outer_tensors(
    stage: MergeStage, readers: Mapping[str, CheckpointReader], base_key: str, si: int, pre: bool
) -> list[OutTensor]:
    """The non-layer tensors on one side of the layers, merged over slice `si`'s sources at
    t = 0, as mergekit 0.1.5's planner does (plan.py `plan_module`): the embeddings from the
    first slice, the final norm and lm_head from the last one, so a frankenmerge ends with
    the head its last layers were trained with."""
    from evomerge.recipe.schema import base_index

    view = _view(stage, si)
    keys = [str(m.model) for m in view.models]
    base_key_apart = str(stage.base_model) if base_index(view) == len(view.models) else None
    out = []
    for n in readers[base_key].keys():
        if layer_index(n) is not None or before_layers(n) != pre:
            continue
        # mergekit skips an optional weight (a tied lm_head) that none of the sources has
        if not any(n in readers[k].keys() for k in keys):
            continue
        base = (base_key_apart, n) if base_key_apart else None
        out.append(OutTensor(n, readers[keys[0]].shape(n), [(k, n) for k in keys], base, view, 0.0))
    return out


def plan_slices(stage: MergeStage, readers: Mapping[str, CheckpointReader], base_key: str):
    """Output layers numbered consecutively across slices; layer j of a slice of length L comes
    from source layer layer_range[0] + j of each source, at gradient t = j / (L - 1). The
    embeddings come from the first slice's sources, the final norm and lm_head from the last
    slice's (_outer_tensors)."""
    from evomerge.recipe.schema import base_index

    slices = stage.slices or []
    out = _outer_tensors(stage, readers, base_key, 0, pre=True)
    layer_map: list[tuple[str, int]] = []  # output layer -> (model key, source layer)
    for si, sl in enumerate(slices):
        view = _view(stage, si)
        keys = [str(s.model) for s in sl.sources]
        first = readers[keys[0]]
        lo, hi = sl.sources[0].layer_range
        suffixes = [n for n in first.keys() if layer_index(n) == lo]
        base = None
        if base_index(view) == len(view.models):  # not among this slice's sources: read apart
            base = str(stage.base_model)
        for j in range(hi - lo):
            t = j / (hi - lo - 1) if hi - lo > 1 else 1.0  # mergekit: a 1-layer slice is at t=1
            for n in suffixes:
                srcs = [
                    (k, rename_layer(n, s.layer_range[0] + j))
                    for k, s in zip(keys, sl.sources, strict=True)
                ]
                b = (base, rename_layer(n, lo + j)) if base else None
                name = rename_layer(n, len(layer_map))
                out.append(OutTensor(name, first.shape(n), srcs, b, view, t))
            layer_map.append((keys[0], lo + j))
    out += _outer_tensors(stage, readers, base_key, len(slices) - 1, pre=False)
    return out, layer_map


def output_config(
    base_cfg: dict,
    readers: Mapping[str, CheckpointReader],
    layer_map,
    vocab: VocabPlan | None,
    dtype: torch.dtype,
) -> dict:
    """Base config with the new layer count (per-layer lists re-indexed), vocab size, dtype."""
    cfg = copy.deepcopy(base_cfg)
    if layer_map is not None:
        # the top-level key this function rewrites (not common.model_dir.num_layers, which
        # also reads a nested text_config): per-layer lists beside it have this length
        old_n = int(base_cfg.get("num_hidden_layers", 0))
        cfg["num_hidden_layers"] = len(layer_map)
        for key, value in base_cfg.items():
            if (isinstance(value, list) and len(value) == old_n and old_n > 1) or (
                key == "layer_types" and isinstance(value, list)
            ):
                new = []
                for model_key, src in layer_map:
                    lst = readers[model_key].config.get(key)
                    lst = lst if isinstance(lst, list) and src < len(lst) else value
                    new.append(lst[min(src, len(lst) - 1)])
                cfg[key] = new
        if "max_window_layers" in cfg:  # Qwen2: layers past this index use sliding windows
            cfg["max_window_layers"] = min(cfg["max_window_layers"], len(layer_map))
    if vocab is not None:
        cfg["vocab_size"] = vocab.vocab_size
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = name
    return cfg
