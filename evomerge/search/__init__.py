"""The search: space codec (space.py, codec.py, decode.py, cells.py, spec.py, params.py),
samplers and pruners (catalog.py, samplers.py), Optuna storage (study.py), objectives,
baselines, and study records (keys.py, results.py). Nothing here imports the merge engine's
tensors or the evaluator; loop/ wires them together.

Import from the defining modules (`evomerge.search.space`, ...): this package re-exports nothing,
so reading one small module (keys.py) loads no more than it needs.
"""
