"""Model card (README.md) of an exported merge: Hugging Face front matter + a Markdown body.

The body is plain data rendered to text (CardInputs -> str), so tests can parse it back. Text
that comes from users (model names, task names, study names) is escaped for Markdown. The
leaderboard section sits between fixed markers so `evomerge leaderboard` can insert or replace
it in place, any number of times, without touching the rest of the card.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.common.model_dir import has_config, read_config
from evomerge.errors import ConfigError
from evomerge.eval.leaderboard_card import leaderboard_section  # eval owns the markers

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

TAGS = ["merge", "evomerge", "mergekit"]

# CommonMark's escapable punctuation that changes meaning inside a line or a table cell
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#+!|~])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ScoreRow:
    """Scores of one model: task -> score on the search (proxy) split and on the held-out split."""

    label: str
    proxy: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchSummary:
    study: str
    trial: int  # the exported trial's number
    sampler: str | None = None
    seed: int | None = None
    n_trials: int = 0
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    wall_time_s: float | None = None
    objectives: list[str] = field(default_factory=list)  # e.g. ["maximize mean"]
    # which documents chose the exported trial and which tested it (the held-out rows' scores)
    chosen_on: str = ""
    tested_on: str = ""


@dataclass
class CardInputs:
    name: str
    method: str
    method_doc: str
    method_reference: str
    models: list[str]  # every source model, as written in the recipe
    base_model: str | None
    recipe_yaml: str
    summary: SearchSummary
    tasks: list[str]
    scores: list[ScoreRow]  # winner first, then base, each source, the uniform merge
    license: str | None = None
    licenses_found: dict[str, str | None] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # paths relative to the card
    notes: list[str] = field(default_factory=list)
    leaderboard_md: str | None = None
    random_seed: int | None = None
    method_random: bool = False  # DARE/DELLA draws: mergekit needs the seed on its command line
    leaderboard_results: list[EvalResult] = field(default_factory=list)  # a carried run's


def md_escape(text: Any) -> str:
    """Backslash-escape Markdown punctuation so user text renders as written (also in tables)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def fence(text: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def hub_ids(refs: Sequence[str]) -> list[str]:
    """The refs that are Hub model ids (org/name, no local folder of that name), revision dropped;
    a BASE+ADAPTER ref contributes each of its parts.

    The Hub rejects a commit whose card's `base_model` is not a model id, so local folders stay
    out of the front matter (they are listed in the body).
    """
    out = []
    for ref in refs:
        for part in ref.split("+"):
            path = part.partition("@")[0]
            if _HUB_ID.match(path) and not Path(path).exists() and path not in out:
                out.append(path)
    return out


def read_license(model_dir: Path) -> str | None:
    """License of a local model folder: its README front matter, else config.json's `license`."""
    readme = model_dir / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict().get("license")
        except Exception:  # a README without valid front matter just says nothing
            lic = None
        if lic:
            return str(lic)
    if has_config(model_dir):
        try:
            lic = read_config(model_dir).get("license")
        except ConfigError:  # an unreadable config.json just says nothing either
            lic = None
        if lic:
            return str(lic)
    return None


def common_license(found: Mapping[str, str | None]) -> str | None:
    """The license every source declares, None when any source has none or they disagree."""
    values = set(found.values())
    if len(values) == 1 and None not in values:
        return values.pop()
    return None


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}"


def _mean(scores: Mapping[str, float], tasks: Sequence[str]) -> float | None:
    vals = [scores[t] for t in tasks if t in scores]
    return sum(vals) / len(vals) if len(vals) == len(tasks) and vals else None


def score_table(rows: Sequence[ScoreRow], tasks: Sequence[str], split: str) -> str:
    """Markdown table: one row per model, one column per task, then the mean."""
    head = ["model", *(md_escape(t) for t in tasks), "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        scores = row.heldout if split == "heldout" else row.proxy
        cells = [md_escape(row.label), *(_fmt(scores.get(t)) for t in tasks)]
        cells.append(_fmt(_mean(scores, tasks)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _summary_md(s: SearchSummary) -> str:
    rows = [
        ("study", md_escape(s.study)),
        ("exported trial", str(s.trial)),
        ("sampler", md_escape(s.sampler or "unknown")),
        ("seed", "none" if s.seed is None else str(s.seed)),
        ("objectives", md_escape(", ".join(s.objectives) or "unknown")),
        ("trials", str(s.n_trials)),
        ("completed", str(s.n_complete)),
        ("pruned", str(s.n_pruned)),
        ("failed", str(s.n_failed)),
        ("wall time", _duration(s.wall_time_s)),
    ]
    rows += [
        (k, md_escape(v)) for k, v in (("chosen on", s.chosen_on), ("tested on", s.tested_on)) if v
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _models_md(inp: CardInputs) -> str:
    lines = []
    for ref in inp.models:
        role = " (base)" if ref == inp.base_model else ""
        lic = inp.licenses_found.get(ref)
        lic_txt = f", license: {md_escape(lic)}" if lic else ""
        lines.append(f"- {md_escape(ref)}{role}{lic_txt}")
    return "\n".join(lines)


def _reproduce_md(inp: CardInputs) -> str:
    cmds = [
        "# evomerge: the same bytes as this checkpoint (random_seed is read from the recipe)",
        "evomerge merge recipe.yaml ./merged",
        "# mergekit: the same recipe (mergekit ignores random_seed and provenance)",
        "mergekit-yaml recipe.yaml ./merged-mergekit",
    ]
    text = fence("\n".join(cmds), "bash")
    if inp.method_random:
        text += (
            "\n\nThis method draws random masks; mergekit takes its seed on the command line "
            f"(`--random-seed {inp.random_seed}`) and draws them differently from evomerge, so "
            "only `evomerge merge` reproduces these exact weights."
        )
    return text


def _heldout_header(s: SearchSummary) -> str:
    """What the held-out rows are: which documents tested the exported trial, which chose it."""
    if not s.tested_on:
        return "Held-out split (documents never seen by the search):"
    return (
        f"Held-out scores on {md_escape(s.tested_on)}; the exported trial was chosen on "
        f"{md_escape(s.chosen_on)}:"
    )


def render_body(inp: CardInputs) -> str:
    """The Markdown body of the card (everything after the front matter)."""
    s = inp.summary
    parts = [
        f"# {md_escape(inp.name)}",
        f"A merge of {len(inp.models)} models with **{md_escape(inp.method)}**, found by "
        f"evomerge's Optuna search over merge recipes "
        f"(study {md_escape(s.study)}, trial {s.trial}).",
        "## Merge method",
        f"**{md_escape(inp.method)}**: {inp.method_doc.strip()}",
    ]
    if inp.method_reference:
        parts.append(f"Reference: {inp.method_reference.strip()}")
    parts += ["## Models", _models_md(inp)]
    if inp.license is None and any(inp.licenses_found.values()):
        parts.append(
            "The source licenses differ or are unknown for some sources, so no license is set "
            "here: check each source's terms before use."
        )
    parts += ["## Recipe", fence(inp.recipe_yaml, "yaml"), "## Search", _summary_md(s)]
    if inp.scores and inp.tasks:
        parts += [
            "## Scores",
            _heldout_header(s),
            score_table(inp.scores, inp.tasks, "heldout"),
            "Search (proxy) split:",
            score_table(inp.scores, inp.tasks, "proxy"),
        ]
    parts += ["## Leaderboard", leaderboard_section(inp.leaderboard_md)]
    if inp.plots:
        parts.append("## Plots")
        parts += [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in inp.plots]
    if inp.notes:
        parts += ["## Notes", "\n".join(f"- {md_escape(n)}" for n in inp.notes)]
    parts += ["## Reproduce", _reproduce_md(inp)]
    return "\n\n".join(parts) + "\n"


def card_data(inp: CardInputs) -> dict[str, Any]:
    """Front matter fields (huggingface_hub ModelCardData keywords), as merged-model cards carry
    them: the sources as `base_model` with `base_model_relation: merge` (the Hub draws the model
    tree from them), the pipeline, the license the sources agree on, and the scores."""
    data: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
    }
    base = hub_ids(inp.models)
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "merge"
    if inp.license:
        data["license"] = inp.license
    results = [*score_results(inp), *inp.leaderboard_results]
    if results:
        data["model_name"] = inp.name
        data["eval_results"] = results
    return data


def score_results(inp: CardInputs) -> list[EvalResult]:
    """The exported model's scores (its ScoreRow, first in `scores`) as model-index entries, one per
    task and split: held-out first (the documents that chose nothing, as the card's table), then
    the search split."""
    from huggingface_hub import EvalResult

    if not inp.scores:
        return []
    row, out = inp.scores[0], []
    for split, scores, label in (
        ("heldout", row.heldout, "held-out test"),
        ("search", row.proxy, "search"),
    ):
        for task in inp.tasks:
            value = scores.get(task)
            if value is None or math.isnan(value):
                continue
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=f"{task} ({label} split)",
                    dataset_split=split,
                    metric_type="score",
                    metric_name=f"mean per-example score (evomerge study {inp.summary.study})",
                    metric_value=round(float(value), 6),
                )
            )
    return out


def build_card(inp: CardInputs) -> ModelCard:
    """A huggingface_hub ModelCard: validated front matter + the rendered body."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(**card_data(inp))
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{render_body(inp)}")
