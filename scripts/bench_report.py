"""Where benchmark scripts put their numbers: results/bench/NAME.json (the full data, with the
date, machine and versions) and results/bench/NAME.md (a short summary with the same header), so
a figure quoted in the README points to a committed file."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "results" / "bench"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(**extra: str) -> dict[str, str]:
    """Date, machine, load and the versions that the figures depend on (plus `extra`)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average_1min": f"{os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        **{d: _version(d) for d in ("evomerge", "torch", "transformers", "safetensors")},
        **extra,
    }


def write_report(
    name: str,
    title: str,
    env: dict[str, str],
    data: Any,
    summary: list[str],
    out_dir: Path = BENCH_DIR,
) -> tuple[Path, Path]:
    """Write out_dir/name.json ({"environment": env, "results": data}) and out_dir/name.md
    (title, the environment as a list, then the summary lines); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps({"environment": env, "results": data}, indent=2) + "\n")
    head = [f"# {title}", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    md.write_text("\n".join([*head, *summary]).rstrip() + "\n")
    print(f"wrote {js.relative_to(REPO) if js.is_relative_to(REPO) else js} and {md.name}")
    return js, md
