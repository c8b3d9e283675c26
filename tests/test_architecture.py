"""The layout's rules (ARCHITECTURE.md), checked on the source: no import cycles (imports inside
functions count), each room imports only the rooms it may, modules stay one screen-ish."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "evomerge"

# room -> rooms it must never import (imports inside functions included)
FORBIDDEN = {
    "merge": {"search", "eval", "loop", "export", "zoo", "moe", "demo"},
    "eval": {"merge", "search", "loop", "export", "recipe", "zoo", "moe", "demo"},
    "recipe": {"search", "eval", "loop", "export", "zoo", "moe", "demo"},
    "search": {"eval", "loop", "export", "demo"},
    "export": {"loop", "demo"},
    "common": {"merge", "eval", "search", "loop", "export", "recipe", "zoo", "moe", "demo"},
}
THIRD_PARTY_FORBIDDEN = {"merge": {"optuna", "lm_eval", "vllm"}, "recipe": {"torch"}}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(evomerge modules, top-level third-party packages) that `name` imports anywhere."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "evomerge":
                theirs.add(mod.split(".")[0])
                continue
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                ours.add(full if full in mods else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("evomerge") else theirs).add(
                    alias.name if alias.name.startswith("evomerge") else alias.name.split(".")[0]
                )
    ours.discard(name)
    return {m for m in ours if m in mods}, theirs


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    ours, theirs = {}, {}
    for name, path in mods.items():
        ours[name], theirs[name] = _imports(name, path, mods)
    return ours, theirs


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles() -> None:
    graph, _ = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], f"import cycles: {cycles}"


def test_rooms_import_only_what_they_may() -> None:
    graph, theirs = _graph()
    bad = []
    for module, deps in graph.items():
        room = _room(module)
        for dep in deps:
            if _room(dep) in FORBIDDEN.get(room, ()):
                bad.append(f"{module} -> {dep}")
        for pkg in theirs[module] & THIRD_PARTY_FORBIDDEN.get(room, set()):
            bad.append(f"{module} -> {pkg}")
    assert bad == []


def test_top_level_holds_only_entry_points_and_packages() -> None:
    loose = {p.name for p in ROOT.glob("*.py")}
    assert loose <= {"__init__.py", "__main__.py", "cli.py", "errors.py", "demo.py"}, loose


def test_modules_stay_under_400_lines() -> None:
    long = {str(p): n for p in ROOT.rglob("*.py") if (n := p.read_text().count("\n")) > 400}
    assert long == {}


def test_lm_eval_private_names_only_in_the_compat_module() -> None:
    users = []
    for p in ROOT.rglob("*.py"):
        text = p.read_text()
        if any(s in text for s in ("_yaml_loader", "._metric_fn_list", "._filters")):
            users.append(p.name)
    assert users == ["lm_compat.py"]


def test_optuna_private_names_only_in_the_qmc_sampler() -> None:
    """Optuna's private API (storage handles, trial ids, the QMC sample counter) may change
    in any release: one module (search/qmc.py) reaches into it, so an upgrade breaks there."""
    private = re.compile(
        r"\._storage\b|\._study_id\b|\._trial_id\b|_find_sample_id|optuna[\w.]*\._\w"
    )
    users = sorted(p.name for p in ROOT.rglob("*.py") if private.search(p.read_text()))
    assert users == ["qmc.py"]


def test_import_evomerge_and_recipe_load_no_heavy_packages(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    code = (
        "import sys, evomerge, evomerge.cli\n"
        "from evomerge.recipe import load_recipe\n"
        f"load_recipe({str(recipe)!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'vllm', 'optuna')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
