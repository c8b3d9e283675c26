"""The search loop: ask -> decode -> merge in place -> evaluate in chunks (prune) -> tell.

The only module that wires search + merge + eval. One process = one worker, scoring trials with
one LiveWorkbench (workbench.py: the base loaded once, task vectors resident, every candidate
written straight into the live weights). Several processes running the same command (same
--study/--storage) share the study; see search/study.py for the budget rule.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from evomerge.errors import CandidateError, ConfigError, EvomergeError
from evomerge.recipe import Recipe, dump_recipe
from evomerge.search.baselines import baseline_trials
from evomerge.search.objective import Objectives
from evomerge.search.results import (
    SearchOutcome,
    heldout_scores,
    load_study_outcome,
    ranked,
    spearman,
    status_text,
    trial_line,
    write_csv,
    write_meta,
)
from evomerge.search.samplers import (
    CONSTRAINED_SAMPLERS,
    DEFAULT_PRUNER,
    make_pruner,
    make_sampler,
    options_for,
)
from evomerge.search.space import SearchSpace
from evomerge.search.study import (
    FAIL_KIND,
    STOPPED_AT,
    budget_state,
    enqueue,
    open_storage,
    open_study,
    over_budget,
    storage_url,
)
from evomerge.workbench import LiveWorkbench

__all__ = ["SearchOutcome", "cli_search", "cli_status", "load_study_outcome", "run_search"]


class Workbench(Protocol):
    """What the loop needs from merge + eval (LiveWorkbench; tests pass a fake)."""

    task_names: list[str]
    higher_is_better: dict[str, bool]

    def evaluate(self, recipe: Recipe | None, split: str = "search", on_chunk: Any = None) -> Any:
        """Merge `recipe` into the live model (None: the base as loaded), evaluate `split`."""
        ...


CSV_EVERY_S = 30.0  # trials.csv is refreshed this often during a search, and at its end


class OverBudget(EvomergeError):
    """A worker asked for a trial when the budget was already taken by earlier trials."""


class _Reporter:
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


def run_search(
    space_path: str | Path,
    *,
    study: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    results: str | Path = "results",
    device: str | None = None,
    backend: str | None = None,
    prune: bool = True,
    workbench: Workbench | None = None,
    quiet: bool = False,
    rescore: bool = True,
    stop: Callable[[Any], bool] | None = None,
) -> SearchOutcome:
    """Run (or resume, or join as a worker) the study of a search-space file.

    `rescore` False skips the held-out re-scoring of the top trials; `stop(study)` True ends
    the loop before the next trial (an extra budget rule, e.g. documents scored)."""
    import optuna
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
    # heartbeats and fail_stale_trials are flagged experimental; they are what crash recovery is
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = SearchSpace.from_yaml(space_path)
    cfg, ecfg = space.spec.search, space.spec.eval
    sampler = sampler or cfg.get("sampler", "tpe")
    space.use_sampler(sampler)
    n_trials = n_trials if n_trials is not None else cfg.get("n_trials")
    timeout = timeout if timeout is not None else cfg.get("timeout")
    seed = seed if seed is not None else int(cfg.get("seed", 0))
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials: expected a positive integer, but got {n_trials}")
    name = study or space.spec.name
    study_dir = Path(results) / name
    url = storage_url(storage, study_dir)
    heartbeat = int(cfg.get("heartbeat", 30))
    wb = workbench or LiveWorkbench.from_space(space, backend, device)
    # storage (and the study folder) only once the models and tasks loaded: a bad input
    # leaves nothing behind
    obj = Objectives.build(space.spec.objectives, wb.higher_is_better, space.spec.max_drop)
    constrained = obj.max_drop is not None
    use_cf = constrained and sampler in CONSTRAINED_SAMPLERS
    smp = make_sampler(sampler, space, seed, len(obj.specs), options_for(cfg, "sampler", sampler))
    pname = cfg.get("pruner", DEFAULT_PRUNER)
    popts = options_for(cfg, "pruner", pname)
    first = getattr(wb, "first_chunk_docs", None)
    pruner, mode = make_pruner(pname, len(obj.specs), prune, popts, first() if first else None)
    created = not study_dir.exists()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        store = open_storage(url, heartbeat=heartbeat, grace=cfg.get("grace_period"))
        st = open_study(name, store, smp, pruner, obj.directions)
    except ConfigError:  # bad storage URL or study: leave no half-made results/NAME behind
        if created:
            shutil.rmtree(study_dir, ignore_errors=True)
        raise
    if st.get_trials(deepcopy=False):
        # resuming or joining: a sampler seeded as before would replay the proposals (random
        # start-up draws) it already made, so the same candidates would be evaluated again
        st.sampler.reseed_rng()
    _record_study(st, space, space_path, sampler, seed, obj)
    _record_doc_ids(st, wb)
    write_meta(study_dir, name, url, str(space_path))
    for split in ("search", "heldout"):
        if f"base_{split}" not in st.user_attrs and space.spec.base_model:
            res = wb.evaluate(None, split)
            st.set_user_attr(f"base_{split}", {t: s.mean for t, s in res.tasks.items()})
    base_search = st.user_attrs.get("base_search")
    enqueue(st, baseline_trials(space))
    mine: dict[str, Any] = {}

    def objective(trial: Any) -> Any:
        mine["number"], mine["recipe"] = trial.number, None
        if over_budget(st, trial.number, n_trials):
            trial.set_user_attr(FAIL_KIND, "over_budget")
            raise OverBudget("budget already taken by earlier trials")
        recipe = space.suggest(trial)
        mine["recipe"] = recipe
        trial.set_user_attr("recipe", dump_recipe(recipe))
        prev = _same_params(st, trial)
        if prev is not None:  # scoring is deterministic: the same candidate, the same scores
            for key in [k for k in prev.user_attrs if k.startswith("proxy_")] + _COPIED:
                if key in prev.user_attrs:
                    trial.set_user_attr(key, prev.user_attrs[key])
            trial.set_user_attr("docs_scored", 0)
            trial.set_user_attr("repeat_of", prev.number)
            if constrained:
                trial.set_constraint("max_drop", prev.user_attrs.get("violation", 0.0))
            return prev.values if len(prev.values) > 1 else prev.values[0]
        rep = _Reporter(trial, obj, mode, wb.task_names)
        try:
            res = wb.evaluate(recipe, "search", on_chunk=rep)
            means = {t: float(s.mean) for t, s in res.tasks.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise CandidateError(f"non-finite scores {means}")
        except CandidateError as exc:
            trial.set_user_attr(FAIL_KIND, "candidate")
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_KIND, "interrupted")
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            raise
        for t, m in means.items():
            trial.set_user_attr(f"proxy_{t}", m)
        docs = sum(s.n for s in res.tasks.values())
        trial.set_user_attr("docs_scored", docs)
        if rep.pruned:
            # Return the estimate from the documents scored so far instead of raising
            # TrialPruned (the workaround Optuna documents with WilcoxonPruner): GP and
            # CMA-ES learn only from COMPLETE trials, and without this they keep proposing
            # the region the pruner just cut. trial_state() shows it as PRUNED, and it is
            # never ranked, re-scored on held-out or exported.
            trial.set_user_attr(STOPPED_AT, docs)
        elif mode == "examples":
            rep.report_examples(res.per_example)  # the full set: later trials pair against it
        values = obj.values(means)
        violation = obj.violation(means, base_search)
        trial.set_user_attr("violation", violation)
        if constrained:
            trial.set_constraint("max_drop", violation)  # <= 0 feasible; tpe/nsga2/gp use it
        if constrained and not use_cf:
            values = obj.penalized(values, violation)
        return values if len(values) > 1 else values[0]

    nudged: set[int] = set()
    done, _ = budget_state(st)
    budget = getattr(stop, "progress", None)  # a documents budget: the bar counts evaluations
    bar = tqdm(
        total=stop.total if budget else n_trials,
        initial=round(budget(st), 1) if budget else min(done, n_trials or done),
        disable=quiet,
        desc=name,
        unit="full eval" if budget else "trial",
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} {unit} [{elapsed}<{remaining}]"
        if budget
        else None,
    )
    start = csv_at = time.time()
    try:
        while timeout is None or time.time() - start < timeout:
            done, running = budget_state(st)
            if (n_trials is not None and done >= n_trials) or (stop is not None and stop(st)):
                break
            if n_trials is not None and done + running >= n_trials:
                if getattr(store, "heartbeat_interval", None) is None:
                    break  # no heartbeats: cannot tell a slow worker from a dead one
                optuna.storages.fail_stale_trials(st)  # a dead worker's trial is re-queued
                _first_heartbeat(store, st, nudged)
                time.sleep(min(2.0, heartbeat))
                continue
            t0 = time.time()
            st.optimize(
                objective, n_trials=1, catch=(CandidateError, OverBudget), gc_after_trial=False
            )
            if time.time() - csv_at > CSV_EVERY_S:  # rewriting it costs O(trials): not per trial
                write_csv(st, study_dir)
                csv_at = time.time()
            line = trial_line(st, mine, time.time() - t0)
            if line and " over_budget " not in line:
                bar.update(round(min(budget(st), stop.total), 1) - bar.n if budget else 1)
                if not quiet:
                    bar.write(line)
    except KeyboardInterrupt:
        write_csv(st, study_dir)
        bar.close()
        raise
    bar.close()
    if rescore:
        rescore_heldout(st, space, wb, obj, int(ecfg.get("heldout_top_k", 5)), quiet)
    write_csv(st, study_dir)
    out = load_study_outcome(study_dir, storage)
    if not quiet:
        print(status_text(out, top=10), file=sys.stderr)
    return out


_COPIED = [STOPPED_AT, "violation"]  # user attrs a repeated candidate takes from its twin


def _same_params(st: Any, trial: Any) -> Any:
    """The earliest COMPLETE trial with exactly this trial's parameters, or None. Samplers do
    propose a point again (GP near its optimum, TPE from a narrow Parzen window); it is
    answered from the twin's scores, costing no evaluation (Optuna's FAQ recipe)."""
    from optuna.trial import TrialState

    params = trial.params
    for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == params:
            return t
    return None


def _first_heartbeat(store: Any, st: Any, nudged: set[int]) -> None:
    """A worker killed between creating a trial and its first heartbeat leaves a RUNNING trial
    that Optuna never calls stale (it has no heartbeat to age), so the budget would wait on it
    forever. Record one heartbeat per RUNNING trial on its behalf: a dead trial then goes stale
    after the grace period; a live worker's own heartbeats carry on as before."""
    from optuna.trial import TrialState

    study_id = None
    for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in nudged:
            continue
        if study_id is None:
            study_id = store.get_study_id_from_name(st.study_name)
        store.record_heartbeat(store.get_trial_id_from_study_id_trial_number(study_id, t.number))
        nudged.add(t.number)


def _record_study(
    st: Any, space: SearchSpace, path: Any, sampler: str, seed: int, obj: Objectives
) -> None:
    text = Path(path).read_text()
    if st.user_attrs.get("space_yaml") not in (None, text):
        print(
            f"warning: the space file changed since study '{st.study_name}' began; stored "
            "trials are decoded with the new file",
            file=sys.stderr,
        )
    for key, val in (
        ("space_yaml", text),
        ("space_path", str(path)),
        ("sampler", sampler),
        ("seed", seed),
        ("objective_names", obj.names),
    ):
        if st.user_attrs.get(key) != val:
            st.set_user_attr(key, val)


def _record_doc_ids(st: Any, wb: Any) -> None:
    """Study attr `doc_ids` = {task: {split: "0-63,..."}}: which documents each split used
    (export writes them into the recipe's provenance)."""
    from evomerge.provenance import compress_ids

    tasks = getattr(wb, "tasks", None)
    if not tasks or not all(hasattr(t, "doc_ids") for t in tasks):
        return
    ids = {t.name: {s: compress_ids(t.doc_ids(s)) for s in ("search", "heldout")} for t in tasks}
    if st.user_attrs.get("doc_ids") != ids:
        st.set_user_attr("doc_ids", ids)


def rescore_heldout(
    st: Any, space: SearchSpace, wb: Workbench, obj: Objectives, k: int, quiet: bool = False
) -> None:
    """Re-score the top-k trials by proxy and every baseline on the held-out split (once each,
    stored on the study) and print the proxy vs held-out Spearman rank correlation."""
    from optuna.trial import TrialState

    top = ranked(st)[:k]
    # every baseline too, pruned ones included: the card and the demo compare against them
    # (held-out scoring is reporting, outside the search's budget)
    baselines = [
        t
        for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("baseline") and t not in top
    ]
    done = score_heldout(st, space, wb, obj, top + baselines)
    if not quiet and done:
        proxy = {t.number: t.values[0] for t in ranked(st)}
        pairs = [(proxy[n], h["objective"][0]) for n, h in done.items() if n in proxy]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        print(
            f"held-out re-scoring: {len(pairs)} trials; proxy vs held-out Spearman "
            f"{'n/a' if rho is None else f'{rho:.3f}'}",
            file=sys.stderr,
        )


def score_heldout(
    st: Any, space: SearchSpace, wb: Workbench, obj: Objectives, trials: list[Any]
) -> dict[int, dict[str, Any]]:
    """Score `trials` on the held-out split (each once: cached as study attr `heldout_<n>`);
    returns every held-out entry of the study, {number: {"tasks": ..., "objective": ...}}."""
    done = heldout_scores(st)
    for t in trials:
        if t.number in done:
            continue
        res = wb.evaluate(space.decode(t.params), "heldout")
        means = {task: float(s.mean) for task, s in res.tasks.items()}
        entry = {"tasks": means, "objective": obj.values(means)}
        st.set_user_attr(f"heldout_{t.number}", entry)
        done[t.number] = entry
    return done


def cli_search(args: argparse.Namespace) -> int:
    run_search(
        args.space,
        study=args.study,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        sampler=args.sampler,
        seed=args.seed,
        results=args.results,
        device=args.device,
        backend=args.backend,
        prune=not args.no_prune,
    )
    return 0


def cli_status(args: argparse.Namespace) -> int:
    if not Path(args.study_dir).is_dir():
        raise ConfigError(f"study folder '{args.study_dir}' not found")
    print(status_text(load_study_outcome(args.study_dir, args.storage), top=args.top))
    return 0
