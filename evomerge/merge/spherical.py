"""Interpolation on the hypersphere: slerp, nuslerp, multislerp, Karcher mean (float32 math).

Each follows the mergekit 0.1.5 function of the same name, including its fallbacks for
(anti)parallel and zero vectors.
"""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995  # |cos| above this: vectors (anti)parallel, slerp falls back to lerp


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
    eps: float = 1e-8,
) -> torch.Tensor:  # fmt: skip
    """Spherical interpolation of the flattened tensors (t = 0 gives v0); norms are kept
    (the coefficients apply to the raw tensors, not unit vectors)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(t, dtype=torch.float32, device=v0.device)
    if a.numel() == 0:
        return ((1 - tt) * v0 + tt * v1).clone()
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)  # a zero vector stays unscaled
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - tt) * v0 + tt * v1
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - tt) * theta) / sin_theta
    coef_b = torch.sin(tt * theta) / sin_theta
    return coef_a * v0 + coef_b * v1


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
    flatten: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Slerp along `dim` (row- or column-wise) or of the flattened tensors; lerp where colinear."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(out_shape)


def multislerp(
    vectors: torch.Tensor, weights: torch.Tensor, normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:  # fmt: skip
    """Barycentric interpolation on the sphere  # (m, *shape), (m,) -> (*shape)

    Project onto the tangent space at the weighted mean direction, average there, map back
    with the exponential map and scale to the weighted mean norm.
    """
    flat = vectors.reshape(vectors.shape[0], -1)  # (m, numel)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (m, 1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if vectors.shape[0] == 2:  # antipodal pair: fall back to a weighted sum
            return (vectors[0] * weights[0] + vectors[1] * weights[1]).view(vectors.shape[1:])
        raise ValueError(
            "multislerp: the weighted mean direction is zero (antipodal inputs with balancing "
            "weights); use different weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    res = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (res * (norms.squeeze(-1) * weights).sum()).view(vectors.shape[1:])


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of the directions, scaled by the weighted mean norm."""
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else x / n
        for x, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    w = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for a, u in zip(w, us, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(w, us, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean
