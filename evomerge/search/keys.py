"""The keys of a study's records: Optuna user attributes on trials and on the study.

They are the stored file format (status, export, the card and the demo read them back from a
finished study, possibly one written by an older version), so the values never change; only the
names of these constants may. Every module that reads or writes a study record uses them.
"""

from __future__ import annotations

# ---- trial user attributes ----------------------------------------------------------------
RECIPE = "recipe"  # the decoded candidate as recipe YAML text
PROXY_PREFIX = "proxy_"  # proxy_<task>: the search split's mean score of one task
DOCS_SCORED = "docs_scored"  # documents this trial's evaluation scored (0 for a repeat)
STOPPED_AT = "stopped_at_docs"  # documents scored when the pruner stopped the trial
VIOLATION = "violation"  # constraint value in points, <= 0 feasible (max_drop)
BASELINE = "baseline"  # label of an enqueued baseline ("uniform:linear", "expert:a:ties"...)
REPEAT_OF = "repeat_of"  # number of the earlier trial with the same parameters
FAIL_KIND = "fail_kind"  # FAIL trials: one of the FAIL_* values below
FAIL_REASON = "fail_reason"  # FAIL trials: a one-line message

FAIL_CANDIDATE = "candidate"  # the candidate itself failed (NaN, OOM): counts toward the budget
FAIL_INTERRUPTED = "interrupted"  # Ctrl-C: does not count
FAIL_OVER_BUDGET = "over_budget"  # the budget was taken by earlier trials: does not count

# ---- study user attributes ----------------------------------------------------------------
SPACE_YAML = "space_yaml"  # the search-space file's text (stored trials are decoded with it)
SPACE_PATH = "space_path"
SAMPLER = "sampler"
SEED = "seed"
OBJECTIVE_NAMES = "objective_names"
DOC_IDS = "doc_ids"  # {task: {split: "0-63,..."}}: the documents each split used
BASE_PREFIX = "base_"  # base_<split>: the base model's {task: mean} on that split
HELDOUT_PREFIX = "heldout_"  # heldout_<number>: {"tasks": {...}, "objective": [...]}
# ... plus, since the held-out split has two parts, "select" and "test": each {"tasks": {...},
# "objective": [...]} on that part alone. An entry without them (an older study, or a task
# with under 2 held-out documents) chose and tested on the same documents.
FIDELITY = "fidelity_sample"  # [trial numbers]: the seeded sample of COMPLETE trials re-scored
# on held-out to measure how well the proxy ranks candidates (Spearman over all of them)

SPLITS = ("search", "heldout")
PARTS = ("select", "test")  # the held-out parts (base_select / base_test, doc_ids entries)


def proxy_key(task: str) -> str:
    return f"{PROXY_PREFIX}{task}"


def base_key(split: str) -> str:
    return f"{BASE_PREFIX}{split}"


def heldout_key(number: int) -> str:
    return f"{HELDOUT_PREFIX}{number}"


def proxy_scores(attrs: dict) -> dict[str, float]:
    """{task: proxy mean} from a trial's user attributes."""
    return {k.removeprefix(PROXY_PREFIX): v for k, v in attrs.items() if k.startswith(PROXY_PREFIX)}


def heldout_number(key: str) -> int | None:
    """The trial number of a study attribute `heldout_<number>`, else None."""
    rest = key.removeprefix(HELDOUT_PREFIX)
    return int(rest) if key.startswith(HELDOUT_PREFIX) and rest.isdigit() else None


def heldout_part(entry: dict, part: str) -> dict:
    """{"tasks": ..., "objective": ...} of a held-out entry on one part ("select" / "test"),
    else the whole held-out entry (an older study: the same documents chose and tested)."""
    sub = entry.get(part)
    return sub if isinstance(sub, dict) else entry


def has_parts(entry: dict) -> bool:
    """Whether a held-out entry was chosen and tested on disjoint documents."""
    return all(isinstance(entry.get(p), dict) for p in PARTS)
