"""The sampler and pruner names a space or `--sampler` may give, and what each implies for the
search space. Plain data: the space's validation (spec.py) and the factories (samplers.py) both
read it, and neither needs the other.
"""

from __future__ import annotations

from typing import Any

SAMPLER_CLASSES = {
    "tpe": "TPESampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "nsga2": "NSGAIISampler",
    "qmc": "QMCSampler",
}
SAMPLERS = (*SAMPLER_CLASSES, "dirichlet")  # dirichlet: ours, the random-search baseline
CONSTRAINED_SAMPLERS = ("tpe", "nsga2", "gp")  # read trial.constraints (set_constraint)
STICK_SAMPLERS = ("cmaes", "gp")  # continuous optimizers: no redundant simplex dimension

DEFAULT_PRUNER = "halving"  # measured best of median/halving on the zoo (README)
# name -> (Optuna class, report mode, evomerge's defaults); modes are explained in make_pruner
PRUNER_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wilcoxon": ("WilcoxonPruner", "examples", {"p_threshold": 0.1, "n_startup_steps": 8}),
    "median": ("MedianPruner", "docs", {"n_startup_trials": 5, "n_warmup_steps": 0}),
    "halving": ("SuccessiveHalvingPruner", "docs", {"reduction_factor": 3}),
}
PRUNERS = (*PRUNER_CLASSES, "none")


def parameterization(sampler: str) -> str:
    """The simplex parameterization a sampler searches in (see simplex.py)."""
    return "stick" if sampler in STICK_SAMPLERS else "logu"
