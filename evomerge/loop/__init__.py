"""The only package that knows search + merge + eval.

- workbench.py: one worker's merge + eval (LiveWorkbench), what trials are scored with
- trial.py: one trial from ask to its values (TrialScorer: the objective Optuna optimizes)
- run.py: the search loop as named steps (run_search)
- heldout.py: held-out re-scoring of the top trials and the baselines
- cli.py: the `evomerge search` and `evomerge status` handlers

Import from those modules; this package re-exports nothing.
"""
