"""Interpolation on the hypersphere: slerp, nuslerp, multislerp, Karcher mean.

Each follows the mergekit 0.1.5 function of the same name, including its fallbacks for
(anti)parallel and zero vectors, rewritten on the Gram matrix of its vectors (gram.py):
every direction the algorithms build (normalized inputs, mean directions, tangents) is a
linear combination of the inputs, so the result is sum_i c_i v_i with coefficients computed
in float64 from dot products alone. That is what lets a merge take the dot products in one
streaming pass over row chunks and apply the coefficients (float32, entry by entry) in a
second. The functions here take `g`, a float64 Gram matrix (k, k[, *S]).
"""

from __future__ import annotations

import math

import torch

DOT_THRESHOLD = 0.9995  # |cos| above this: vectors (anti)parallel, slerp falls back to lerp


def slerp_coeffs(t: float, g: torch.Tensor, threshold: float = DOT_THRESHOLD, eps: float = 1e-8):
    """(c0, c1), float32 scalars: slerp(t, v0, v1) = c0 * v0 + c1 * v1 (t = 0 gives v0);
    the norms are kept (the coefficients apply to the raw tensors, not unit vectors)."""
    tt = torch.tensor(t, dtype=torch.float32)
    na, nb = math.sqrt(float(g[0, 0])), math.sqrt(float(g[1, 1]))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)  # a zero vector stays unscaled
    dot = min(1.0, max(-1.0, float(g[0, 1]) / (na * nb)))
    if abs(dot) > threshold:
        return 1 - tt, tt
    theta = math.acos(dot)
    s = math.sin(theta)
    return _f32(math.sin((1 - t) * theta) / s), _f32(math.sin(t * theta) / s)


def nuslerp_cos(g: torch.Tensor) -> torch.Tensor:
    """The cosines of nuslerp's vector pairs (norms floored at 1e-7), float32  # (*S)"""
    floor = torch.tensor(1e-7, dtype=torch.float64, device=g.device)
    n0, n1 = torch.maximum(g[0, 0].sqrt(), floor), torch.maximum(g[1, 1].sqrt(), floor)
    return (g[0, 1] / (n0 * n1)).clamp(-1, 1).to(torch.float32)


def nuslerp_apply(t: float, cos: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor,
                  eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """Slerp of v0 and v1 given their cosine (broadcast over the vectors); lerp where colinear."""
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, res)


def multislerp_coeffs(g: torch.Tensor, weights: list[float], normalize_weights: bool = True,
                      eps: float = 1e-8) -> list[float]:  # fmt: skip
    """Barycentric interpolation on the sphere as coefficients of the m vectors.

    Project onto the tangent space at the weighted mean direction, average there, map back
    with the exponential map and scale to the weighted mean norm.
    """
    m, gl = len(weights), g.tolist()
    w = [x / sum(weights) for x in weights] if normalize_weights else list(weights)
    norms = [math.sqrt(gl[i][i]) for i in range(m)]
    unit = [w[i] / (norms[i] + eps) for i in range(m)]  # the weighted units' coefficients
    mean_norm = _norm(gl, unit)
    if mean_norm < eps:
        if m == 2:  # antipodal pair: fall back to a weighted sum
            return w
        raise ValueError(
            "multislerp: the weighted mean direction is zero (antipodal inputs with balancing "
            "weights); use different weights"
        )
    mean = [c / mean_norm for c in unit]
    dots = [_dot(gl, _basis(m, i), mean) / (norms[i] + eps) for i in range(m)]
    shift = sum(w[i] * dots[i] for i in range(m))
    tangent = [unit[i] - shift * mean[i] for i in range(m)]
    tn = _norm(gl, tangent) + eps
    scale = sum(n * x for n, x in zip(norms, w, strict=True))
    return [scale * (mean[i] * math.cos(tn) + tangent[i] * math.sin(tn) / tn) for i in range(m)]


def karcher_coeffs(g: torch.Tensor, alphas: list[float], max_iter: int = 10,
                   tol: float = 1e-5) -> list[float]:  # fmt: skip
    """Weighted Karcher mean of the directions, scaled by the weighted mean norm, as
    coefficients of the inputs; iterated in the span of the unit inputs."""
    n, gl = len(alphas), g.tolist()
    norms = [math.sqrt(gl[i][i]) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    u = [[gl[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]  # unit Gram
    total = sum(alphas[i] for i in valid)
    w = [alphas[i] / total for i in valid]
    k = len(valid)
    mean = list(w)
    mean_norm = _norm(u, mean)
    mean = _basis(k, 0) if mean_norm < tol else [c / mean_norm for c in mean]
    for _ in range(max_iter):
        tangent = [0.0] * k
        for a, i in zip(w, range(k), strict=True):
            dot = min(1.0, max(-1.0, _dot(u, _basis(k, i), mean)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = a * theta / math.sin(theta)
            tangent = [tangent[j] + f * (_basis(k, i)[j] - dot * mean[j]) for j in range(k)]
        tangent_norm = _norm(u, tangent)
        if tangent_norm < tol:
            break
        c, s = math.cos(tangent_norm), math.sin(tangent_norm)
        mean = [c * mean[j] + s * tangent[j] / tangent_norm for j in range(k)]
        unit_norm = _norm(u, mean)
        if unit_norm > tol:
            mean = [x / unit_norm for x in mean]
    scale = sum(a * x for a, x in zip(alphas, norms, strict=True))
    out = [0.0] * n
    for j, i in enumerate(valid):
        out[i] = scale * mean[j] / norms[i]
    return out


def combine(coeffs: list[float], vectors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i c_i v_i in float32, added in order (entry by entry, so chunks give the same bits)."""
    out = vectors[0] * _f32(coeffs[0])
    for c, v in zip(coeffs[1:], vectors[1:], strict=True):
        out += v * _f32(c)
    return out


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _basis(k: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(k)]


def _dot(g: list[list[float]], a: list[float], b: list[float]) -> float:
    """a^T G b for coefficient vectors a, b."""
    return math.fsum(a[i] * g[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def _norm(g: list[list[float]], c: list[float]) -> float:
    return math.sqrt(max(0.0, _dot(g, c, c)))
