"""One trial, from Optuna's ask to its values: the objective the search loop optimizes.

Steps, each a method of TrialScorer: check the budget, suggest and record the recipe, answer a
repeated candidate from its twin, evaluate in chunks (reporting to the pruner), record the
scores, and turn them into objective values (constraint or penalty).
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.errors import CandidateError, ConfigError, EvomergeError, MergeError
from evomerge.loop.workbench import Workbench
from evomerge.recipe import Recipe, dump_recipe
from evomerge.search import keys
from evomerge.search.codec import Codec
from evomerge.search.objective import Objectives
from evomerge.search.study import over_budget, reached

# user attrs a repeated candidate takes from its twin (besides its proxy_<task> scores)
COPIED = (keys.STOPPED_AT, keys.VIOLATION)
# this many trials failing in a row stop the search: the space (or the models) is broken, and
# spending the rest of the budget on failures would only hide it
MAX_FAIL_STREAK = 5
# what a candidate may raise while it is merged and scored: the trial fails, the study goes on
TRIAL_ERRORS = (CandidateError, ConfigError, MergeError)


class OverBudget(EvomergeError):
    """A worker asked for a trial when the budget was already taken by earlier trials."""


class SearchStopped(EvomergeError):
    """MAX_FAIL_STREAK trials in a row failed (exit 1; a ConfigError when the space is why)."""


class Reporter:
    """on_chunk callback: report the partial objective, ask the pruner; False stops the eval."""

    def __init__(self, trial: Any, objectives: Objectives, mode: str, tasks: list[str]) -> None:
        self.trial, self.obj, self.mode = trial, objectives, mode
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self.reported: set[int] = set()
        self.pruned = False

    def report_examples(self, per_example: dict[str, dict[Any, float]]) -> None:
        coefs = self.obj.task_coefs(0)
        for task, docs in per_example.items():
            for doc, score in docs.items():
                step = self.task_index[task] * 1_000_000 + (
                    doc if isinstance(doc, int) else abs(hash(doc)) % 1_000_000
                )  # stable id per example: WilcoxonPruner pairs trials on it
                if step not in self.reported and task in coefs:
                    self.reported.add(step)
                    self.trial.report(coefs[task] * float(score), step)

    def __call__(self, chunk: int, partial: Any) -> bool:
        if self.mode == "none":
            return True
        if self.mode == "examples":
            self.report_examples(partial.per_example)
        else:
            means = {t: s.mean for t, s in partial.tasks.items()}
            self.trial.report(self.obj.values(means)[0], sum(s.n for s in partial.tasks.values()))
        self.pruned = self.trial.should_prune()
        return not self.pruned


class TrialScorer:
    """The objective passed to `study.optimize`. It remembers the last trial it was given
    (`number`, `recipe`) so the loop can print that trial's line."""

    def __init__(
        self,
        study: Any,
        codec: Codec,
        workbench: Workbench,
        objectives: Objectives,
        *,
        report_mode: str,
        n_trials: int | None,
        constraints_func: bool,
    ) -> None:
        self.study, self.codec, self.wb, self.obj = study, codec, workbench, objectives
        self.mode, self.n_trials = report_mode, n_trials
        self.constrained = objectives.max_drop is not None
        self.constraints_func = constraints_func  # the sampler reads trial.constraints
        self.base_search = study.user_attrs.get(keys.base_key("search"))
        self.number: int | None = None
        self.recipe: Recipe | None = None
        # this worker's failures since its last scored trial: (number, reason, is a bad recipe)
        self.streak: list[tuple[int, str, bool]] = []

    def __call__(self, trial: Any) -> Any:
        self.number, self.recipe = trial.number, None
        self.check_budget(trial)  # before any draw: a surplus trial consumes no proposal
        reached("asked")
        self.recipe = self.codec.suggest(trial)
        trial.set_user_attr(keys.RECIPE, dump_recipe(self.recipe))
        twin = same_params(self.study, trial)
        if twin is not None:  # scoring is deterministic: the same candidate, the same scores
            self.streak.clear()
            return self.answer_repeat(trial, twin)
        means, docs, pruned = self.evaluate(trial, self.recipe)
        for task, mean in means.items():
            trial.set_user_attr(keys.proxy_key(task), mean)
        trial.set_user_attr(keys.DOCS_SCORED, docs)
        if pruned:
            # Return the estimate from the documents scored so far instead of raising
            # TrialPruned (the workaround Optuna documents with WilcoxonPruner): GP and
            # CMA-ES learn only from COMPLETE trials, and without this they keep proposing
            # the region the pruner just cut. trial_state() shows it as PRUNED, and it is
            # never ranked, re-scored on held-out or exported.
            trial.set_user_attr(keys.STOPPED_AT, docs)
        self.streak.clear()
        return self.values(trial, means)

    def check_budget(self, trial: Any) -> None:
        if over_budget(self.study, trial.number, self.n_trials):
            trial.set_user_attr(keys.FAIL_KIND, keys.FAIL_OVER_BUDGET)
            raise OverBudget("budget already taken by earlier trials")

    def answer_repeat(self, trial: Any, twin: Any) -> Any:
        """Copy the twin's scores and values: no evaluation spent (docs_scored 0)."""
        copied = [k for k in twin.user_attrs if k.startswith(keys.PROXY_PREFIX)] + list(COPIED)
        for key in copied:
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        trial.set_user_attr(keys.DOCS_SCORED, 0)
        trial.set_user_attr(keys.REPEAT_OF, twin.number)
        if self.constrained:
            trial.set_constraint("max_drop", twin.user_attrs.get(keys.VIOLATION, 0.0))
        return twin.values if len(twin.values) > 1 else twin.values[0]

    def evaluate(self, trial: Any, recipe: Recipe) -> tuple[dict[str, float], int, bool]:
        """(per-task means, documents scored, stopped by the pruner). A failing candidate
        (any TRIAL_ERRORS) or Ctrl-C is recorded on the trial and raised on; a candidate that
        cannot be merged is raised as a CandidateError, which the loop's optimize() catches:
        Optuna stores the trial as FAIL, which is what its samplers expect."""
        rep = Reporter(trial, self.obj, self.mode, self.wb.task_names)
        try:
            res = self.wb.evaluate(recipe, "search", on_chunk=rep)
            means = {t: float(s.mean) for t, s in res.tasks.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise CandidateError(f"non-finite scores {means}")
        except TRIAL_ERRORS as exc:
            unmergeable = not isinstance(exc, CandidateError)
            reason = f"cannot merge: {exc}" if unmergeable else str(exc)
            trial.set_user_attr(keys.FAIL_KIND, keys.FAIL_CANDIDATE)
            trial.set_user_attr(keys.FAIL_REASON, reason)
            self.streak.append((trial.number, reason, isinstance(exc, ConfigError)))
            if unmergeable:
                raise CandidateError(reason) from exc
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(keys.FAIL_KIND, keys.FAIL_INTERRUPTED)
            trial.set_user_attr(keys.FAIL_REASON, "interrupted (Ctrl-C)")
            raise
        if not rep.pruned and self.mode == "examples":
            rep.report_examples(res.per_example)  # the full set: later trials pair against it
        return means, sum(s.n for s in res.tasks.values()), rep.pruned

    def check_streak(self, where: str) -> None:
        """Stop the search after MAX_FAIL_STREAK failures in a row: a ConfigError (exit 2)
        when every one was a recipe the space proposed and the method refused, else
        SearchStopped (exit 1). `where`: the study folder, for the status hint."""
        if len(self.streak) < MAX_FAIL_STREAK:
            return
        first, last = self.streak[0][0], self.streak[-1][0]
        head = (
            f"search stopped: {len(self.streak)} trials in a row failed (#{first}-#{last}); "
            f"last, trial #{last}: {self.streak[-1][1]}"
        )
        if all(bad_recipe for _, _, bad_recipe in self.streak):
            raise ConfigError(
                f"{head}. The space proposes candidates its method cannot merge: narrow the "
                f"bounds the reason names (every reason: evomerge status {where})"
            )
        raise SearchStopped(f"{head} (every reason: evomerge status {where})")

    def values(self, trial: Any, means: dict[str, float]) -> Any:
        """Objective values; the base constraint as trial.constraints, or as a penalty for
        samplers that cannot read constraints."""
        values = self.obj.values(means)
        violation = self.obj.violation(means, self.base_search)
        trial.set_user_attr(keys.VIOLATION, violation)
        if self.constrained:
            trial.set_constraint("max_drop", violation)  # <= 0 feasible; tpe/nsga2/gp use it
        if self.constrained and not self.constraints_func:
            values = self.obj.penalized(values, violation)
        return values if len(values) > 1 else values[0]


def same_params(study: Any, trial: Any) -> Any:
    """The earliest COMPLETE trial with exactly this trial's parameters, or None. Samplers do
    propose a point again (GP near its optimum, TPE from a narrow Parzen window); it is
    answered from the twin's scores, costing no evaluation (Optuna's FAQ recipe)."""
    from optuna.trial import TrialState

    params = trial.params
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == params:
            return t
    return None
