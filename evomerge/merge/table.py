"""The merge method table: every method declared once, as data.

Each entry names its tensor function ("module:function", imported only when a merge runs),
declares its parameters (Param: kind, scope, default, bounds, the search space's default
range) and its flags (needs_base, random, task_vectors, base_is_input, fused, elementwise,
model counts). Recipe validation, search spaces and model cards all read these declarations;
nothing re-declares a method's parameters. Pure Python, no torch: a static table, as
mergekit's registry, rather than methods registering themselves on import.
"""

from __future__ import annotations

from evomerge.errors import ConfigError, did_you_mean
from evomerge.merge.contract import Method, Param

_FN = "evomerge.merge.methods"  # the module of the tensor functions

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


def _gta(name: str, kind: str | None, consensus: str | None, normalize: bool, rescale: bool,
         doc: str, ref: str) -> Method:  # fmt: skip
    """One member of the generalized task arithmetic family: `kind` is the sparsification
    (None: no mask), `consensus` the sign election ("sum" as TIES, None: a plain sum)."""
    return Method(name, f"{_FN}:gta_method", _gta_params(normalize, rescale, kind), doc, ref,
                  options=(("kind", kind), ("consensus", consensus)), needs_base=True,
                  random=kind in ("random", "della"), task_vectors=True, fused=True,
                  elementwise=kind is None)  # fmt: skip


_TABLE: tuple[Method, ...] = (
    _gta("task_arithmetic", None, None, False, False, "base + sum of weighted task vectors",
         "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "magnitude", "sum", True, False,
         "trim small deltas, elect signs, disjoint mean", _REF_TIES),
    _gta("dare_ties", "random", "sum", False, True,
         "random drop (DARE) + TIES sign election", _REF_DARE),
    _gta("dare_linear", "random", None, False, True,
         "random drop (DARE) + weighted sum", _REF_DARE),
    _gta("breadcrumbs", "breadcrumbs", None, False, False,
         "drop outliers and small deltas + weighted sum", _REF_BREAD),
    _gta("breadcrumbs_ties", "breadcrumbs", "sum", False, False,
         "drop outliers and small deltas + TIES sign election", _REF_BREAD),
    _gta("della", "della", "sum", True, True,
         "rank-based random drop (DELLA) + TIES sign election", _REF_DELLA),
    _gta("della_linear", "della", None, False, True,
         "rank-based random drop (DELLA) + weighted sum", _REF_DELLA),
    Method(
        "linear", f"{_FN}:linear",
        (WEIGHT, Param("normalize", "bool", "global", True, "divide by the summed weights")),
        "weighted average of the models", "https://arxiv.org/abs/2203.05482",
        base_is_input=True, fused=True, elementwise=True,
    ),
    Method(
        "slerp", f"{_FN}:slerp_method",
        (Param("t", "float", "global", None, "interpolation position: 0 = base, 1 = other model",
               required=True, search_low=0.0, search_high=1.0),),
        "spherical interpolation between the base and one model",
        "https://en.wikipedia.org/wiki/Slerp", needs_base=True, min_models=2, max_models=2,
    ),
    Method(
        "nuslerp", f"{_FN}:nuslerp_method",
        (WEIGHT,
         Param("nuslerp_row_wise", "bool", "global", False, "interpolate rows instead of columns"),
         Param("nuslerp_flatten", "bool", "global", True, "interpolate the flattened tensors")),
        "spherical interpolation of two models (of their task vectors with a base)",
        min_models=2, max_models=3, task_vectors=True,
    ),
    Method(
        "multislerp", f"{_FN}:multislerp_method",
        (WEIGHT,
         Param("normalize_weights", "bool", "global", True, "divide weights by their sum"),
         Param("eps", "float", "global", 1e-8, "numerical floor", low=0.0)),
        "barycentric interpolation on the hypersphere (of task vectors with a base)",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", task_vectors=True,
    ),
    Method(
        "karcher", f"{_FN}:karcher",
        (Param("max_iter", "int", "global", 10, "iterations", low=1),
         Param("tol", "float", "global", 1e-5, "convergence tolerance", low=0.0)),
        "Riemannian (Karcher) mean on the hypersphere", "https://arxiv.org/abs/2603.04972",
        base_is_input=True,
    ),
    Method(
        "model_stock", f"{_FN}:model_stock",
        (Param("filter_wise", "bool", "global", False, "one ratio per row instead of per tensor"),),
        "base-to-average ratio t = N cos / (1 + (N - 1) cos)", "https://arxiv.org/abs/2403.19522",
        needs_base=True, min_models=3, task_vectors=True,
    ),
    Method(
        "sce", f"{_FN}:sce",
        (Param("select_topk", "float", "global", 1.0, "fraction of highest-variance entries kept",
               low=0.0, high=1.0, search_low=0.1, search_high=1.0), INT8),
        "select by variance, weight by energy, erase minority signs",
        "https://arxiv.org/abs/2408.07990", needs_base=True, task_vectors=True, fused=True,
    ),
    Method(
        "nearswap", f"{_FN}:nearswap",
        (Param("t", "float", "global", None, "distance below which the model's value is taken",
               required=True, low=0.0, search_low=1e-5, search_high=1e-2),),
        "take the model's value where it is near the base",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", needs_base=True,
        min_models=2, max_models=2,
    ),
    Method(
        "passthrough", f"{_FN}:passthrough",
        (Param("scale", "float", "model", None, "multiply the tensor by this"),),
        "copy one model's tensors (with slices: stack layers)", min_models=1, max_models=1,
        base_is_input=True,
    ),
)  # fmt: skip


def _index(methods: tuple[Method, ...]) -> dict[str, Method]:
    """Name (and alias) -> method; a name declared twice is a bug in this table."""
    out: dict[str, Method] = {}
    for method in methods:
        for name in (method.name, *method.aliases):
            if name in out:
                raise ValueError(f"merge method '{name}' declared twice")
            out[name] = method
    return out


METHODS: dict[str, Method] = _index(_TABLE)


def method_names() -> list[str]:
    return sorted(m.name for m in _TABLE)


def get_method(name: str) -> Method:
    """The method called `name`; ConfigError with "did you mean" otherwise."""
    if name in METHODS:
        return METHODS[name]
    raise ConfigError(did_you_mean(name, METHODS, "merge method"))
