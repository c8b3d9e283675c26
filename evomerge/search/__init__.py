"""Search spaces (space.py, spec.py), Optuna plumbing (study.py) and stored results
(results.py). Nothing here imports the merge engine's tensors or the evaluator."""

from evomerge.search.space import SearchSpace, load_space

__all__ = ["SearchSpace", "load_space"]
