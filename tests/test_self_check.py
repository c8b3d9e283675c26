"""The start-up self-check of a search: base, a candidate, the base put back, and the base's
first-chunk scores must be identical; a weight path that does not restore stops the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_eval_support import build_tiny_model, gen_records, write_task

from evomerge.cli import main


def _space(tmp_path: Path) -> Path:
    models = [build_tiny_model(tmp_path / n, seed=s) for s, n in enumerate(["b", "e1", "e2"])]
    task = write_task(tmp_path / "tasks", "sc", "gen", gen_records(18))
    space = tmp_path / "sc.yaml"
    space.write_text(f"""
name: sc
base_model: {models[0]}
models: [{models[1]}, {models[2]}]
method: task_arithmetic
parameters: {{weight: {{low: 0.0, high: 1.0}}}}
tasks: [{task}]
eval: {{chunks: [4, null], device: cpu, heldout_top_k: 1}}
search: {{n_trials: 2, seed: 0, sampler: tpe}}
baselines: []
""")
    return space


def test_restore_base_puts_back_the_loaded_weights_exactly(tmp_path: Path):
    from evomerge.loop.workbench import LiveWorkbench
    from evomerge.merge.io import open_checkpoint
    from evomerge.search.space import SearchSpace

    space = SearchSpace.from_yaml(_space(tmp_path))
    wb = LiveWorkbench.from_space(space, backend="hf", device="cpu")
    base = open_checkpoint(str(tmp_path / "b"))
    wb.self_check()  # passes on the plain HF path
    wb.evaluate(wb.probe)  # a candidate is live now
    live = wb.backend.live_tensors()
    assert any(not (live[n] == base.get_tensor(n)).all() for n in wb.merger.tensor_names)
    wb.restore_base()
    for name in wb.merger.tensor_names:
        assert (live[name] == base.get_tensor(name)).all(), name


def test_a_path_that_does_not_restore_stops_the_search(tmp_path: Path, capsys, monkeypatch):
    from evomerge.loop.workbench import LiveWorkbench

    space = _space(tmp_path)
    monkeypatch.setattr(LiveWorkbench, "restore_base", lambda self: None)  # a broken path
    code = main(["search", str(space), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1
    assert "self-check failed on backend 'hf'" in err
    assert "first tensor that differs from the loaded model: 'model." in err
    assert not (tmp_path / "r" / "sc").exists()  # nothing started


def test_self_check_can_be_turned_off_and_is_validated(tmp_path: Path, capsys, monkeypatch):
    from evomerge.loop.workbench import LiveWorkbench

    space = _space(tmp_path)
    text = space.read_text().replace("heldout_top_k: 1}", "heldout_top_k: 1, self_check: maybe}")
    space.write_text(text)
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 2
    assert "eval.self_check: expected true or false, but got 'maybe'" in capsys.readouterr().err
    space.write_text(text.replace("self_check: maybe", "self_check: false"))
    calls = []
    monkeypatch.setattr(LiveWorkbench, "self_check", lambda self: calls.append(1))
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 0
    assert calls == []


@pytest.mark.parametrize("n", [1, 3])
def test_fingerprint_sees_a_changed_entry(n: int):
    import torch

    from evomerge.eval.vllm.fingerprint import fingerprint

    t = torch.randn(n, 5000)
    u = t.clone()
    u.view(-1)[-1] += 1.0  # the last entry is always sampled
    assert fingerprint(t) == fingerprint(t.clone()) and fingerprint(t) != fingerprint(u)
