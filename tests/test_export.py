"""Export of a small study made here: tiny checkpoints, a fake evaluator whose scores are a known
function of the weights, a real Optuna study; then recipe, checkpoint, card, csv and plots."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _search_fakes import FakeWorkbench, ensure_methods
from conftest import load_tensors, write_tiny_model

from evomerge.cli import main
from evomerge.errors import ConfigError, MergeError
from evomerge.export.run import export_study
from evomerge.loop.run import run_search
from evomerge.recipe import load_recipe
from evomerge.search.doc_ids import expand_ids

optuna = pytest.importorskip("optuna")
ensure_methods()

SPACE = """
base_model: {base}
models: [{a}, {b}]
method: task_arithmetic
parameters:
  weight: {{simplex: true}}
  lambda: 1.0
tasks: [task0, task1]
{extra}
eval: {{heldout_top_k: 2}}
search: {{n_trials: 8, seed: 0, heartbeat: 1, grace_period: 2}}
"""


class _Task:
    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def doc_ids(self, split: str) -> list[int]:
        return list(range(self.n)) if split == "search" else list(range(1000, 1000 + self.n))


class Bench(FakeWorkbench):
    """FakeWorkbench with task objects, so the loop records the doc ids of each split."""

    def __init__(self) -> None:
        super().__init__(target=(0.7, 0.3), n_docs=12, chunks=(None,))
        self.tasks = [_Task(n, self.n_docs) for n in self.task_names]


def _make_study(root: Path, name: str, extra: str = "", sampler: str | None = None) -> Path:
    models = {k: write_tiny_model(root / "models" / k, seed=s, num_layers=2, hidden=32)
              for k, s in (("base", 0), ("a", 1), ("b", 2))}  # fmt: skip
    (models["a"] / "README.md").write_text("---\nlicense: mit\n---\n# a\n")
    for k in ("base", "b"):
        (models[k] / "README.md").write_text("---\nlicense: mit\n---\n")
    space = root / f"{name}.yaml"
    space.write_text(SPACE.format(extra=extra, **{k: str(v) for k, v in models.items()}))
    run_search(space, results=root / "results", workbench=Bench(), quiet=True, sampler=sampler)
    return root / "results" / name


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    return _make_study(tmp_path_factory.mktemp("study"), "ta")


@pytest.fixture(scope="module")
def exported(study_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "winner"
    return export_study(study_dir, out=out, progress=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_writes_everything(exported, study_dir: Path):
    out = exported.out_dir
    for f in ("recipe.yaml", "model.safetensors", "config.json", "tokenizer.json",
              "generation_config.json", "README.md", "trials.csv",
              "plots/optimization_history.png", "plots/param_importances.png",
              "plots/top_trials_weights.png"):  # fmt: skip
        assert (out / f).is_file(), f
    assert not list(out.parent.glob(".winner.tmp-*"))  # nothing half-written left behind
    assert exported.verified_tensors == len(load_tensors(out)) == 2 * 9 + 3  # layers, embed...


def test_recipe_is_the_scored_trial_with_provenance(exported, study_dir: Path):
    from evomerge.search.results import load_study_outcome

    outcome = load_study_outcome(study_dir)
    assert exported.trial == outcome.best_trial.number  # default: best held-out
    assert exported.trial in outcome.heldout
    recipe = load_recipe(exported.out_dir / "recipe.yaml")
    stage = recipe.final
    trial = outcome.study.trials[exported.trial]
    scored = load_recipe(trial.user_attrs["recipe"]).final
    assert [m.parameters for m in stage.models] == [m.parameters for m in scored.models]
    assert stage.random_seed == 0  # what CandidateMerger used for a recipe without one
    prov = stage.provenance
    assert prov["study"] == "ta" and prov["trial"] == exported.trial
    assert prov["sampler"] == "gp" and prov["seed"] == 0 and prov["tasks"] == ["task0", "task1"]
    assert prov["torch"] == torch.__version__ and "transformers" in prov and "evomerge" in prov
    assert expand_ids(prov["doc_ids"]["task0"]["heldout"]) == list(range(1000, 1012))
    base = str(stage.base_model)
    assert prov["sources"][base]["sha256"] == {
        "model.safetensors": _sha(Path(base) / "model.safetensors")
    }
    # mergekit reads the same file: the top level is a plain mergekit config
    raw = yaml.safe_load((exported.out_dir / "recipe.yaml").read_text())
    assert raw["merge_method"] == "task_arithmetic" and raw["base_model"] == base


def test_checkpoint_equals_hand_computed_task_arithmetic(exported):
    stage = load_recipe(exported.out_dir / "recipe.yaml").final
    base = load_tensors(Path(str(stage.base_model)))
    experts = [load_tensors(Path(str(m.model))) for m in stage.models]
    w = [m.parameters["weight"] for m in stage.models]
    lam = stage.parameters.get("lambda", 1.0)
    got = load_tensors(exported.out_dir)
    for name, b in base.items():
        ref = b + lam * sum(wi * (e[name] - b) for wi, e in zip(w, experts, strict=True))
        torch.testing.assert_close(got[name], ref, atol=1e-6, rtol=0)


def test_remerge_gives_identical_bytes(exported, tmp_path: Path):
    recipe = str(exported.out_dir / "recipe.yaml")
    assert main(["merge", recipe, str(tmp_path / "m1"), "--no-progress"]) == 0
    assert main(["merge", recipe, str(tmp_path / "m2"), "--no-progress"]) == 0
    first = _sha(tmp_path / "m1" / "model.safetensors")
    assert first == _sha(tmp_path / "m2" / "model.safetensors")
    assert first == _sha(exported.out_dir / "model.safetensors")


def test_card_front_matter_and_scores(exported, study_dir: Path):
    from huggingface_hub import ModelCard

    from evomerge.search.results import load_study_outcome

    path = exported.out_dir / "README.md"
    front = yaml.safe_load(path.read_text().split("---\n")[1])
    assert front["tags"] == ["merge", "evomerge", "mergekit"]
    assert front["license"] == "mit" and front["library_name"] == "transformers"
    assert "base_model" not in front  # local folders are not Hub ids
    card = ModelCard.load(path)
    outcome = load_study_outcome(study_dir)
    # the held-out table reports the test part (the fake scores the search split like the whole
    # held-out split, so only the held-out section is searched)
    section = card.text.split("Held-out scores on the held-out test part")[1]
    section = section.split("Search (proxy) split")[0]
    held = outcome.heldout[exported.trial]["test"]["tasks"]
    mean = (held["task0"] + held["task1"]) / 2
    row = f"| this merge (trial {exported.trial}) | {held['task0']:.4f} | {held['task1']:.4f} | "
    assert row + f"{mean:.4f} |" in section
    base = outcome.base["test"]
    assert f"| base model | {base['task0']:.4f} | {base['task1']:.4f} |" in section
    assert "| uniform merge (task\\_arithmetic) |" in card.text
    assert "| a alone |" in card.text and "| b alone |" in card.text
    assert "| sampler | gp |" in card.text and f"| trials | {len(outcome.study.trials)} |" in (
        card.text
    )
    assert "![optimization history](plots/optimization_history.png)" in card.text
    assert "mergekit-yaml recipe.yaml" in card.text


def test_card_metadata_through_the_cli_validates(study_dir: Path, tmp_path: Path, capsys):
    """`evomerge export`'s front matter, read back with huggingface_hub's card classes: pipeline,
    library, tags, the license the sources agree on, and a model-index with the exported trial's
    held-out and search scores; a leaderboard run on the same recipe joins it on re-export."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from evomerge.eval.leaderboard import save_leaderboard
    from evomerge.search.results import load_study_outcome

    out = tmp_path / "w"
    assert main(["export", str(study_dir), "--out", str(out), "--no-checkpoint"]) == 0
    card = ModelCard.load(out / "README.md")  # parses and validates the front matter
    data = card.data
    assert isinstance(data, ModelCardData)
    assert (data.pipeline_tag, data.library_name, data.license) == (
        "text-generation", "transformers", "mit"
    )  # fmt: skip
    assert data.tags == ["merge", "evomerge", "mergekit"]
    outcome = load_study_outcome(study_dir)
    trial = outcome.best_trial
    from evomerge.search.keys import heldout_part, proxy_scores

    held = heldout_part(outcome.heldout[trial.number], "test")["tasks"]  # what the card reports

    proxy = proxy_scores(trial.user_attrs)
    got = {(e.dataset_type, e.dataset_split): e.metric_value for e in data.eval_results}
    assert all(isinstance(e, EvalResult) for e in data.eval_results)
    for task in ("task0", "task1"):
        assert got[(task, "heldout")] == pytest.approx(held[task], abs=1e-6)
        assert got[(task, "search")] == pytest.approx(proxy[task], abs=1e-6)
    assert data.model_name == f"ta (trial {trial.number})"
    # a leaderboard run beside it, then a re-export: its scores join the model-index
    import pandas as pd

    from evomerge.eval.leaderboard import COLUMNS

    df = pd.DataFrame(
        [{"task": "leaderboard_gpqa", "alias": "gpqa", "metric": "acc_norm", "filter": "none",
          "value": 0.4, "stderr": 0.01, "n_shot": 0, "n_samples": 8, "group": True}],
        columns=COLUMNS,
    )  # fmt: skip
    save_leaderboard(out, df, backend="hf", tasks="leaderboard")
    assert main(["export", str(study_dir), "--out", str(out), "--no-checkpoint"]) == 0
    data = ModelCard.load(out / "README.md").data
    got = {(e.dataset_type, e.dataset_split, e.metric_type): e.metric_value
           for e in data.eval_results}  # fmt: skip
    assert got[("leaderboard_gpqa", None, "acc_norm")] == pytest.approx(0.4)
    assert got[("leaderboard_gpqa", None, "normalized acc_norm")] == pytest.approx(20.0)
    assert got[("task0", "heldout", "score")] == pytest.approx(held["task0"], abs=1e-6)


def test_trials_csv_matches_storage(exported, study_dir: Path):
    import pandas as pd

    df = pd.read_csv(exported.out_dir / "trials.csv")
    study = optuna.load_study(study_name="ta", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert list(df["number"]) == [t.number for t in study.trials]
    assert "heldout_task0" in df.columns and "proxy_task1" in df.columns


def test_bad_trial_numbers(study_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"no such trial.*COMPLETE trials: 0, 1"):
        export_study(study_dir, trial=999, out=tmp_path / "x", checkpoint=False)
    copy = tmp_path / "ta"
    shutil.copytree(study_dir, copy)
    (copy / "search.json").unlink()  # it names the original storage; the copy's study.db is used
    study = optuna.load_study(study_name="ta", storage=f"sqlite:///{copy / 'study.db'}")
    t = study.ask()
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ConfigError, match=rf"--trial {t.number}: expected a COMPLETE trial, but"):
        export_study(copy, trial=t.number, out=tmp_path / "x", checkpoint=False)
    assert not (tmp_path / "x").exists()
    assert main(["export", str(copy), "--trial", "999", "--no-checkpoint"]) == 2


def test_unknown_study_folder(study_dir: Path, capsys):
    assert main(["export", str(study_dir.parent / "ta_")]) == 2
    assert "Did you mean 'ta'?" in capsys.readouterr().err


def test_no_checkpoint_reexport_and_foreign_folder(study_dir: Path, tmp_path: Path):
    out = tmp_path / "e"
    res = export_study(study_dir, trial=1, out=out, checkpoint=False)
    assert res.verified_tensors is None and not list(out.glob("*.safetensors"))
    assert load_recipe(out / "recipe.yaml").final.provenance["trial"] == 1
    res = export_study(study_dir, trial=0, out=out, checkpoint=False)  # replaces the old one
    assert load_recipe(out / "recipe.yaml").final.provenance["trial"] == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        export_study(study_dir, out=foreign, checkpoint=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_verification_failure_names_tensor_and_leaves_nothing(
    study_dir: Path, tmp_path, monkeypatch
):
    import evomerge.export.verify as verify

    real = verify.candidate_tensors

    def off_by_one(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            yield name, (t + 1e-3 if name == "model.norm.weight" else t)

    monkeypatch.setattr(verify, "candidate_tensors", off_by_one)
    with pytest.raises(MergeError, match=r"at tensor 'model\.norm\.weight'"):
        export_study(study_dir, out=tmp_path / "bad", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_leaderboard_kept_on_reexport(study_dir: Path, tmp_path: Path):
    from evomerge.eval.leaderboard_card import replace_leaderboard

    out = tmp_path / "e"
    export_study(study_dir, trial=0, out=out, checkpoint=False)
    card = out / "README.md"
    card.write_text(
        replace_leaderboard(card.read_text(), "| task | acc |\n|---|---|\n| hs | 0.5 |")
    )
    (out / "leaderboard.json").write_text("{}")
    export_study(study_dir, trial=0, out=out, checkpoint=False)
    assert "| hs | 0.5 |" in card.read_text() and (out / "leaderboard.json").is_file()
    export_study(study_dir, trial=1, out=out, checkpoint=False)  # another recipe: not carried
    assert "| hs | 0.5 |" not in card.read_text() and not (out / "leaderboard.json").exists()


def test_multi_objective_pareto_point(tmp_path: Path):
    study_dir = _make_study(tmp_path, "mo", extra="objectives: [task0, task1]", sampler="nsga2")
    from evomerge.search.results import load_study_outcome

    outcome = load_study_outcome(study_dir)
    point = outcome.pareto[-1].number
    res = export_study(study_dir, trial=point, out=tmp_path / "e", checkpoint=False)
    assert res.trial == point and "plots/pareto_front.png" in res.plots
    assert (tmp_path / "e" / "plots" / "pareto_front.png").is_file()
