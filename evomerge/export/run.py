"""`evomerge export results/NAME`: the chosen trial as a model folder ready to publish.

The output folder holds recipe.yaml (mergekit YAML + random_seed + provenance), the merged
checkpoint (merged from recipe.yaml from scratch, then checked tensor by tensor against the
candidate the search scored), README.md (model card), trials.csv and plots/. Everything is
written into a temporary folder beside the target and renamed at the end: a failed export
leaves the previous one (or nothing) in place.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from evomerge.export.card import CardInputs
    from evomerge.recipe import Recipe
    from evomerge.search.results import SearchOutcome

TOP_K_PLOT = 5
CARRY_FILES = ("leaderboard.json", "leaderboard.csv")  # a leaderboard run on the same recipe


@dataclass
class ExportResult:
    out_dir: Path
    trial: int
    recipe: Recipe
    verified_tensors: int | None  # None with --no-checkpoint
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gguf: Path | None = None


def _check_gguf(recipe: Recipe, qtype: str, checkpoint: bool) -> None:
    """ConfigError for an unknown --gguf type, --no-checkpoint, or an architecture llama.cpp's
    layout is not written for here (read from the first source's config)."""
    from evomerge.errors import did_you_mean
    from evomerge.export.gguf import GGUF_TYPES, check_gguf_arch
    from evomerge.merge.io import open_checkpoint

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"--gguf: {did_you_mean(qtype, GGUF_TYPES, 'GGUF type')}")
    if not checkpoint:
        raise ConfigError("--gguf converts the merged checkpoint: drop --no-checkpoint")
    stage = recipe.final
    ref = stage.base_model or stage.models[0].model
    with open_checkpoint(ref) as reader:
        check_gguf_arch(reader.config, str(ref))


def export_study(
    study_dir: str | Path,
    *,
    trial: int | None = None,
    out: str | Path | None = None,
    storage: str | None = None,
    checkpoint: bool = True,
    device: str = "cpu",
    progress: bool = True,
    gguf: str | None = None,
) -> ExportResult:
    """Export trial `trial` (default: best held-out) of the study in `study_dir` to `out`;
    `gguf` (f16, bf16, q8_0) also writes model-<gguf>.gguf beside the safetensors."""
    from evomerge.export.info import check_study_dir, pick_note, pick_trial, scored_recipe
    from evomerge.merge.writer import check_out_dir
    from evomerge.search.results import load_study_outcome

    study_dir = Path(study_dir)
    check_study_dir(study_dir)
    outcome = load_study_outcome(study_dir, storage)
    chosen = pick_trial(outcome, trial)
    recipe = scored_recipe(outcome, chosen)
    if gguf is not None:
        _check_gguf(recipe, gguf, checkpoint)  # before anything is merged or written
    out_dir = Path(out) if out is not None else study_dir / "export"
    check_out_dir(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        result = _write_all(outcome, chosen, recipe, tmp, out_dir, checkpoint, device, progress)
        if gguf is not None:
            from evomerge.export.gguf import write_gguf

            written = write_gguf(tmp, tmp / f"model-{gguf}.gguf", gguf)
            result.gguf = out_dir / written.name  # where it lies once tmp is renamed
        note = pick_note(outcome, chosen, trial)  # which point of a front, and why
        result.notes[:0] = [note] if note else []
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.out_dir = out_dir
    return result


def _write_all(
    outcome: SearchOutcome,
    trial: FrozenTrial,
    recipe: Recipe,
    tmp: Path,
    out_dir: Path,
    checkpoint: bool,
    device: str,
    progress: bool,
) -> ExportResult:
    from evomerge.export.info import num_layers, study_provenance, task_list
    from evomerge.export.provenance import sources_provenance, versions
    from evomerge.merge.io import MARKER
    from evomerge.recipe import dump_recipe, stage_models

    stage = recipe.final
    tasks = task_list(outcome, trial)
    names = [s.name for s in recipe.stages if s.name]
    models = [r for s in recipe.stages for r in stage_models(s)]
    # a BASE+ADAPTER input: the base and the LoRA adapter folder are both sources
    refs = [(r.path, r.revision) for m in models for r in (m.base, m.lora) if r is not None]
    stage.provenance = {
        **versions(),
        **study_provenance(outcome, trial, tasks),
        "sources": sources_provenance(refs, names),
    }
    verified = None
    if checkpoint:
        from evomerge.export.verify import verify_checkpoint
        from evomerge.merge.engine import merge_recipe

        merge_recipe(recipe, tmp, device=device, progress=progress)
        if stage.slices is not None:  # a layer-stacking candidate (search/stacking.py)
            from evomerge.export.verify import compare_checkpoint, stacked_candidate

            n = num_layers(outcome, recipe.stages[0])
            verified = compare_checkpoint(tmp, stacked_candidate(recipe, n, device))
        elif len(recipe.stages) == 1:  # other searches score single-stage recipes only
            verified = verify_checkpoint(stage, tmp, num_layers(outcome, stage), device)
    else:
        tmp.mkdir(parents=True)
        (tmp / MARKER).write_text("written by evomerge; safe to overwrite with a new export\n")
    text = dump_recipe(recipe)
    (tmp / "recipe.yaml").write_text(text)
    _write_trials_csv(outcome, tmp / "trials.csv")
    plots, notes = _write_plots(outcome, trial, tmp / "plots")
    leaderboard = _carry_leaderboard(out_dir, tmp, text)
    inputs = _card_inputs(outcome, trial, recipe, text, tasks, plots, notes, leaderboard)
    inputs.leaderboard_results = _carried_results(tmp / "leaderboard.csv")
    from evomerge.export.card import build_card

    build_card(inputs).save(tmp / "README.md")
    return ExportResult(tmp, trial.number, recipe, verified, plots, notes)


def _write_trials_csv(outcome: SearchOutcome, path: Path) -> None:
    from evomerge.search.results import trials_frame

    trials_frame(outcome.study, outcome.objective_names).to_csv(path, index=False)


def _write_plots(
    outcome: SearchOutcome, trial: FrozenTrial, plot_dir: Path
) -> tuple[list[str], list[str]]:
    from evomerge.export.info import recipe_values, scored_recipe
    from evomerge.export.plots import write_plots

    top = [t for t in outcome.top_trials if t.number != trial.number][: TOP_K_PLOT - 1]
    rows = [
        (f"trial {t.number}" + (" (exported)" if t.number == trial.number else ""),
         recipe_values(scored_recipe(outcome, t).final))
        for t in [trial, *top]
    ]  # fmt: skip
    written, notes = write_plots(outcome.study, plot_dir, rows, highlight=trial.number)
    return [f"plots/{name}" for name in written], notes


def _carry_leaderboard(out_dir: Path, tmp: Path, recipe_text: str) -> str | None:
    """Keep a previous leaderboard run when it was run on this very recipe: copy its files and
    return its card section body (None otherwise)."""
    import re

    from evomerge.eval.leaderboard_card import LEADERBOARD_BEGIN, LEADERBOARD_END

    old_recipe, old_card = out_dir / "recipe.yaml", out_dir / "README.md"
    if not (old_recipe.is_file() and old_card.is_file()):
        return None
    if old_recipe.read_text() != recipe_text:
        return None
    if not any((out_dir / f).is_file() for f in CARRY_FILES):
        return None
    for name in CARRY_FILES:
        if (out_dir / name).is_file():
            shutil.copyfile(out_dir / name, tmp / name)
    pat = re.escape(LEADERBOARD_BEGIN) + r"\n?(.*?)\n?" + re.escape(LEADERBOARD_END)
    m = re.search(pat, old_card.read_text(), re.S)
    return m.group(1) if m else None


def _carried_results(csv_path: Path) -> list:
    """model-index entries of a carried leaderboard.csv (its lm-eval rows; the normalized summary
    rows are recomputed from them), [] without one."""
    if not csv_path.is_file():
        return []
    import pandas as pd

    from evomerge.eval.leaderboard_card import eval_results
    from evomerge.eval.leaderboard_norm import SUMMARY_GROUP

    df = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    if not {"task", "alias", "metric", "filter", "value"} <= set(df.columns):
        return []  # not a leaderboard.csv this version wrote: the card body still has its table
    return eval_results(df[df["task"] != SUMMARY_GROUP])


def _card_inputs(
    outcome: SearchOutcome,
    trial: FrozenTrial,
    recipe: Recipe,
    text: str,
    tasks: list[str],
    plots: list[str],
    notes: list[str],
    leaderboard: str | None,
) -> CardInputs:
    from evomerge.export.card import CardInputs, common_license, read_license
    from evomerge.export.info import score_rows, search_summary
    from evomerge.merge.io import resolve_model_path
    from evomerge.merge.table import get_method
    from evomerge.recipe import stage_models

    stage = recipe.final
    method = get_method(stage.merge_method)
    models = [str(r) for r in stage_models(stage)]
    licenses = {ref: read_license(resolve_model_path(ref)) for ref in models}
    return CardInputs(
        name=f"{outcome.study_name} (trial {trial.number})",
        method=method.name,
        method_doc=method.doc,
        method_reference=method.reference,
        models=models,
        base_model=str(stage.base_model) if stage.base_model else None,
        recipe_yaml=text,
        summary=search_summary(outcome, trial),
        tasks=tasks,
        scores=score_rows(outcome, trial),
        license=common_license(licenses),
        licenses_found=licenses,
        plots=plots,
        notes=notes,
        leaderboard_md=leaderboard,
        random_seed=stage.random_seed,
        method_random=method.random,
    )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an earlier export there is replaced only once tmp is complete."""
    from evomerge.merge.writer import check_out_dir, replace_dir

    if out_dir.exists():
        check_out_dir(out_dir)  # still an evomerge output (it may have changed meanwhile)
    # one atomic swap where the system allows it (the writer's rule)
    replace_dir(tmp, out_dir, out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}"))


def cli_export(args: argparse.Namespace) -> int:
    if args.trial is not None and args.trial < 0:
        raise ConfigError(f"--trial: expected a trial number >= 0, but got {args.trial}")
    result = export_study(
        args.study_dir,
        trial=args.trial,
        out=args.out,
        storage=args.storage,
        checkpoint=not args.no_checkpoint,
        device=getattr(args, "device", None) or "cpu",
        gguf=getattr(args, "gguf", None),
    )
    checked = (
        f"{result.verified_tensors} tensors identical to the scored candidate"
        if result.verified_tensors is not None
        else "no checkpoint (--no-checkpoint)"
    )
    print(f"exported trial {result.trial} to {result.out_dir} ({checked})", file=sys.stderr)
    if result.gguf is not None:
        print(f"wrote {result.gguf}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.push_to_hub:
        from evomerge.export.hub import push_to_hub

        url = push_to_hub(result.out_dir, args.push_to_hub)
        print(f"pushed to {args.push_to_hub}: {url}", file=sys.stderr)
    print(result.out_dir)
    return 0
