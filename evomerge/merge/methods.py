"""The tensor functions of the merge methods: each a pure function of MergeInputs.

Their parameters, flags and names are declared once, in the method table (table.py), which
names each function here as "evomerge.merge.methods:<function>". Semantics follow mergekit
0.1.5 (mergekit/merge_methods/*.py); all math in float32, except the whole-tensor dot
products of the spherical methods, model_stock and sce (twopass.py, sce.py: float64, summed
in an order-free way so that row-chunked merges give the same bits).
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge import twopass
from evomerge.merge.contract import MergeInputs
from evomerge.merge.gta import EAGER, gta
from evomerge.merge.kernel import Spec


def _empty(inputs: MergeInputs, key: str, shape: tuple[int, ...], like: torch.Tensor):
    out = inputs.out
    if key == "out" and out is not None and tuple(out.shape) == tuple(shape):
        return out  # the caller's float32 tensor (checked by the caller)
    if inputs.scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return inputs.scratch.get(key, shape, like.dtype, like.device)


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """Non-base rows minus the base  # (m, *shape); precomputed ones are the same bytes."""
    if inputs.deltas is not None:
        return inputs.deltas
    rows = inputs.non_base_rows()
    models, m = inputs.models, len(rows)
    if rows == list(range(m)):  # base is the last row: no gather copy
        out = _empty(inputs, "task_vectors", (m, *models.shape[1:]), models)
        return torch.sub(models[:m], inputs.base, out=out)
    return models[rows] - inputs.base


# ---- generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della* -------


def gta_method(inputs: MergeInputs, kind: str | None, consensus: str | None) -> torch.Tensor:
    """The generalized task arithmetic family; the table's options give kind and consensus."""
    return gta(inputs, kind, consensus, lambda key, shape, like: _empty(inputs, key, shape, like))


# ---- other methods ---------------------------------------------------------------------------


def linear(inputs: MergeInputs) -> torch.Tensor:
    models = inputs.models  # (n, *shape)
    n = models.shape[0]
    w = inputs.model_params["weight"].to(torch.float32)
    total = w.sum()  # mergekit: weights.sum(dim=0), in the tensors' float32
    normalize = bool(inputs.params["normalize"])
    if normalize and total == 0:
        raise ConfigError(
            f"tensor '{inputs.tensor_name}': linear weights sum to 0, which normalize: true "
            f"divides by; got weights {inputs.model_params['weight'].tolist()}"
        )
    p = torch.cat([w, total.view(1)]).to(models.device)
    f32 = torch.empty(0, dtype=torch.float32, device=models.device)
    out = _empty(inputs, "out", tuple(models.shape[1:]), f32)
    kernels = inputs.kernels or EAGER
    kernels.linear(Spec(None, False, normalize, tuple(range(n))), out.view(-1),
                   models.reshape(n, -1), p)  # fmt: skip
    return out


def slerp_method(inputs: MergeInputs) -> torch.Tensor:
    return twopass.whole(inputs, "slerp")


def nuslerp_method(inputs: MergeInputs) -> torch.Tensor:
    return twopass.whole(inputs, "nuslerp")


def multislerp_method(inputs: MergeInputs) -> torch.Tensor:
    return twopass.whole(inputs, "multislerp")


def karcher(inputs: MergeInputs) -> torch.Tensor:
    return twopass.whole(inputs, "karcher")


def model_stock(inputs: MergeInputs) -> torch.Tensor:
    return twopass.whole(inputs, "model_stock")


def sce(inputs: MergeInputs) -> torch.Tensor:
    from evomerge.merge.sce import sce_whole

    return sce_whole(inputs)


def nearswap(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    other = inputs.models[inputs.non_base_rows()[0]]
    t = float(inputs.params["t"])
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def passthrough(inputs: MergeInputs) -> torch.Tensor:
    scale = inputs.model_params["scale"][0].item()
    x = inputs.models[0]
    return x.clone() if scale != scale else x * scale  # NaN marks "no scale"
