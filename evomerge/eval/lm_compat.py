"""The one place that reaches into lm-eval's private names.

lm-eval exposes no public API for what proxy scoring needs: its YAML loader (includes and
`!function` tags resolved), a task's metric functions with their keyword arguments, and its
filter pipelines. When an lm-eval release renames one of these, this module is the only one to
change; every other module calls these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_task_yaml(path: str | Path, *, resolve_func: bool) -> dict[str, Any]:
    """A task or group YAML as lm-eval reads it (`include:` merged; `!function` tags imported
    when resolve_func, else left as strings)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_func)


def metric_fn(task: Any, name: str) -> Any:
    """The function a task scores metric `name` with (None when it has no such metric)."""
    return task._metric_fn_list.get(name)


def has_metric(task: Any, name: str) -> bool:
    return name in task._metric_fn_list


def metric_kwargs(task: Any, name: str) -> dict[str, Any]:
    """The keyword arguments the task passes to metric `name` (e.g. exact_match's
    ignore_case); empty when none."""
    return dict(task._metric_fn_kwargs.get(name) or {})


def filter_ensembles(task: Any) -> list[Any]:
    """The task's filter pipelines in order (lm-eval FilterEnsembles; the first one is the
    pipeline a proxy score uses); empty when the task has none."""
    return list(getattr(task, "_filters", None) or [])
