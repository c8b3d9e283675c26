"""Provenance of an exported merge: software versions, exact source checkpoints, study facts.

Written into recipe.yaml's `provenance:` block (mergekit ignores it). Nothing here depends on
the clock, so exporting the same trial twice writes the same recipe.yaml.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def versions() -> dict[str, str]:
    """Versions of the packages whose arithmetic produced the weights."""
    from importlib.metadata import PackageNotFoundError, version

    import evomerge

    out = {"evomerge": evomerge.__version__}
    for pkg in ("torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def source_provenance(ref: str, folder: Path, revision: str | None) -> dict[str, Any]:
    """How to get exactly this source again: the Hub revision (given, or the cached snapshot's
    commit) and the sha256 of every weight file."""
    out: dict[str, Any] = {}
    m = _SNAPSHOT.search(str(folder.resolve()))
    rev = revision or (m.group(1) if m else None)
    if rev:
        out["revision"] = rev
    out["sha256"] = {p.name: sha256_file(p) for p in weight_files(folder)}
    return out


def sources_provenance(
    refs: Iterable[tuple[str, str | None]], stage_names: Iterable[str] = ()
) -> dict[str, Any]:
    """`{ref: {revision?, sha256: {file: hex}}}` for every source; earlier stages are skipped."""
    from evomerge.merge.io import resolve_model_path

    names = set(stage_names)
    out: dict[str, Any] = {}
    for path, revision in refs:
        key = f"{path}@{revision}" if revision else path
        if path in names or key in out:
            continue
        folder = resolve_model_path(key)
        out[key] = source_provenance(key, folder, revision)
    return out
