"""Test helpers for the search tests: the method registry, a fake workbench whose scores are a
known function of the merge weights, its search space, and a subprocess runner for worker tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def ensure_methods() -> None:
    """Nothing to load: the method table (evomerge.merge.table) is static data now. Kept so
    the search tests that call it need no change."""


# the search space of the fake-workbench tests: three models, a simplex of weights, three tasks
FAKE_SPACE = """
models: [m/a, m/b, m/c]
method: linear
parameters:
  weight: {{simplex: true}}
tasks: [task0, task1, task2]
search: {search}
"""


def fake_space(search: str = "{seed: 0, heartbeat: 1, grace_period: 2}") -> str:
    """FAKE_SPACE with the given `search:` mapping (flow-style YAML)."""
    return FAKE_SPACE.format(search=search)


_PRELUDE = """
import sys
sys.path.insert(0, {tests!r})
import _search_fakes as f
f.ensure_methods()
"""


def spawn_with_fakes(body: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python process that runs `body` with the fakes imported as `f` (stderr piped)."""
    code = _PRELUDE.format(tests=str(TESTS)) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


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


def poll_trials(study: str, storage: str) -> list:
    """The study's trials as a test polls them while searches run; [] while the study does not
    exist yet or a search is still creating its schema (a poll racing that creation is retried by
    the next poll, not a failure)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    except (KeyError, SQLAlchemyError):
        return []


def kill_while_running(victim: subprocess.Popen, trials: Callable[[], list]) -> Any:
    """SIGKILL `victim` once one of its trials is RUNNING and has sent a heartbeat or two;
    returns that trial (as it was while running)."""
    deadline = time.time() + 90
    running: list = []
    while not running and time.time() < deadline:
        running = [t for t in trials() if t.state.name == "RUNNING"]
        time.sleep(0.2)
    assert running, victim.stderr.read().decode()[-2000:] if victim.poll() is not None else ""
    time.sleep(1.5)  # a heartbeat or two recorded: the trial is alive, then it goes silent
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    return running[0]
