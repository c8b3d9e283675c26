"""`evomerge demo` end to end on a tiny zoo: search with pruning, Dirichlet baseline, held-out
table, export (the real demo trains the full zoo; here its settings are the tests' TINY ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_zoo import TINY

from evomerge.cli import main
from evomerge.zoo import build as zoo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1 min: two short searches and held-out re-scoring on 2400 documents
def test_demo_on_a_tiny_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # the demo space's task files are relative to the repository
    monkeypatch.setattr(zoo, "DEFAULT_SETTINGS", TINY)
    results, tiny = tmp_path / "results", tmp_path / "zoo"
    args = ["demo", "--results", str(results), "--zoo", str(tiny), "--n-trials", "8"]
    assert main(args) == 0
    assert zoo.zoo_is_built(tiny, TINY, mlp=False) and not (tiny / zoo.MLP_DIR).exists()
    table = json.loads((results / "demo" / "demo_table.json").read_text())
    names = [r["name"] for r in table["rows"]]
    assert names[:6] == ["base", "uniform merge", "add", "rev", "cap", "fmt"]
    assert names[6] == "dirichlet random (best of 8)" and names[7].startswith("evomerge gp (")
    assert all(set(r["scores"]) == set(table["tasks"]) for r in table["rows"])
    out = capsys.readouterr().out
    assert "Held-out test part scores" in out and names[7] in out
    export = results / "demo" / "export"
    assert (export / "recipe.yaml").is_file() and (export / "README.md").is_file()
    meta = json.loads((results / "demo" / "search.json").read_text())
    assert not Path(meta["space"]).is_absolute() or str(tmp_path) in meta["space"]
    assert not (REPO / "results" / ".demo_space.yaml").exists()
