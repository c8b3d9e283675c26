"""Merge engine: methods, sparsification, checkpoint I/O, tokenizers, disk and in-place merges.

This package never imports optuna, lm_eval or vllm.
"""
