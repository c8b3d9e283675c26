"""Weights on the probability simplex: the parameterizations a sampler searches in.

Each maps raw optuna parameters (independent boxes) onto weights w >= 0 with sum(w) = 1:

- "logu" (TPE, NSGA-II, QMC, dirichlet): one raw x_i in (0, 1] per model, w_i = -log x_i / sum.
  With x uniform, -log x_i ~ Exp(1), so w is a flat Dirichlet draw; every model keeps its own
  parameter, which is what TPE's per-dimension Parzen estimators model well.
- "stick" (CMA-ES, GP): n - 1 raw u_k in [0, 1] (stick breaking). Fraction k of the remaining
  stick is the inverse CDF of Beta(1, n - 1 - k) at u_k, so the uniform cube maps onto the flat
  Dirichlet and every point of the simplex is reached (corners at u in {0, 1}). No redundant
  dimension: continuous optimizers see an (n - 1)-dim box with no flat direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LOGU_LOW = 1e-6  # x_i lower bound: -log(1e-6) = 13.8 keeps one weight finite and dominant


def logu_decode(xs: Sequence[float]) -> list[float]:
    e = [0.0 - math.log(max(x, LOGU_LOW)) for x in xs]  # 0.0 - : no -0.0 weights
    total = sum(e)
    if total <= 0.0:  # every x_i == 1: no preference, the centre of the simplex
        return [1.0 / len(xs)] * len(xs)
    return [v / total for v in e]


def logu_encode(ws: Sequence[float]) -> list[float]:
    """x_i = exp(-w_i): since sum(w) = 1 this decodes back to exactly w (x_i in [1/e, 1])."""
    total = sum(ws)
    return [math.exp(-w / total) for w in ws]


def stick_decode(us: Sequence[float]) -> list[float]:
    n = len(us) + 1
    ws, rest = [], 1.0
    for k, u in enumerate(us):
        frac = 1.0 - (1.0 - min(max(u, 0.0), 1.0)) ** (1.0 / (n - 1 - k))  # Beta(1, n-1-k) icdf
        ws.append(rest * frac)
        rest -= ws[-1]
    ws.append(max(rest, 0.0))
    return ws


def stick_encode(ws: Sequence[float]) -> list[float]:
    n, total = len(ws), sum(ws)
    us, rest = [], 1.0
    for k in range(n - 1):
        w = ws[k] / total
        frac = min(w / rest, 1.0) if rest > 1e-12 else 0.0
        us.append(1.0 - (1.0 - frac) ** (n - 1 - k))  # Beta(1, n-1-k) CDF
        rest -= w
    return us
