"""Optuna plumbing: storage (crash recovery, several workers), trial states, the budget.

Budget rule: a trial counts toward --n-trials when it is COMPLETE, PRUNED, or FAIL because the
candidate itself failed (NaN, OOM, CandidateError: its evaluation was spent, and a space full of
failing candidates must still end). Trials abandoned by Ctrl-C or by a dead worker (heartbeat
stale) do not count; a dead worker's trial is re-queued with the parameters it stored
(RetryHeartbeatStaleTrialCallback, RDB storages).

"Exact budget" means: however often the workers are killed (SIGKILL at any instruction) and the
same command re-run, when the study ends exactly --n-trials trials count, each counted
trial's candidate was evaluated once (a repeat is answered from its twin, never re-scored), and
every proposal a dead worker stored, whole or in part, is evaluated once by its retry (a trial
whose worker died three times is given up: a candidate that kills its worker every time must not
stall the study; that trial, like a Ctrl-C'd one, does not count). Where a
kill lands between a sampler's draw and the trial storing it:
- qmc (search/qmc.py): the draw's index in the sequence is the first thing a trial stores, and
  its retry draws that index again, so the evaluated candidates are exactly the first
  --n-trials points of an uninterrupted run with the same seed (order aside: a retry runs once
  the dead trial goes stale);
- the samplers with an in-process random state (tpe, gp, cmaes, nsga2, random, dirichlet): the
  state is lost with the process and reseeded on resume (a seeded replay would propose the
  start-up draws already evaluated), so the run is not the uninterrupted one; nothing drawn
  and unstored is evaluated, and the budget is still exact.
The budget check (loop/trial.py) comes after the trial is created and before any draw (Optuna
samples lazily, on the first suggest): a surplus trial draws nothing. Test hook: with
EVOMERGE_SEARCH_KILL_AT=k[.n] the process SIGKILLs itself at KILL_STEPS[k-1] (common/killpoint.py).
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.common.killpoint import kill_point
from evomerge.errors import ConfigError
from evomerge.search import keys

if TYPE_CHECKING:
    import optuna

# the points of one trial a crash test can kill at: created (before any draw), a relative draw
# made (qmc: its index stored) but no parameter stored, one parameter stored
KILL_AT_ENV = "EVOMERGE_SEARCH_KILL_AT"
KILL_STEPS = ("asked", "drawn", "param-stored")


def reached(step: str) -> None:
    kill_point(KILL_AT_ENV, KILL_STEPS, step)


def trial_state(trial: Any) -> str:
    """The state evomerge shows and ranks by: Optuna's, except "PRUNED" for a trial the pruner
    stopped. Such a trial is COMPLETE in Optuna, valued by its estimate from the documents it
    scored (Optuna's documented workaround, see loop/trial.py): every sampler learns from it, and it
    never ranks as best and is never exported (only a baseline is re-scored on held-out)."""
    if trial.state.name == "COMPLETE" and trial.user_attrs.get(keys.STOPPED_AT):
        return "PRUNED"
    return trial.state.name


def storage_url(storage: str | None, study_dir: Path) -> str:
    """None -> SQLite in the study folder; "journal" or a *.log path -> a journal file (safe for
    many processes on one file system, no heartbeats); anything else is an Optuna URL."""
    if storage is None:
        return f"sqlite:///{study_dir / 'study.db'}"
    if storage == "journal":
        return f"journal:{study_dir / 'journal.log'}"
    if storage.endswith((".log", ".journal")) and "://" not in storage:
        return f"journal:{storage}"
    if "://" not in storage and not storage.startswith("journal:"):
        raise ConfigError(
            f"--storage: expected an Optuna URL (sqlite:///x.db, postgresql://...), "
            f"'journal' or a *.log file, but got '{storage}'"
        )
    return storage


def open_storage(url: str, heartbeat: int = 30, grace: int | None = None) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal:"):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _rdb(url, kwargs, heartbeat, grace)


def _rdb(url: str, kwargs: dict | None, heartbeat: int, grace: int | None) -> Any:
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    last: Exception | None = None
    for _ in range(5):  # workers starting together race to create the schema (PostgreSQL types)
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat,
                grace_period=grace or 4 * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
            if url.startswith("sqlite"):
                _fast_sqlite(storage.engine)
            return storage
        except ImportError as exc:  # the URL's database driver is not installed
            raise ConfigError(
                f"--storage '{url}': no database driver for it ({exc}); for PostgreSQL "
                "pip install psycopg2-binary and use postgresql+psycopg2://..."
            ) from None
        except SQLAlchemyError as exc:
            last = exc
            time.sleep(0.5 + random.random())
    first = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise ConfigError(f"--storage '{url}': cannot open the database: {first}")


def _fast_sqlite(engine: Any) -> None:
    """WAL journal + synchronous=NORMAL on every connection: a trial makes a dozen small
    writes (params, user attrs, reports), and SQLite's default (a rollback journal synced on
    every commit) made that bookkeeping cost more than scoring a pruned candidate (measured
    ~6x less per trial). Committed trials still survive a killed process; WAL also lets
    `evomerge status` read while workers write. Connections opened before this are dropped."""
    from sqlalchemy import event

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()


def open_study(
    name: str, storage: Any, sampler: Any, pruner: Any, directions: list[str]
) -> optuna.Study:
    """Create the study or continue it (load_if_exists); several workers may race here."""
    import optuna

    last: Exception | None = None
    for _ in range(5):  # concurrent first creation of the SQLite tables can collide
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                directions=directions,
                load_if_exists=True,
            )
            break
        except ValueError as exc:
            raise ConfigError(f"study '{name}' exists with other objectives: {exc}") from None
        except Exception as exc:  # OperationalError ("database is locked") on first creation
            last = exc
            time.sleep(0.5)
    else:
        raise ConfigError(f"cannot open study '{name}': {last}")
    if list(study.directions) and [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study '{name}' was created with directions "
            f"{[d.name.lower() for d in study.directions]}, but this space asks "
            f"for {directions}; use another --study name"
        )
    return study


def counts_toward_budget(trial: Any) -> bool:
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return (
        trial.state == TrialState.FAIL
        and trial.user_attrs.get(keys.FAIL_KIND) == keys.FAIL_CANDIDATE
    )


def budget_state(study: Any) -> tuple[int, int]:
    """(trials counted toward the budget, trials running now)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(counts_toward_budget(t) for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)


class DocsBudget:
    """stop(study) for run_search: True once the counted trials have scored as many documents
    as `full_trials` fully evaluated trials (a budget that pruned and unpruned searches can
    share: a pruned trial costs only the documents it scored). `progress` feeds the bar."""

    def __init__(self, full_trials: float) -> None:
        self.total = float(full_trials)

    def progress(self, study: Any) -> float:
        """Documents scored so far, in full evaluations (0 before the first one completes)."""
        docs = [
            (int(t.user_attrs.get(keys.DOCS_SCORED, 0)), trial_state(t) == "COMPLETE")
            for t in study.get_trials(deepcopy=False)
            if counts_toward_budget(t)
        ]
        full = max((d for d, complete in docs if complete), default=0)
        return sum(d for d, _ in docs) / full if full else 0.0

    def __call__(self, study: Any) -> bool:
        return self.progress(study) >= self.total


def over_budget(study: Any, number: int, n_trials: int | None) -> bool:
    """True if trial `number` is beyond the budget: as many counted or running trials were
    created before it. Trial numbers order trials the same way in every worker, so two workers
    that asked at the same moment agree on which of them is surplus."""
    from optuna.trial import TrialState

    if n_trials is None:
        return False
    ahead = sum(
        counts_toward_budget(t) or t.state == TrialState.RUNNING
        for t in study.get_trials(deepcopy=False)
        if t.number < number
    )
    return ahead >= n_trials


def enqueue(study: Any, trials: list[tuple[str, dict[str, Any]]]) -> int:
    """Enqueue baseline trials unless a trial with the same params exists (resumes, workers)."""
    before = len(study.get_trials(deepcopy=False))
    for label, params in trials:
        study.enqueue_trial(params, user_attrs={keys.BASELINE: label}, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False)) - before
