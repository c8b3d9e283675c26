"""The proxy evaluator: score a live model on proxy tasks in growing fidelity chunks.

Chunks are nested, fixed subsets of each task's split: a seeded permutation of the split's
doc ids, cut at 16, 64, ... all. The permutation depends only on (seed, task, split), so every
candidate is scored on the same documents in the same order and per-example scores pair up
across candidates (what a Wilcoxon pruner or a paired comparison needs). Each chunk runs only
the documents it adds; requests of all tasks go to the backend together so batches stay full.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.eval.early_exit import ExactAnswers
    from evomerge.eval.protocol import Backend
    from evomerge.eval.tasks import ProxyTask


@dataclass
class TaskScore:
    task: str
    metric: str
    mean: float
    stderr: float  # standard error of the mean: sample std / sqrt(n), as lm-eval reports
    n: int


@dataclass
class EvalResult:
    per_example: dict[str, dict[int, float]] = field(
        default_factory=dict
    )  # task -> doc id -> score
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    complete: bool = False

    def mean(self) -> float:
        """Unweighted mean over tasks of each task's mean (nan if nothing was scored)."""
        values = [s.mean for s in self.tasks.values()]
        return sum(values) / len(values) if values else math.nan


class Evaluator:
    def __init__(
        self,
        backend: Backend,
        tasks: Sequence[ProxyTask],
        *,
        chunks: Sequence[int | None] = (16, 64, None),
        seed: int = 0,
    ) -> None:
        if not tasks:
            raise ConfigError("expected at least one task to evaluate, got none")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        check_chunks(chunks)
        self.backend = backend
        self.tasks = list(tasks)
        self.chunks = list(chunks)
        self.seed = seed
        template = getattr(backend, "apply_chat_template", None)
        for t in self.tasks:
            if t.wants_chat_template:
                if template is None:
                    raise ConfigError(
                        f"task '{t.name}' asks for a chat template; this backend has none"
                    )
                t.set_chat_template(template, getattr(backend, "tokenizer_name", ""))

    def order(self, task: ProxyTask, split: str) -> list[int]:
        """The fixed evaluation order of a task's split (chunk k = its first chunks[k] ids)."""
        import numpy as np

        ids = task.doc_ids(split)
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{task.name}/{split}".encode())])
        return [ids[k] for k in rng.permutation(len(ids))]

    def evaluate(
        self,
        split: str = "search",
        *,
        on_chunk: Callable[[int, EvalResult], bool] | None = None,
        limit: int | None = None,
    ) -> EvalResult:
        """Score the split chunk by chunk; `on_chunk(k, result_so_far)` returning False stops.

        `limit` caps the documents per task. A chunk that adds no document (the split is
        smaller than the chunk size) is skipped, so on_chunk sees each distinct result once.
        `complete` is True when every document the chunks plan for has been scored.
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        reuse = getattr(self.backend, "reusing_prefixes", None)  # weights are fixed meanwhile
        with reuse() if reuse is not None else contextlib.nullcontext():
            return self._evaluate(split, on_chunk, limit)

    def _evaluate(self, split: str, on_chunk, limit: int | None) -> EvalResult:
        orders = {t.name: self.order(t, split)[:limit] for t in self.tasks}
        result = EvalResult(per_example={name: {} for name in orders})
        planned = {name: _upto(self.chunks[-1], len(o)) for name, o in orders.items()}
        done = dict.fromkeys(orders, 0)
        for k, size in enumerate(self.chunks):
            new = {name: o[done[name] : _upto(size, len(o))] for name, o in orders.items()}
            if not any(new.values()):
                continue
            self._run(new, result)
            done = {name: done[name] + len(ids) for name, ids in new.items()}
            result.complete = done == planned
            if on_chunk is not None and not on_chunk(k, result):
                return result
            if result.complete:
                return result
        result.complete = done == planned
        return result

    def _run(self, new: dict[str, list[int]], result: EvalResult) -> None:
        """Run the new documents of every task through the backend, score them, update means."""
        by_name = {t.name: t for t in self.tasks}
        batches: dict[str, list] = {"loglikelihood": [], "generate_until": []}
        owners: dict[str, list[tuple[str, int, int]]] = {"loglikelihood": [], "generate_until": []}
        hints: list[ExactAnswers | None] = []  # per generation request: early-exit hints
        for name, ids in new.items():
            task = by_name[name]
            for doc_id in ids:
                reqs = task.requests(doc_id)
                batches[task.request_type].extend(reqs)
                owners[task.request_type].extend((name, doc_id, j) for j in range(len(reqs)))
                if task.request_type == "generate_until":
                    hints.extend(task.answers(doc_id))
        responses: dict[tuple[str, int], list] = {}
        for kind, reqs in batches.items():
            if not reqs:
                continue
            outs = (
                self.backend.loglikelihood(reqs)
                if kind == "loglikelihood"
                else self.backend.generate(reqs, answers=hints)
            )
            for (name, doc_id, _), out in zip(owners[kind], outs, strict=True):
                responses.setdefault((name, doc_id), []).append(out)
        for name, ids in new.items():
            for doc_id in ids:
                score = by_name[name].score(doc_id, responses[(name, doc_id)])
                result.per_example[name][doc_id] = score
            result.tasks[name] = summarize(name, by_name[name].metric, result.per_example[name])


def summarize(task: str, metric: str, scores: dict[int, float]) -> TaskScore:
    """Mean and standard error of the mean (sample std / sqrt(n); nan below 2 examples)."""
    values = list(scores.values())
    n = len(values)
    if n == 0:
        return TaskScore(task, metric, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return TaskScore(task, metric, mean, math.nan, n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return TaskScore(task, metric, mean, math.sqrt(var) / math.sqrt(n), n)


def _upto(size: int | None, n: int) -> int:
    return n if size is None else min(size, n)


def check_chunks(chunks: Sequence[int | None]) -> None:
    if not chunks:
        raise ConfigError("chunks must hold at least one size (None = all documents)")
    sizes = [c for c in chunks if c is not None]
    if any(c is None for c in chunks[:-1]):
        raise ConfigError(f"only the last chunk may be None (all documents), got {list(chunks)}")
    if any(not isinstance(c, int) or c < 1 for c in sizes) or sizes != sorted(set(sizes)):
        raise ConfigError(f"chunk sizes must be increasing positive integers, got {list(chunks)}")
