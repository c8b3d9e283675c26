"""Proxy evaluation: lm-eval tasks scored per example on a live model, in fidelity chunks.

Public API (heavy imports happen inside these modules, not here):
    tasks.load_tasks, tasks.ProxyTask          lm-eval tasks, split search / held-out
    backends.load_backend, backends.Backend    a live model (HF here; vLLM in vllm_backend)
    evaluator.Evaluator, EvalResult, TaskScore chunked evaluation with per-example scores
"""
