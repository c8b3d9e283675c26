"""Turn task specs (YAML paths, folders, names in evals/, lm-eval registry names) into lm-eval
Task objects, built by lm-eval's own TaskManager.

Local YAMLs name their data with paths relative to the YAML's folder; lm-eval would read them
relative to the working directory, so each local config is loaded here (lm-eval's loader:
includes and !function resolved), its data paths made absolute, and handed to the TaskManager
as an inline config. lm-eval's full registry takes ~20 s to index, so it is only built when a
spec is not found locally.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.eval.lm_compat import load_task_yaml

_YAML_SUFFIXES = (".yaml", ".yml")


def local_task_dirs() -> list[Path]:
    """evals/ under the working directory and beside the package (the repository's)."""
    dirs = [Path.cwd() / "evals", Path(__file__).resolve().parents[2] / "evals"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in out:
            out.append(d.resolve())
    return out


def local_task_manager(specs: Sequence[str] = ()) -> Any:
    """An lm-eval TaskManager over evals/ and the folders of the path specs (no registry),
    with each local config inlined and its data paths made absolute."""
    from lm_eval.tasks import TaskManager

    include = local_task_dirs()
    for p in (as_path(s) for s in specs):
        folder = p if p is None or p.is_dir() else p.parent
        if folder is not None and folder not in include:
            include.append(folder)
    manager = TaskManager(include_defaults=False, include_path=include)
    inline_local_configs(manager.task_index)
    return manager


def build_lm_eval_tasks(specs: Sequence[str]) -> dict[str, Any]:
    """Spec strings -> {task name: lm-eval Task}, leaf tasks of groups included, in order."""
    from lm_eval.tasks import TaskManager

    paths = [as_path(s) for s in specs]
    manager = local_task_manager(specs)

    names: list[str] = []
    registry_specs: list[str] = []
    for spec, path in zip(specs, paths, strict=True):
        if path is not None:
            names.extend(names_in_path(path))
        elif spec in manager.task_index:
            names.append(spec)
        else:
            registry_specs.append(spec)

    tasks: dict[str, Any] = {}
    for name in names:
        tasks.update(_load(manager, name))
    if registry_specs:
        registry = TaskManager()
        for spec in registry_specs:
            if spec not in registry.task_index:
                raise ConfigError(unknown_task(spec, manager.all_tasks, registry.all_tasks))
            tasks.update(_load(registry, spec))
    return tasks


def as_path(spec: str) -> Path | None:
    """A spec is a path if it names an existing file/folder or looks like a YAML file."""
    p = Path(spec).expanduser()
    if p.exists():
        return p.resolve()
    if p.suffix in _YAML_SUFFIXES:
        raise ConfigError(f"task file not found: '{spec}' (expected a YAML task or group)")
    return None


def names_in_path(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(path.glob("**/*.y*ml"))
    names = []
    for f in files:
        try:
            cfg = load_task_yaml(f, resolve_func=False)
        except Exception as exc:  # yaml errors and lm-eval's ValueError for non-dict files
            raise ConfigError(f"cannot read task YAML '{f}': {_one_line(exc)}") from None
        # in a folder only leaf tasks are taken (a group there repeats them)
        name = cfg.get("task") if path.is_dir() else cfg.get("group") or cfg.get("task")
        if isinstance(name, str):
            names.append(name)
    if not names:
        raise ConfigError(f"no lm-eval task found in '{path}' (expected a 'task:' or 'group:')")
    return names


def inline_local_configs(index: dict[str, Any]) -> None:
    """Load each local YAML entry fully and make its data paths absolute (see module doc)."""
    for entry in index.values():
        if entry.yaml_path is None:
            continue
        folder = Path(entry.yaml_path).parent
        try:
            cfg = load_task_yaml(entry.yaml_path, resolve_func=True)
        except Exception as exc:
            raise ConfigError(
                f"cannot load task YAML '{entry.yaml_path}': {_one_line(exc)}"
            ) from None
        _absolute_data_files(cfg, folder, entry.yaml_path)
        members = cfg.get("task")
        for item in members if isinstance(members, list) else []:
            if isinstance(item, dict):  # an inline task of a group
                _absolute_data_files(item, folder, entry.yaml_path)
        entry.cfg, entry.yaml_path = cfg, None


def _absolute_data_files(cfg: dict[str, Any], folder: Path, source: Path) -> None:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return

    def fix(f: str) -> str:
        if "://" in f or Path(f).expanduser().is_absolute():
            return f
        p = folder / f
        if not any(c in f for c in "*?[") and not p.exists():
            raise ConfigError(
                f"data file '{f}' of task YAML '{source}' not found (looked at '{p}')"
            )
        return str(p)

    def fix_any(v: Any) -> Any:
        if isinstance(v, str):
            return fix(v)
        if isinstance(v, list):
            return [fix_any(x) for x in v]
        if isinstance(v, dict):
            return {k: fix_any(x) for k, x in v.items()}
        return v

    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": fix_any(files)}


def _load(manager: Any, name: str) -> dict[str, Any]:
    try:
        return dict(manager.load([name])["tasks"])
    except ConfigError:
        raise
    except Exception as exc:  # datasets/hub errors when data is not available offline
        raise ConfigError(f"task '{name}': cannot load its data: {_one_line(exc)}") from None


def unknown_task(name: str, local: list[str], registry: list[str]) -> str:
    close = difflib.get_close_matches(name, [*local, *registry], n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = ", ".join(str(d) for d in local_task_dirs()) or "no evals/ folder"
    shown = ", ".join(sorted(local)) or "none"
    return (
        f"unknown task '{name}'.{hint} Local tasks ({where}): {shown}; "
        f"or one of lm-eval's {len(registry)} registry tasks, or a YAML path"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
