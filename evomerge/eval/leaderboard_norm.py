"""Open LLM Leaderboard v2 normalized scores from lm-eval's raw `leaderboard` results.

The leaderboard rescales every score between the random baseline (0) and a perfect score (100):
a multiple-choice task with k choices gives max(0, (raw - 1/k) / (1 - 1/k)) x 100; BBH and MuSR
are normalized per subtask (their subtasks have different k) and then averaged; GPQA (k = 4) and
MMLU-Pro (k = 10) are normalized as one task; the generative tasks (IFEval, MATH Lvl 5) are only
scaled to 0-100 (IFEval: the mean of prompt-level and instruction-level strict accuracy). The
leaderboard's score is the plain mean of the six.
Source: https://huggingface.co/docs/leaderboards/open_llm_leaderboard/normalization
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# k = the number of answer choices of each multiple-choice subtask: the length of the static
# `doc_to_choice` list in lm-eval's tasks/leaderboard/bbh_mc/<name>.yaml (the leaderboard reads k
# the same way, from the choices); MuSR's from the normalization page (its choices are per doc).
BBH_CHOICES: dict[str, int] = {
    "boolean_expressions": 2,
    "causal_judgement": 2,
    "date_understanding": 6,
    "disambiguation_qa": 3,
    "formal_fallacies": 2,
    "geometric_shapes": 11,
    "hyperbaton": 2,
    "logical_deduction_five_objects": 5,
    "logical_deduction_seven_objects": 7,
    "logical_deduction_three_objects": 3,
    "movie_recommendation": 6,
    "navigate": 2,
    "object_counting": 19,
    "penguins_in_a_table": 5,
    "reasoning_about_colored_objects": 18,
    "ruin_names": 6,
    "salient_translation_error_detection": 6,
    "snarks": 2,
    "sports_understanding": 2,
    "temporal_sequences": 4,
    "tracking_shuffled_objects_five_objects": 5,
    "tracking_shuffled_objects_seven_objects": 7,
    "tracking_shuffled_objects_three_objects": 3,
    "web_of_lies": 2,
}
MUSR_CHOICES: dict[str, int] = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}


@dataclass(frozen=True)
class Benchmark:
    label: str
    group: str  # lm-eval task or group name
    metrics: tuple[str, ...]  # averaged when several (IFEval)
    kind: str  # "subtasks": per-subtask k; "mc": one k; "generative": x100 only
    choices: int = 0  # k for kind "mc"
    sub_choices: Mapping[str, int] | None = None  # subtask suffix -> k for kind "subtasks"


BENCHMARKS = (
    Benchmark("IFEval", "leaderboard_ifeval",
              ("prompt_level_strict_acc", "inst_level_strict_acc"), "generative"),
    Benchmark("BBH", "leaderboard_bbh", ("acc_norm",), "subtasks", sub_choices=BBH_CHOICES),
    Benchmark("MATH Lvl 5", "leaderboard_math_hard", ("exact_match",), "generative"),
    Benchmark("GPQA", "leaderboard_gpqa", ("acc_norm",), "mc", choices=4),
    Benchmark("MuSR", "leaderboard_musr", ("acc_norm",), "subtasks", sub_choices=MUSR_CHOICES),
    Benchmark("MMLU-Pro", "leaderboard_mmlu_pro", ("acc",), "mc", choices=10),
)  # fmt: skip
SUMMARY_GROUP = "open_llm_leaderboard_v2"  # the `task` of the summary rows in leaderboard.csv


def normalize_mc(raw: float, k: int) -> float:
    """(raw - 1/k) / (1 - 1/k) x 100, clipped at 0 (below random guessing counts as 0)."""
    low = 1.0 / k
    return max(0.0, (raw - low) / (1.0 - low)) * 100.0


def _values(df: Any) -> dict[tuple[str, str], float]:
    """(task, metric) -> value for the unfiltered metrics (filter 'none')."""
    rows = df[df["filter"] == "none"]
    return {(r.task, r.metric): float(r.value) for r in rows.itertuples(index=False)}


def _subtask_scores(
    values: Mapping[tuple[str, str], float], b: Benchmark
) -> dict[str, tuple[float, float]]:
    """Subtask task name -> (raw, normalized) for the subtasks present."""
    out = {}
    for suffix, k in (b.sub_choices or {}).items():
        task = f"{b.group}_{suffix}"
        raw = values.get((task, b.metrics[0]))
        if raw is not None:
            out[task] = (raw, normalize_mc(raw, k))
    return out


def _benchmark_score(
    values: Mapping[tuple[str, str], float], b: Benchmark
) -> tuple[float, float] | None:
    """(raw in 0-1, normalized in 0-100) of one benchmark; None when lm-eval has no result."""
    if b.kind == "subtasks":
        subs = _subtask_scores(values, b)
        if not subs:
            return None
        raws = [r for r, _ in subs.values()]
        raw = values.get((b.group, b.metrics[0]), sum(raws) / len(raws))
        return raw, sum(n for _, n in subs.values()) / len(subs)
    found = [values.get((b.group, m)) for m in b.metrics]
    if any(v is None for v in found):
        return None
    raw = sum(v for v in found if v is not None) / len(found)
    return raw, normalize_mc(raw, b.choices) if b.kind == "mc" else raw * 100.0


def summary_frame(df: Any) -> Any:
    """One row per benchmark present (benchmark, its lm-eval task, metric, raw in 0-1,
    normalized in 0-100), then `Average` (over
    the benchmarks present; the leaderboard's own average needs all six)."""
    import pandas as pd

    values = _values(df)
    rows = []
    for b in BENCHMARKS:
        score = _benchmark_score(values, b)
        if score is not None:
            rows.append(
                {"benchmark": b.label, "task": b.group, "metric": "+".join(b.metrics),
                 "raw": score[0], "normalized": score[1]}
            )  # fmt: skip
    if rows:
        n = len(rows)
        label = "Average" if n == len(BENCHMARKS) else f"Average ({n} of {len(BENCHMARKS)})"
        rows.append(
            {"benchmark": label, "task": SUMMARY_GROUP, "metric": "",
             "raw": sum(r["raw"] for r in rows) / n,
             "normalized": sum(r["normalized"] for r in rows) / n}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["benchmark", "task", "metric", "raw", "normalized"])


def with_normalized(df: Any) -> Any:
    """The lm-eval rows with a `normalized` column (0-100 for the rows the leaderboard normalizes
    on their own: multiple-choice subtasks and tasks; NaN elsewhere), then the summary rows
    (task SUMMARY_GROUP, alias = benchmark, value = raw, normalized)."""
    import pandas as pd

    out = df.copy()
    values = _values(df)
    norm: dict[tuple[str, str], float] = {}
    for b in BENCHMARKS:
        if b.kind == "subtasks":
            for task, (_, n) in _subtask_scores(values, b).items():
                norm[(task, b.metrics[0])] = n
        elif b.kind == "mc" and (b.group, b.metrics[0]) in values:
            norm[(b.group, b.metrics[0])] = normalize_mc(values[(b.group, b.metrics[0])], b.choices)
    out["normalized"] = [
        norm.get((r.task, r.metric), math.nan) if r.filter == "none" else math.nan
        for r in df.itertuples(index=False)
    ]
    summary = summary_frame(df)
    extra = pd.DataFrame(
        {"task": SUMMARY_GROUP, "alias": summary["benchmark"], "metric": summary["metric"],
         "filter": "none", "value": summary["raw"], "stderr": math.nan,
         "normalized": summary["normalized"], "group": True}
    )  # fmt: skip
    if len(extra):
        out = pd.concat([out, extra], ignore_index=True)
    out.attrs = df.attrs
    return out
