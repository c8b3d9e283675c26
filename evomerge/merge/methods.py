"""Every merge method: a pure tensor function of MergeInputs plus its parameters, declared once.

Semantics follow mergekit 0.1.5 (mergekit/merge_methods/*.py); all math in float32.
Importing this module registers the methods in evomerge.merge.registry.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, MergeError
from evomerge.merge import sparsify as sp
from evomerge.merge.gta import EAGER, gta
from evomerge.merge.kernel import Spec
from evomerge.merge.registry import MergeInputs, Method, Param, register
from evomerge.merge.spherical import karcher_mean, multislerp, nuslerp, slerp


class Scratch:
    """Reusable buffers keyed by (name, shape): a result may live in one, so consume it first."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        k = (key, tuple(shape), like.dtype, like.device)
        buf = self._bufs.get(k)
        if buf is None:
            buf = self._bufs[k] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


def _empty(inputs: MergeInputs, key: str, shape: tuple[int, ...], like: torch.Tensor):
    out = inputs.out
    if key == "out" and out is not None and tuple(out.shape) == tuple(shape):
        return out  # the caller's float32 tensor (checked by the caller)
    if inputs.scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return inputs.scratch.get(key, shape, like)


def non_base_rows(inputs: MergeInputs) -> list[int]:
    return [i for i in range(inputs.models.shape[0]) if i != inputs.base_index]


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """Non-base rows minus the base  # (m, *shape); precomputed ones are the same bytes."""
    if inputs.deltas is not None:
        return inputs.deltas
    rows = non_base_rows(inputs)
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


def _gta(inputs: MergeInputs, kind: str | None, consensus: str | None) -> torch.Tensor:
    return gta(inputs, kind, consensus, lambda key, shape, like: _empty(inputs, key, shape, like))


# ---- other methods ---------------------------------------------------------------------------


def _linear(inputs: MergeInputs) -> torch.Tensor:
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


def _slerp(inputs: MergeInputs) -> torch.Tensor:
    bi = inputs.base_index
    assert bi is not None
    other = non_base_rows(inputs)[0]
    return slerp(float(inputs.params["t"]), inputs.models[bi], inputs.models[other])


def _nuslerp(inputs: MergeInputs) -> torch.Tensor:
    rows = non_base_rows(inputs)
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


def _multislerp(inputs: MergeInputs) -> torch.Tensor:
    rows = non_base_rows(inputs)
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


def _karcher(inputs: MergeInputs) -> torch.Tensor:
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


def _model_stock(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    rows = non_base_rows(inputs)
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


def _sce(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    rows = non_base_rows(inputs)
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


def _nearswap(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    other = inputs.models[non_base_rows(inputs)[0]]
    t = float(inputs.params["t"])
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _passthrough(inputs: MergeInputs) -> torch.Tensor:
    scale = inputs.model_params["scale"][0].item()
    x = inputs.models[0]
    return x.clone() if scale != scale else x * scale  # NaN marks "no scale"


# ---- declarations ----------------------------------------------------------------------------

_REF_TIES = "https://arxiv.org/abs/2306.01708"
_REF_DARE = "https://arxiv.org/abs/2311.03099"
_REF_BREAD = "https://arxiv.org/abs/2312.06795"
_REF_DELLA = "https://arxiv.org/abs/2406.11617"

WEIGHT = Param("weight", "float", "model", None, "relative weight of the model", required=True,
               search_low=0.0, search_high=1.0)  # fmt: skip
DENSITY = Param("density", "float", "model", 1.0, "fraction of the task vector kept",
                low=0.0, high=1.0, search_low=0.1, search_high=1.0)  # fmt: skip
LAMBDA = Param("lambda", "float", "global", 1.0, "scale of the merged task vector",
               search_low=0.5, search_high=1.5)  # fmt: skip
INT8 = Param("int8_mask", "bool", "global", False, "int8 masks (memory only, same numbers)")
GAMMA = Param("gamma", "float", "model", 0.01, "fraction of largest-magnitude outliers dropped",
              low=0.0, high=1.0, search_low=0.0, search_high=0.1)  # fmt: skip
EPSILON = Param("epsilon", "float", "model", 0.15,
                "keep probability spread: density ± epsilon from smallest to largest",
                low=0.0, high=0.5, search_low=0.01, search_high=0.2)  # fmt: skip


def _gta_params(normalize: bool, rescale: bool, kind: str | None) -> tuple[Param, ...]:
    extra = {"breadcrumbs": (GAMMA,), "della": (EPSILON,)}.get(kind or "", ())
    norm_doc = "divide by the summed weights (of the models agreeing with the elected sign)"
    # density and rescale act through a sparsification mask: without one (task_arithmetic)
    # mergekit reads neither, so they are not declared, and a search never spends a
    # dimension on them (a recipe that sets them gets the unread-parameter warning)
    masked = (
        (DENSITY, Param("rescale", "bool", "global", rescale, "rescale kept entries to L1 norm"))
        if kind is not None
        else ()
    )
    return (
        WEIGHT,
        *masked[:1],
        Param("normalize", "bool", "global", normalize, norm_doc),
        *masked[1:],
        LAMBDA,
        INT8,
        *extra,
    )


def _register_gta(name: str, kind, consensus, normalize, rescale, doc, ref) -> None:
    def fn(inputs: MergeInputs) -> torch.Tensor:
        return _gta(inputs, kind, consensus)

    register(Method(name, fn, _gta_params(normalize, rescale, kind), doc, ref, needs_base=True,
                    random=kind in ("random", "della"), task_vectors=True, fused=True,
                    elementwise=kind is None))  # fmt: skip


_register_gta("task_arithmetic", None, None, False, False, "base + sum of weighted task vectors",
              "https://arxiv.org/abs/2212.04089")  # fmt: skip
_register_gta("ties", "magnitude", "sum", True, False,
              "trim small deltas, elect signs, disjoint mean", _REF_TIES)  # fmt: skip
_register_gta("dare_ties", "random", "sum", False, True,
              "random drop (DARE) + TIES sign election", _REF_DARE)  # fmt: skip
_register_gta("dare_linear", "random", None, False, True,
              "random drop (DARE) + weighted sum", _REF_DARE)  # fmt: skip
_register_gta("breadcrumbs", "breadcrumbs", None, False, False,
              "drop outliers and small deltas + weighted sum", _REF_BREAD)  # fmt: skip
_register_gta("breadcrumbs_ties", "breadcrumbs", "sum", False, False,
              "drop outliers and small deltas + TIES sign election", _REF_BREAD)  # fmt: skip
_register_gta("della", "della", "sum", True, True,
              "rank-based random drop (DELLA) + TIES sign election", _REF_DELLA)  # fmt: skip
_register_gta("della_linear", "della", None, False, True,
              "rank-based random drop (DELLA) + weighted sum", _REF_DELLA)  # fmt: skip

register(Method(
    "linear", _linear,
    (WEIGHT, Param("normalize", "bool", "global", True, "divide by the summed weights")),
    "weighted average of the models", "https://arxiv.org/abs/2203.05482", base_is_input=True,
    fused=True, elementwise=True,
))  # fmt: skip
register(Method(
    "slerp", _slerp,
    (Param("t", "float", "global", None, "interpolation position: 0 = base, 1 = other model",
           required=True, search_low=0.0, search_high=1.0),),
    "spherical interpolation between the base and one model",
    "https://en.wikipedia.org/wiki/Slerp", needs_base=True, min_models=2, max_models=2,
))  # fmt: skip
register(Method(
    "nuslerp", _nuslerp,
    (WEIGHT,
     Param("nuslerp_row_wise", "bool", "global", False, "interpolate rows instead of columns"),
     Param("nuslerp_flatten", "bool", "global", True, "interpolate the flattened tensors")),
    "spherical interpolation of two models (of their task vectors with a base)",
    min_models=2, max_models=3, task_vectors=True,
))  # fmt: skip
register(Method(
    "multislerp", _multislerp,
    (WEIGHT,
     Param("normalize_weights", "bool", "global", True, "divide weights by their sum"),
     Param("eps", "float", "global", 1e-8, "numerical floor", low=0.0)),
    "barycentric interpolation on the hypersphere (of task vectors with a base)",
    "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", task_vectors=True,
))  # fmt: skip
register(Method(
    "karcher", _karcher,
    (Param("max_iter", "int", "global", 10, "iterations", low=1),
     Param("tol", "float", "global", 1e-5, "convergence tolerance", low=0.0)),
    "Riemannian (Karcher) mean on the hypersphere", "https://arxiv.org/abs/2603.04972",
    base_is_input=True,
))  # fmt: skip
register(Method(
    "model_stock", _model_stock,
    (Param("filter_wise", "bool", "global", False, "one ratio per row instead of per tensor"),),
    "base-to-average ratio t = N cos / (1 + (N - 1) cos)", "https://arxiv.org/abs/2403.19522",
    needs_base=True, min_models=3, task_vectors=True,
))  # fmt: skip
register(Method(
    "sce", _sce,
    (Param("select_topk", "float", "global", 1.0, "fraction of highest-variance entries kept",
           low=0.0, high=1.0, search_low=0.1, search_high=1.0), INT8),
    "select by variance, weight by energy, erase minority signs",
    "https://arxiv.org/abs/2408.07990", needs_base=True, task_vectors=True,
))  # fmt: skip
register(Method(
    "nearswap", _nearswap,
    (Param("t", "float", "global", None, "distance below which the model's value is taken",
           required=True, low=0.0, search_low=1e-5, search_high=1e-2),),
    "take the model's value where it is near the base",
    "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", needs_base=True,
    min_models=2, max_models=2,
))  # fmt: skip
register(Method(
    "passthrough", _passthrough,
    (Param("scale", "float", "model", None, "multiply the tensor by this"),),
    "copy one model's tensors (with slices: stack layers)", min_models=1, max_models=1,
    base_is_input=True,
))  # fmt: skip
