"""Proxy evaluation: lm-eval tasks scored per example on a live model, in fidelity chunks.

Public API (heavy imports happen inside these modules, not here):
    tasks.load_tasks, tasks.ProxyTask          lm-eval tasks, split search / held-out
    protocol.Backend, protocol.GenerationSpec  what a live model answers
    backends.load_backend                      a live model by name (hf/, vllm/)
    evaluator.Evaluator, EvalResult, TaskScore chunked evaluation with per-example scores
"""
