"""The transformers backend: HFBackend (backend.py) and the loops it drives, which see it only
through the `Runner` interface (runner.py): log-likelihood scoring (score.py), greedy
generation (generate.py), the prefill both start with (prefill.py) and prefix reuse
(prefix.py). Import from the modules; this file imports nothing (torch is heavy).
"""
