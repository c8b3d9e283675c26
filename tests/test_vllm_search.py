"""Backend parity inside a search, through the CLI: `evomerge search --backend hf` and
`--backend vllm` on the same space give the same trials with identical scores.

The tasks are built so that scores are far from 0: the generation answers are expert 1's
greedy continuations (even documents) and expert 2's (odd ones), the multiple-choice gold is
expert 2's preferred choice. A transfer that corrupted the candidates (the bug where every
candidate after the first swap scored 0) cannot pass. Each run also does the start-up
self-check (base, a candidate, the base back: identical first-chunk scores).

Runs only in the vLLM venv:  .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_search.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_support import build_tiny_model, write_task

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

N_DOCS = 24
WORDS = ["cat", "dog", "sun", "moon", "tree", "rock", "sky", "sea"]


def _greedy_and_choices(model: Path, prompts: list[str], choices: list[list[str]]):
    from evomerge.eval.hf.backend import HFBackend
    from evomerge.eval.protocol import GenerationSpec

    be = HFBackend(model, device="cpu", batch_size=8)
    gen = be.generate([(p, GenerationSpec(until=("\n",), max_gen_toks=3)) for p in prompts])
    picks = []
    for p, cs in zip(prompts, choices, strict=True):
        ll = be.loglikelihood([(p, " " + c) for c in cs])
        picks.append(max(range(len(cs)), key=lambda i: ll[i][0]))
    return gen, picks


def _family(root: Path, tie: bool) -> tuple[list[Path], list[Path]]:
    models = [
        build_tiny_model(root / n, seed=s, tie=tie, hidden=128, init=0.6)
        for s, n in enumerate(["b", "e1", "e2"])
    ]
    rng = random.Random(0)
    prompts = [f"q{i} {''.join(rng.choices('abcdefgh', k=4))}:" for i in range(N_DOCS)]
    choices = [rng.sample(WORDS, 3) for _ in range(N_DOCS)]
    gen1, _ = _greedy_and_choices(models[1], prompts, choices)
    gen2, picks2 = _greedy_and_choices(models[2], prompts, choices)
    gen_recs = [
        {"question": p, "answer": (gen1 if i % 2 == 0 else gen2)[i]} for i, p in enumerate(prompts)
    ]
    mc_recs = [
        {"question": p, "choices": cs, "label": k}
        for p, cs, k in zip(prompts, choices, picks2, strict=True)
    ]
    tasks = [
        write_task(root / "tasks", "pgen", "gen", gen_recs, max_gen_toks=3),
        write_task(root / "tasks", "pmc", "mc", mc_recs),
    ]
    return models, tasks


def _search(space: Path, backend: str, results: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "evomerge", "search", str(space), "--backend", backend,
           "--results", str(results), "--no-prune", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _trials(results: Path, name: str) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")
    out = []
    for t in study.trials:
        scores = {k: v for k, v in t.user_attrs.items() if k.startswith("proxy_")}
        out.append((t.number, t.state.name, t.params, scores, t.user_attrs.get("baseline")))
    held = {k: v for k, v in study.user_attrs.items() if k.startswith(("heldout_", "base_"))}
    return [*out, held]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied-host-inputs"])
def test_search_scores_identical_on_hf_and_vllm(tmp_path: Path, tie: bool) -> None:
    models, tasks = _family(tmp_path, tie)
    space = tmp_path / "parity.yaml"
    space.write_text(f"""
name: parity
base_model: {models[0]}
models: [{models[1]}, {models[2]}]
method: task_arithmetic
parameters:
  weight: {{low: 0.0, high: 1.0}}
tasks: [{tasks[0]}, {tasks[1]}]
eval: {{chunks: [6, null], heldout_top_k: 2, batch_size: auto}}
search: {{n_trials: 6, seed: 0, sampler: tpe}}
baselines: [uniform, experts]
""")
    _search(space, "hf", tmp_path / "r_hf")
    if not tie:  # and the vLLM side with its inputs streamed from host memory in row chunks
        text = space.read_text().replace("batch_size: auto}", "batch_size: auto, inputs: host}")
        space.write_text(text)
    log = _search(space, "vllm", tmp_path / "r_vllm")
    assert ("merge inputs in host memory" in log) == (not tie)
    hf, vl = _trials(tmp_path / "r_hf", "parity"), _trials(tmp_path / "r_vllm", "parity")
    assert vl == hf
    # the scores are real: each expert alone reproduces its own answers (half the generation
    # documents, all of expert 2's choices), so a corrupted transfer could not match them
    by_label = {t[4]: t[3] for t in hf[:-1] if t[4]}
    e1 = next(v for k, v in by_label.items() if k.startswith("expert:") and "e1" in k)
    e2 = next(v for k, v in by_label.items() if k.startswith("expert:") and "e2" in k)
    assert e1["proxy_pgen"] >= 0.3 and e2["proxy_pgen"] >= 0.3
    assert e2["proxy_pmc"] == 1.0
