"""The leaderboard section of a model card (README.md), replaced idempotently on every run.

Two places, as published Hub cards carry them: a markdown table in the body, between fixed
markers (`replace_leaderboard`), and model-index `eval_results` in the YAML front matter
(huggingface_hub.ModelCardData), so the Hub shows the scores. The markers and the section
live here, in eval, because `evomerge leaderboard` writes them; the export card
(evomerge.export.card) imports them to leave the section's place in the cards it writes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

SOURCE = "evomerge leaderboard (lm-eval)"
SOURCE_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
NORM_URL = "https://huggingface.co/docs/leaderboards/open_llm_leaderboard/normalization"
LEADERBOARD_BEGIN = "<!-- evomerge:leaderboard -->"
LEADERBOARD_END = "<!-- /evomerge:leaderboard -->"
LEADERBOARD_PLACEHOLDER = "_No leaderboard run yet: `evomerge leaderboard MODEL_DIR` fills this._"


def leaderboard_section(body_md: str | None) -> str:
    """The marked leaderboard section (markers included); a placeholder when there is no run."""
    return f"{LEADERBOARD_BEGIN}\n{(body_md or LEADERBOARD_PLACEHOLDER).strip()}\n{LEADERBOARD_END}"


def replace_leaderboard(card_text: str, body_md: str) -> str:
    """Insert or replace the leaderboard section of a card; appended when the markers are absent."""
    section = leaderboard_section(body_md)
    pattern = re.compile(re.escape(LEADERBOARD_BEGIN) + r".*?" + re.escape(LEADERBOARD_END), re.S)
    if pattern.search(card_text):
        return pattern.sub(lambda _: section, card_text, count=1)
    return card_text.rstrip() + "\n\n## Leaderboard\n\n" + section + "\n"


def markdown_table(df: Any, *, backend: str, tasks: str) -> str:
    """Per-task metrics as in published cards: task, metric, n-shot, value ± stderr."""
    import lm_eval

    lines = [
        f"`evomerge leaderboard --tasks {tasks} --backend {backend}` "
        f"(lm-eval {getattr(lm_eval, '__version__', '?')}).",
        "",
        *_summary_lines(df),
        "| Task | Metric | Filter | n-shot | Value | ± Stderr |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in df.itertuples(index=False):
        name = f"**{r.alias}**" if r.group else r.alias
        shots = "" if r.n_shot is None or r.n_shot != r.n_shot else int(r.n_shot)
        err = "" if math.isnan(r.stderr) else f"{r.stderr:.4f}"
        lines.append(f"| {name} | {r.metric} | {r.filter} | {shots} | {r.value:.4f} | {err} |")
    return "\n".join(lines)


def _summary_lines(df: Any) -> list[str]:
    """The Open LLM Leaderboard v2 table (raw and normalized, with the average), when the run
    has any of its six benchmarks."""
    from evomerge.eval.leaderboard_norm import summary_frame

    summary = summary_frame(df)
    if not len(summary):
        return []
    lines = [
        f"Open LLM Leaderboard v2 scores, normalized as [the leaderboard does]({NORM_URL}) "
        "(0 = random guessing, 100 = perfect):",
        "",
        "| Benchmark | Metric | Raw | Normalized |",
        "|---|---|---:|---:|",
    ]
    for r in summary.itertuples(index=False):
        name = f"**{r.benchmark}**" if r.benchmark.startswith("Average") else r.benchmark
        lines.append(f"| {name} | {r.metric} | {r.raw:.4f} | {r.normalized:.2f} |")
    return [*lines, "", "lm-eval's raw values:", ""]


def eval_results(df: Any) -> list[Any]:
    """model-index entries: every lm-eval row of `df` (results_frame's columns), then the
    normalized leaderboard benchmarks."""
    from huggingface_hub import EvalResult

    from evomerge.eval.leaderboard_norm import summary_frame

    out = [
        EvalResult(
            task_type="text-generation",
            dataset_type=r.task,
            dataset_name=r.alias,
            metric_type=r.metric if r.filter == "none" else f"{r.metric} ({r.filter})",
            metric_value=round(float(r.value), 6),
            source_name=SOURCE,
            source_url=SOURCE_URL,
        )
        for r in df.itertuples(index=False)
    ]
    for r in summary_frame(df).itertuples(index=False):
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=r.task,
                dataset_name=f"Open LLM Leaderboard v2: {r.benchmark} (normalized)",
                metric_type=f"normalized {r.metric}".strip(),
                metric_value=round(float(r.normalized), 4),
                source_name=SOURCE,
                source_url=NORM_URL,
            )
        )
    return out


def update_card(path: Path, df: Any, *, backend: str, tasks: str) -> Path:
    """Insert or replace the leaderboard section and eval_results of the card at `path`."""
    from huggingface_hub import ModelCard

    text = path.read_text() if path.is_file() else ""
    if not text.lstrip().startswith("---"):
        text = f"---\nlibrary_name: transformers\n---\n\n# {path.parent.name}\n\n{text}"
    card = ModelCard(text, ignore_metadata_errors=True)
    keep = [e for e in card.data.eval_results or [] if e.source_name != SOURCE]
    card.data.eval_results = keep + eval_results(df) or None
    card.data.model_name = card.data.model_name or path.parent.name
    card.text = replace_leaderboard(card.text, markdown_table(df, backend=backend, tasks=tasks))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(card))
    tmp.replace(path)
    return path
