"""The tensor functions of the merge methods: each a pure function of MergeInputs.

Their parameters, flags and names are declared once, in the method table (table.py), which
names each function here as "evomerge.merge.methods:<function>". Semantics follow mergekit
0.1.5 (mergekit/merge_methods/*.py); all math in float32.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, MergeError
from evomerge.merge import sparsify as sp
from evomerge.merge.contract import MergeInputs
from evomerge.merge.gta import EAGER, gta
from evomerge.merge.kernel import Spec
from evomerge.merge.spherical import karcher_mean, multislerp, nuslerp, slerp


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


def _values(inputs: MergeInputs, name: str, rows: list[int]) -> list[float]:
    return inputs.model_params[name][rows].tolist()


def _coef(inputs: MergeInputs, name: str, rows: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients shaped to broadcast over like's trailing dims  # (m, 1, ..., 1)"""
    c = inputs.model_params[name][rows].to(dtype=like.dtype, device=like.device)
    return c.view(-1, *([1] * (like.dim() - 1)))


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
    bi = inputs.base_index
    assert bi is not None
    other = inputs.non_base_rows()[0]
    return slerp(float(inputs.params["t"]), inputs.models[bi], inputs.models[other])


def nuslerp_method(inputs: MergeInputs) -> torch.Tensor:
    rows = inputs.non_base_rows()
    if len(rows) != 2:
        raise ConfigError(f"nuslerp merges exactly 2 models besides the base, but got {len(rows)}")
    w = _values(inputs, "weight", rows)
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    row_wise, flat = bool(inputs.params["nuslerp_row_wise"]), bool(inputs.params["nuslerp_flatten"])
    dim = 0 if row_wise else -1
    if inputs.base is None:
        return nuslerp(t, inputs.models[rows[0]], inputs.models[rows[1]], dim=dim, flatten=flat)
    tv = task_vectors(inputs)
    return inputs.base + nuslerp(t, tv[0], tv[1], dim=dim, flatten=flat)


def multislerp_method(inputs: MergeInputs) -> torch.Tensor:
    rows = inputs.non_base_rows()
    if not rows:
        raise ConfigError("multislerp needs at least one model besides the base")
    if len(rows) == 1:
        return inputs.models[rows[0]].clone()
    vectors = inputs.models[rows] if inputs.base is None else task_vectors(inputs)
    weights = torch.tensor(_values(inputs, "weight", rows), dtype=vectors.dtype)
    try:
        merged = multislerp(
            vectors,
            weights.to(vectors.device),
            normalize_weights=bool(inputs.params["normalize_weights"]),
            eps=float(inputs.params["eps"]),
        )
    except ValueError as exc:
        raise MergeError(f"tensor '{inputs.tensor_name}': {exc}") from None
    return merged if inputs.base is None else merged + inputs.base


def karcher(inputs: MergeInputs) -> torch.Tensor:
    models = inputs.models
    n = models.shape[0]
    if n == 1:
        return models[0].clone()
    return karcher_mean(
        list(models.unbind(0)),
        [1.0 / n] * n,
        max_iter=int(inputs.params["max_iter"]),
        tol=float(inputs.params["tol"]),
    )


def model_stock(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    rows = inputs.non_base_rows()
    filter_wise = bool(inputs.params["filter_wise"])
    tv = task_vectors(inputs)  # (m, *shape)
    if filter_wise:
        offs = tv.unsqueeze(1) if base.dim() == 1 else tv  # (m, rows, cols): cosine per row
    else:
        offs = tv.reshape(tv.shape[0], -1)  # (m, numel)
    cos = []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            norm = torch.norm(offs[a], dim=-1) * torch.norm(offs[b], dim=-1)
            cos.append(((offs[a] * offs[b]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(rows)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denom), denom)
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    w0 = base.unsqueeze(0) if filter_wise and base.dim() == 1 else base
    w0 = w0 if filter_wise else base.reshape(-1)
    average = sum(inputs.models[r].reshape(w0.shape) for r in rows) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)


def sce(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    rows = inputs.non_base_rows()
    if not rows:
        return base.clone()
    tv = task_vectors(inputs)  # (m, *shape)
    topk = float(inputs.params["select_topk"])
    if topk < 1:
        tv = tv * _sce_mask(tv, topk).unsqueeze(0)
    erase = sp.sign_consensus(tv, "sum")
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)  # (m,) mean squared magnitude
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    w = w.view(-1, *([1] * (tv.dim() - 1)))
    erased = w * erase
    merged = (tv * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _sce_mask(tv: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * #nonzero) entries where the models' deltas vary most."""
    if density <= 0:
        return torch.zeros_like(tv[0])
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var).item() * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


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
