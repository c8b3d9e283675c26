"""The single place where a recipe stage becomes per-tensor MergeInputs (mergekit's rules).

Inputs: the stage's `models:` in order; an unlisted base_model is appended as the last
input (as mergekit does, recipe.schema.input_refs), so base-ignoring methods (linear,
karcher) merge it too.
Parameter lookup for one tensor at gradient position t, most specific first:
model-scope: the model's own `parameters` -> the stage's `parameters` -> the declared default;
global-scope: the stage's `parameters` -> the declared default. A filter list with no entry
matching the tensor falls through to the next level, as in mergekit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.contract import MergeInputs, Method, Param
from evomerge.merge.table import get_method
from evomerge.recipe.schema import base_index, evaluate_setting, input_refs

if TYPE_CHECKING:
    import torch

    from evomerge.merge.buffers import Buffers
    from evomerge.merge.sparsify import SparsifyCache
    from evomerge.recipe.schema import MergeStage, ModelRef, ParamValue, Scalar

_MISSING = object()


def _evaluate(value: ParamValue, tensor_name: str, t: float) -> Scalar | None:
    """evaluate_setting, with None where a filter list has no entry for this tensor."""
    try:
        return evaluate_setting(value, tensor_name, t)
    except KeyError:
        return None


def _lookup(blocks: list[dict], spec: Param, tensor_name: str, t: float):
    for block in blocks:
        if spec.name in block:
            value = _evaluate(block[spec.name], tensor_name, t)
            if value is not None:
                return value
    return _MISSING


def _coerce(spec: Param, value: Scalar, where: str) -> Scalar:
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)  # a gradient interpolates ints through floats
    if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    spec.check(value, where)
    return value


def _resolve_global(stage: MergeStage, method: Method, spec: Param, name: str, t: float):
    value = _lookup([stage.parameters], spec, name, t)
    if value is _MISSING:
        if spec.required:
            raise ConfigError(
                f"merge method '{method.name}' needs parameter '{spec.name}' ({spec.doc}) for "
                f"tensor '{name}', but it is set nowhere in 'parameters:'"
            )
        return spec.default
    return _coerce(spec, value, f"parameters.{spec.name} (tensor '{name}')")


def _resolve_model(stage, method, spec, name, t, refs, bi) -> list[float]:
    """One value per input row; rows the method does not read get the default (or NaN)."""
    listed = {m.model: m.parameters for m in stage.models}
    out: list[float] = []
    for row, ref in enumerate(refs):
        if row == bi and not method.base_is_input:
            out.append(math.nan if spec.default is None else float(spec.default))
            continue
        value = _lookup([listed.get(ref, {}), stage.parameters], spec, name, t)
        if value is _MISSING:
            if spec.required:
                raise ConfigError(
                    f"merge method '{method.name}' needs parameter '{spec.name}' ({spec.doc}) "
                    f"for model '{ref}' at tensor '{name}', but it is set neither in its "
                    "'parameters:' nor in the top-level 'parameters:'"
                )
            value = spec.default
        else:
            value = _coerce(spec, value, f"'{ref}'.parameters.{spec.name} (tensor '{name}')")
        out.append(math.nan if value is None else float(value))
    return out


def check_inputs(method: Method, refs: list[ModelRef], bi: int | None) -> None:
    """A base if the method needs one; min/max_models count every input, the base included."""
    if method.needs_base and bi is None:
        raise ConfigError(f"merge method '{method.name}' needs a base_model, but none is set")
    lo, hi = method.min_models, method.max_models
    if len(refs) < lo or (hi is not None and len(refs) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        raise ConfigError(
            f"merge method '{method.name}' takes {want} models (base_model included), but got "
            f"{len(refs)}: {', '.join(map(str, refs))}"
        )


def inputs_for_rows(
    stage: MergeStage, tensor_name: str, rows: torch.Tensor, t: float
) -> MergeInputs:
    """MergeInputs over already-arranged input rows  # (len(input_refs(stage)), *shape)"""
    import torch

    method = get_method(stage.merge_method)
    refs = input_refs(stage)
    bi = base_index(stage)
    if rows.shape[0] != len(refs):
        raise MergeError(
            f"tensor '{tensor_name}': expected {len(refs)} input rows "
            f"({', '.join(map(str, refs))}), but got {rows.shape[0]}"
        )
    check_inputs(method, refs, bi)
    params, model_params = {}, {}
    for spec in method.params:
        if spec.scope == "global":
            params[spec.name] = _resolve_global(stage, method, spec, tensor_name, t)
        else:
            values = _resolve_model(stage, method, spec, tensor_name, t, refs, bi)
            model_params[spec.name] = torch.tensor(values, dtype=torch.float64)
    return MergeInputs(
        tensor_name=tensor_name,
        models=rows,
        base=None if bi is None else rows[bi],
        base_index=bi,
        model_params=model_params,
        params=params,
        seed=0 if stage.random_seed is None else int(stage.random_seed),
    )


def stack_rows(stage: MergeStage, tensor_name: str, models, base):
    """Listed models  # (n, *shape), plus an unlisted base appended -> the input rows:
    float32, or the models' own bfloat16/float16 for `fused` methods (exact either way)."""
    import torch

    n_listed = len(stage.models)
    if models.shape[0] != n_listed:
        raise MergeError(
            f"tensor '{tensor_name}': expected one row per entry of models: ({n_listed}), "
            f"but got {models.shape[0]}"
        )
    keep = models.dtype in (torch.bfloat16, torch.float16) and get_method(stage.merge_method).fused
    dtype = models.dtype if keep else torch.float32
    bi = base_index(stage)
    if bi is None or bi < n_listed:
        return models.to(dtype)
    if base is None:
        raise MergeError(f"tensor '{tensor_name}': base_model '{stage.base_model}' not given")
    if tuple(base.shape) != tuple(models.shape[1:]):
        raise MergeError(
            f"tensor '{tensor_name}': base shape {tuple(base.shape)} does not match the "
            f"models' {tuple(models.shape[1:])}"
        )
    if _next_row(models, base, dtype):  # the caller laid the base out after the models: no copy
        return models.as_strided((n_listed + 1, *base.shape), models.stride())
    rows = torch.empty((n_listed + 1, *base.shape), dtype=dtype, device=models.device)
    rows[:n_listed] = models
    rows[n_listed] = base
    return rows


def _next_row(models: torch.Tensor, base: torch.Tensor, dtype) -> bool:
    """True when base is the `dtype` row right after `models` in one contiguous storage."""
    if models.dtype != dtype or base.dtype != dtype or models.shape[0] == 0:
        return False
    if not (models.is_contiguous() and base.is_contiguous()):
        return False
    same = models.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return same and base.data_ptr() == models.data_ptr() + models.numel() * models.element_size()


def build_inputs(
    stage: MergeStage, tensor_name: str, models: torch.Tensor, base: torch.Tensor | None, t: float
) -> MergeInputs:
    """Resolve every parameter of the stage's method for one tensor at gradient position t.

    models: one row per entry of `models:`  # (n, *shape); base: the base_model tensor (used
    when base_model is not listed in `models:`). Model-scope parameters become (rows,)
    float64 tensors (NaN where unset and without default); declared defaults fill the rest.
    """
    rows = stack_rows(stage, tensor_name, models, base)
    return inputs_for_rows(stage, tensor_name, rows, t)


def merge_tensor(
    stage: MergeStage,
    tensor_name: str,
    models: torch.Tensor,
    base: torch.Tensor | None,
    t: float,
    cache: SparsifyCache | None = None,
    scratch: Buffers | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one output tensor (the disk path). Returns a float32 tensor: a new one, or with
    `scratch` possibly one of its reused buffers (consume it before the next call) -- or
    `out` (any float dtype, shaped like the result), which `fused` methods write directly."""
    import torch

    inputs = build_inputs(stage, tensor_name, models, base, t)
    inputs.cache = cache
    inputs.scratch = scratch
    inputs.out = out
    merged = get_method(stage.merge_method).fn(inputs)
    return merged if merged is out else merged.to(torch.float32)
