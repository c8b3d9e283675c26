"""Test helpers for the search tests: the method registry (the real one, or mergekit-like
declarations while evomerge.merge.methods has not landed) and a fake workbench whose scores
are a known function of the merge weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from evomerge.merge import registry as reg
from evomerge.merge.registry import Method, Param


def ensure_methods() -> None:
    """Use the real registry when it exists; otherwise declare the methods the tests use."""
    try:
        reg._ensure_loaded()
        return
    except ModuleNotFoundError:
        pass
    w = Param("weight", "float", "model", 1.0, "weight", search_low=0.0, search_high=1.0)
    dens = Param(
        "density",
        "float",
        "model",
        1.0,
        "density",
        low=0.0,
        high=1.0,
        low_open=True,
        search_low=0.1,
        search_high=1.0,
    )
    lam = Param("lambda", "float", "global", 1.0, "scale", low=0.0, search_low=0.5, search_high=1.5)
    norm = Param("normalize", "bool", "global", True, "normalize")
    eps = Param("epsilon", "float", "model", 0.1, "epsilon", low=0.0, high=0.5)
    t = Param(
        "t",
        "float",
        "global",
        None,
        "t",
        low=0.0,
        high=1.0,
        required=True,
        search_low=0.0,
        search_high=1.0,
    )
    fn = lambda x: x.models[0]  # noqa: E731  (declarations only; never merged here)
    for m in (
        Method("linear", fn, (w, norm), "linear"),
        Method("task_arithmetic", fn, (w, lam, norm), "ta", needs_base=True),
        Method("ties", fn, (w, dens, lam, norm), "ties", needs_base=True),
        Method("dare_ties", fn, (w, dens, lam, norm), "dare", needs_base=True, random=True),
        Method("della", fn, (w, dens, eps, lam, norm), "della", needs_base=True, random=True),
        Method("slerp", fn, (t,), "slerp", needs_base=True, min_models=2, max_models=2),
    ):
        if m.name not in reg.METHODS:
            reg.register(m)


@dataclass
class TaskScore:
    mean: float
    stderr: float
    n: int


@dataclass
class FakeResult:
    per_example: dict[str, dict[int, float]]
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    complete: bool = True


class FakeWorkbench:
    """Scores a recipe by a known function of its per-model weights: task k's per-example score
    is 1 - (w_k - target_k)^2 (plus a per-example offset), so the optimum is w = target."""

    def __init__(
        self, target=(0.6, 0.3, 0.1), n_docs: int = 40, chunks=(10, None), sleep: float = 0.0
    ) -> None:
        self.target = target
        self.task_names = [f"task{k}" for k in range(len(target))]
        self.higher_is_better = dict.fromkeys(self.task_names, True)
        self.n_docs, self.chunks, self.sleep = n_docs, chunks, sleep
        self.merged: list[Any] = []

    def weights(self, recipe) -> list[float]:
        return [float(m.parameters.get("weight", 1.0)) for m in recipe.final.models]

    def _scores(self, recipe, split: str) -> dict[str, dict[int, float]]:
        w = self.weights(recipe) if recipe is not None else None
        off = 0 if split == "search" else 1000
        out = {}
        for k, name in enumerate(self.task_names):
            base = 1.0 - (w[k] - self.target[k]) ** 2 if recipe is not None else 0.5
            out[name] = {off + d: base - 0.01 * (d % 5) for d in range(self.n_docs)}
        return out

    def evaluate(self, recipe, split: str = "search", on_chunk=None) -> FakeResult:
        if self.sleep:
            time.sleep(self.sleep)
        self.merged.append(recipe)
        full = self._scores(recipe, split)
        sizes = [c or self.n_docs for c in self.chunks] if split == "search" else [self.n_docs]
        for ci, size in enumerate(sizes):
            part = {t: dict(list(v.items())[:size]) for t, v in full.items()}
            res = _result(part, complete=size >= self.n_docs)
            if on_chunk is not None and size < self.n_docs and on_chunk(ci, res) is False:
                return res
        return _result(full, complete=True)


def _result(per: dict[str, dict[int, float]], complete: bool) -> FakeResult:
    tasks = {t: TaskScore(sum(v.values()) / len(v), 0.0, len(v)) for t, v in per.items()}
    return FakeResult(per, tasks, complete)
