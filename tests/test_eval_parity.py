"""Parity: the evaluator's per-example scores equal lm-eval's simple_evaluate with HFLM on the
same model object and documents (tiny random Llama, a generation and a multiple-choice task).
lm-eval's first call costs ~15 s of set-up, hence a file of its own."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import build_tiny_model, gen_records, mc_records, write_task

from evomerge.eval.evaluator import Evaluator
from evomerge.eval.tasks import load_tasks


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_scores_equal_lm_eval_simple_evaluate(tmp_path):
    """Same model object, same documents: per-example scores and responses equal lm-eval's."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.eval.hf.backend import HFBackend
    from evomerge.eval.task_specs import build_lm_eval_tasks

    torch.set_num_threads(1)
    model_dir = build_tiny_model(tmp_path / "model", seed=1)
    be = HFBackend(model_dir, batch_size=8)
    # half the answers are the model's own greedy output, so exact match is not trivially 0
    recs = gen_records(24)
    from evomerge.eval.protocol import GenerationSpec

    outs = be.generate(
        [(r["question"], GenerationSpec(until=("\n",), max_gen_toks=6)) for r in recs]
    )
    for k, r in enumerate(recs):
        if k % 2 == 0:
            r["answer"] = outs[k]
    specs = [
        str(write_task(tmp_path, "pg", "gen", recs)),
        str(write_task(tmp_path, "pm", "mc", mc_records(20))),
    ]
    tasks = load_tasks(specs)
    res = Evaluator(be, tasks, chunks=(16, None)).evaluate("all")

    lm = HFLM(pretrained=be.model, tokenizer=be.tokenizer, batch_size=8)
    ref = simple_evaluate(
        model=lm, tasks=list(build_lm_eval_tasks(specs).values()), log_samples=True,
        cache_requests=False, bootstrap_iters=0,
    )  # fmt: skip
    for task in tasks:
        theirs = {s["doc_id"]: float(s[task.metric]) for s in ref["samples"][task.name]}
        mine = {task.position(i): v for i, v in res.per_example[task.name].items()}
        assert mine == theirs
        assert res.tasks[task.name].mean == pytest.approx(
            ref["results"][task.name][f"{task.metric},none"]
        )
    assert res.tasks["pg"].mean >= 0.5  # the planted answers are found
