"""Objectives from per-task scores: weighted task metrics, several objectives, the base constraint.

A weighted objective is sum_t w_t * m_t / sum_t w_t. Its direction is the space's, or inferred
from the tasks' higher_is_better; when tasks disagree, lower-is-better tasks enter negated and
the objective is maximized. The constraint "no task more than X points below the base" is
c = max_t (drop_t) - X with drop_t = 100 * (base_t - m_t) (sign flipped for lower-is-better
tasks); c <= 0 is feasible (optuna's convention). Samplers without constraints_func get a
penalty instead: the objective moves by PENALTY per point of violation, in the bad direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from evomerge.errors import ConfigError
from evomerge.search.spec import ObjectiveSpec

PENALTY = 0.01  # objective units per point of constraint violation (metrics are in [0, 1])


@dataclass(frozen=True)
class Objectives:
    specs: list[ObjectiveSpec]
    higher_is_better: dict[str, bool]
    max_drop: float | None = None

    @classmethod
    def build(
        cls, specs: list[ObjectiveSpec], hib: Mapping[str, bool], max_drop: float | None
    ) -> Objectives:
        for s in specs:
            for t in s.weights:
                if t not in hib:
                    raise ConfigError(
                        f"objective '{s.name}': task '{t}' was not loaded by the "
                        f"evaluator (loaded: {sorted(hib)})"
                    )
        return cls(specs, dict(hib), max_drop)

    def _signs(self, spec: ObjectiveSpec) -> tuple[str, dict[str, float]]:
        hib = [self.higher_is_better[t] for t in spec.weights]
        if spec.direction is not None or all(hib) or not any(hib):
            direction = spec.direction or ("maximize" if all(hib) else "minimize")
            return direction, dict.fromkeys(spec.weights, 1.0)
        return "maximize", {t: 1.0 if self.higher_is_better[t] else -1.0 for t in spec.weights}

    @property
    def directions(self) -> list[str]:
        return [self._signs(s)[0] for s in self.specs]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def task_coefs(self, k: int = 0) -> dict[str, float]:
        """Objective k = sum_t coef_t * mean_t: the per-task coefficients (signed, normalized)."""
        spec = self.specs[k]
        _, signs = self._signs(spec)
        total = sum(abs(w) for w in spec.weights.values()) or 1.0
        return {t: signs[t] * w / total for t, w in spec.weights.items()}

    def values(self, means: Mapping[str, float]) -> list[float]:
        return [
            sum(c * means[t] for t, c in self.task_coefs(k).items()) for k in range(len(self.specs))
        ]

    def violation(self, means: Mapping[str, float], base: Mapping[str, float] | None) -> float:
        """max_t drop_t - max_drop in points (<= 0 feasible); 0 without a constraint."""
        if self.max_drop is None or not base:
            return 0.0
        drops = [
            100.0 * (base[t] - m) * (1 if self.higher_is_better.get(t, True) else -1)
            for t, m in means.items()
            if t in base
        ]
        return max(drops, default=0.0) - self.max_drop

    def penalized(self, values: list[float], violation: float) -> list[float]:
        if violation <= 0:
            return values
        sign = [1.0 if d == "maximize" else -1.0 for d in self.directions]
        return [v - s * PENALTY * violation for v, s in zip(values, sign, strict=True)]
