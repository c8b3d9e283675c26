"""The search loop: ask -> decode -> merge in place -> evaluate in chunks (prune) -> tell.

One process = one worker, scoring trials with one Workbench (workbench.py: the base loaded once,
task vectors resident, every candidate written straight into the live weights). Several
processes running the same command (same --study/--storage) share the study; see
search/study.py for the budget rule. `run_search` reads as its steps: resolve the settings,
load the workbench, open the study, record what the study is, score the base, enqueue the
baselines, run trials until the budget is spent, re-score the best on held-out, write results.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import CandidateError, ConfigError, EvomergeError
from evomerge.eval.tasks import heldout_parts
from evomerge.loop.heldout import heldout_entry, rescore_heldout
from evomerge.loop.preflight import preflight, print_summary
from evomerge.loop.trial import OverBudget, TrialScorer
from evomerge.loop.workbench import LiveWorkbench, Workbench
from evomerge.search import keys
from evomerge.search.baselines import baseline_trials
from evomerge.search.catalog import CONSTRAINED_SAMPLERS, DEFAULT_PRUNER
from evomerge.search.doc_ids import compress_ids
from evomerge.search.objective import Objectives
from evomerge.search.results import (
    SearchOutcome,
    load_study_outcome,
    status_text,
    write_csv,
    write_meta,
)
from evomerge.search.samplers import make_pruner, make_sampler, options_for
from evomerge.search.space import SearchSpace
from evomerge.search.study import budget_state, enqueue, open_storage, open_study, storage_url
from evomerge.search.trial_line import trial_line

CSV_EVERY_S = 30.0  # trials.csv is refreshed this often during a search, and at its end


@dataclass(frozen=True)
class Settings:
    """One run's settings: the command's arguments over the space's `search:` section."""

    name: str
    study_dir: Path
    url: str
    sampler: str
    seed: int
    n_trials: int | None
    timeout: float | None
    heartbeat: int


def resolve_settings(
    space: SearchSpace,
    *,
    study: str | None,
    n_trials: int | None,
    timeout: float | None,
    storage: str | None,
    sampler: str | None,
    seed: int | None,
    results: str | Path,
) -> Settings:
    cfg = space.spec.search
    n_trials = n_trials if n_trials is not None else cfg.get("n_trials")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials: expected a positive integer, but got {n_trials}")
    name = study or space.spec.name
    study_dir = Path(results) / name
    return Settings(
        name=name,
        study_dir=study_dir,
        url=storage_url(storage, study_dir),
        sampler=sampler or space.default_sampler(),
        seed=seed if seed is not None else int(cfg.get("seed", 0)),
        n_trials=n_trials,
        timeout=timeout if timeout is not None else cfg.get("timeout"),
        heartbeat=int(cfg.get("heartbeat", 30)),
    )


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
    _quiet_optuna()
    space = SearchSpace.from_yaml(space_path)
    run = resolve_settings(
        space, study=study, n_trials=n_trials, timeout=timeout, storage=storage,
        sampler=sampler, seed=seed, results=results,
    )  # fmt: skip
    # every check that needs no weights, before the workbench loads them (a given workbench
    # stands in for the models and tasks)
    pre = preflight(
        space, run.sampler, run.seed, prune, backend=backend, resources=workbench is None
    )
    codec = pre.codec
    print_summary(codec, run.sampler, quiet)
    wb = workbench or LiveWorkbench.from_space(space, backend, device, tasks=pre.tasks)
    if isinstance(wb, LiveWorkbench) and space.spec.eval.get("self_check", True):
        wb.self_check()
    # storage (and the study folder) only once the models and tasks loaded: a bad input
    # leaves nothing behind
    obj = Objectives.build(space.spec.objectives, wb.higher_is_better, space.spec.max_drop)
    st, store, mode = open_run_study(space, run, wb, obj, prune)
    record_study(st, space, space_path, run, obj)
    record_doc_ids(st, wb)
    write_meta(run.study_dir, run.name, run.url, str(space_path))
    score_base(st, space, wb)
    enqueue(st, baseline_trials(space, codec.parameterization))
    constraints_func = obj.max_drop is not None and run.sampler in CONSTRAINED_SAMPLERS
    scorer = TrialScorer(
        st, codec, wb, obj, report_mode=mode, n_trials=run.n_trials,
        constraints_func=constraints_func,
    )  # fmt: skip
    run_trials(st, store, scorer, run, stop, quiet)
    if rescore:
        top_k = int(space.spec.eval.get("heldout_top_k", 5))
        rescore_heldout(st, space, wb, obj, top_k, quiet)
    write_csv(st, run.study_dir)
    out = load_study_outcome(run.study_dir, storage)
    if not quiet:
        print(status_text(out, top=10), file=sys.stderr)
    return out


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
    # heartbeats and fail_stale_trials are flagged experimental; they are what crash recovery is
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_run_study(
    space: SearchSpace, run: Settings, wb: Any, obj: Objectives, prune: bool
) -> tuple[Any, Any, str]:
    """(study, storage, pruner report mode): the sampler and pruner the space and arguments
    ask for, on the study created or joined."""
    cfg = space.spec.search
    options = options_for(cfg, "sampler", run.sampler)
    sampler = make_sampler(run.sampler, space.spec, run.seed, options)
    pname = cfg.get("pruner", DEFAULT_PRUNER)
    first = getattr(wb, "first_chunk_docs", None)
    pruner, mode = make_pruner(
        pname, len(obj.specs), prune, options_for(cfg, "pruner", pname), first() if first else None
    )
    created = not run.study_dir.exists()
    try:
        run.study_dir.mkdir(parents=True, exist_ok=True)
        store = open_storage(run.url, heartbeat=run.heartbeat, grace=cfg.get("grace_period"))
        st = open_study(run.name, store, sampler, pruner, obj.directions)
    except ConfigError:  # bad storage URL or study: leave no half-made results/NAME behind
        if created:
            shutil.rmtree(run.study_dir, ignore_errors=True)
        raise
    if st.get_trials(deepcopy=False):
        # resuming or joining: a sampler seeded as before would replay the proposals (random
        # start-up draws) it already made, so the same candidates would be evaluated again
        st.sampler.reseed_rng()
    return st, store, mode


def record_study(st: Any, space: SearchSpace, path: Any, run: Settings, obj: Objectives) -> None:
    """Study attrs saying what the study searches (status and export decode trials with it)."""
    text = Path(path).read_text()
    if st.user_attrs.get(keys.SPACE_YAML) not in (None, text):
        print(
            f"warning: the space file changed since study '{st.study_name}' began; stored "
            "trials are decoded with the new file",
            file=sys.stderr,
        )
    for key, val in (
        (keys.SPACE_YAML, text),
        (keys.SPACE_PATH, str(path)),
        (keys.SAMPLER, run.sampler),
        (keys.SEED, run.seed),
        (keys.OBJECTIVE_NAMES, obj.names),
    ):
        if st.user_attrs.get(key) != val:
            st.set_user_attr(key, val)


def record_doc_ids(st: Any, wb: Any) -> None:
    """Study attr `doc_ids` = {task: {split: "0-63,..."}}: which documents each split used
    (export writes them into the recipe's provenance)."""
    tasks = getattr(wb, "tasks", None)
    if not tasks or not all(hasattr(t, "doc_ids") for t in tasks):
        return
    ids = {}
    for t in tasks:
        ids[t.name] = {s: compress_ids(t.doc_ids(s)) for s in keys.SPLITS}
        # the held-out parts, split as heldout_entry splits the scores: which documents chose
        # the winner and which tested it
        parts = heldout_parts(t.name, t.doc_ids("heldout")) or {}
        ids[t.name].update({p: compress_ids(v) for p, v in parts.items()})
    if st.user_attrs.get(keys.DOC_IDS) != ids:
        st.set_user_attr(keys.DOC_IDS, ids)


def score_base(st: Any, space: SearchSpace, wb: Workbench) -> None:
    """The base model's per-task means on both splits, once per study (before any merge:
    the workbench merges in place)."""
    for split in keys.SPLITS:
        todo = [split, *(keys.PARTS if split == "heldout" else ())]
        if not space.spec.base_model or all(keys.base_key(s) in st.user_attrs for s in todo):
            continue
        res = wb.evaluate(None, split)
        st.set_user_attr(keys.base_key(split), {t: s.mean for t, s in res.tasks.items()})
        if split == "heldout":  # base_select / base_test: the parts the winner is judged on
            entry = heldout_entry(res.per_example, None)
            for part in keys.PARTS:
                if part in entry:
                    st.set_user_attr(keys.base_key(part), entry[part]["tasks"])


def run_trials(
    st: Any, store: Any, scorer: TrialScorer, run: Settings, stop: Any, quiet: bool
) -> None:
    """One trial at a time until the budget (trials, time or `stop`) is spent, printing a line
    per trial and refreshing trials.csv now and then."""
    bar = _progress_bar(st, run, stop, quiet)
    nudged: set[int] = set()
    start = csv_at = time.time()
    try:
        while run.timeout is None or time.time() - start < run.timeout:
            state = _budget_left(st, store, run, stop, nudged)
            if state == "done":
                break
            if state == "wait":
                continue
            t0 = time.time()
            if not _optimize_one(st, scorer, run):
                continue
            if time.time() - csv_at > CSV_EVERY_S:  # rewriting it costs O(trials): not per trial
                write_csv(st, run.study_dir)
                csv_at = time.time()
            if scorer.number is not None:
                line = trial_line(
                    st, scorer.number, scorer.recipe, time.time() - t0, scorer.codec.space
                )
                _advance(bar, st, stop, line, quiet)
            scorer.check_streak(str(run.study_dir))
    except (KeyboardInterrupt, EvomergeError):  # the failed trials stay readable in the csv
        write_csv(st, run.study_dir)
        bar.close()
        raise
    bar.close()


def _optimize_one(st: Any, scorer: TrialScorer, run: Settings) -> bool:
    """Run one trial; False if another worker declared it dead meanwhile. That happens when
    this process went longer than the grace period without a heartbeat (stalled, paused, its
    storage locked): the other worker failed the trial and re-queued its parameters, so this
    result is dropped rather than ending the worker."""
    import optuna

    try:
        st.optimize(scorer, n_trials=1, catch=(CandidateError, OverBudget), gc_after_trial=False)
    except optuna.exceptions.UpdateFinishedTrialError:
        # the storage refused this worker's tell: the trial was already finished there, and
        # only another worker finishes a trial this one runs. No re-read of its state: one
        # in CI did not show it finished (a cached copy), and that re-raise ended the worker
        pass
    except ValueError:
        # "Cannot tell a FAIL trial": the other worker had won before the tell; any other
        # ValueError re-raises
        if scorer.number is None or not _finished_elsewhere(st, scorer.number):
            raise
    else:
        return True
    print(
        f"warning: trial {scorer.number} of study '{st.study_name}' was declared dead by "
        f"another worker (no heartbeat for its grace period; heartbeat every "
        f"{run.heartbeat} s) and re-queued; this worker's result for it is dropped",
        file=sys.stderr,
    )
    return False


def _finished_elsewhere(st: Any, number: int) -> bool:
    from optuna.trial import TrialState

    trials = st.get_trials(deepcopy=False)
    return number < len(trials) and trials[number].state == TrialState.FAIL


def _budget_left(st: Any, store: Any, run: Settings, stop: Any, nudged: set[int]) -> str:
    """Next move: "go" (ask for a trial), "done", or "wait" (the rest of the budget is running
    in other workers: wait for them to finish, or to go stale if they died)."""
    import optuna

    done, running = budget_state(st)
    if (run.n_trials is not None and done >= run.n_trials) or (stop is not None and stop(st)):
        return "done"
    if run.n_trials is None or done + running < run.n_trials:
        return "go"
    if getattr(store, "heartbeat_interval", None) is None:
        return "done"  # no heartbeats: cannot tell a slow worker from a dead one
    optuna.storages.fail_stale_trials(st)  # a dead worker's trial is re-queued
    first_heartbeat(store, st, nudged)
    time.sleep(min(2.0, run.heartbeat))
    return "wait"


def _progress_bar(st: Any, run: Settings, stop: Any, quiet: bool) -> Any:
    """A bar counting trials, or full evaluations when `stop` is a documents budget."""
    from tqdm.auto import tqdm

    done, _ = budget_state(st)
    budget = getattr(stop, "progress", None)
    return tqdm(
        total=stop.total if budget else run.n_trials,
        initial=round(budget(st), 1) if budget else min(done, run.n_trials or done),
        disable=quiet,
        desc=run.name,
        unit="full eval" if budget else "trial",
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} {unit} [{elapsed}<{remaining}]"
        if budget
        else None,
    )


def _advance(bar: Any, st: Any, stop: Any, line: str, quiet: bool) -> None:
    if line and f" {keys.FAIL_OVER_BUDGET} " not in line:
        budget = getattr(stop, "progress", None)
        bar.update(round(min(budget(st), stop.total), 1) - bar.n if budget else 1)
        if not quiet:
            bar.write(line)


def first_heartbeat(store: Any, st: Any, nudged: set[int]) -> None:
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
