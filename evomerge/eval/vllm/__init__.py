"""The vLLM backend: VllmBackend (backend.py) and the worker extension that vLLM mixes into
each of its workers (worker.py, named by module path in `WORKER_EXTENSION`). Import from the
modules; this file imports nothing (vllm is heavy and optional)."""
