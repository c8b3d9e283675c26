"""The held-out split's two parts: the winner is chosen on the "select" part and reported on the
"test" part (card, `evomerge status`), and the proxy's Spearman is also measured over a seeded
sample of all COMPLETE trials. The fake workbench makes the two parts disagree on purpose:
selection documents favour weight 0.2 on model a, test documents favour 0.9, so a winner chosen
on the wrong documents, or a score reported from the wrong ones, shows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from _search_fakes import FakeWorkbench
from conftest import write_tiny_model
from scipy.stats import spearmanr

from evomerge.cli import main
from evomerge.eval.tasks import heldout_parts
from evomerge.loop.run import run_search
from evomerge.search.results import load_study_outcome

optuna = pytest.importorskip("optuna")

SPACE = """
base_model: {base}
models: [{a}, {b}]
method: task_arithmetic
parameters:
  weight: {{simplex: true}}
  lambda: 1.0
tasks: [task0, task1]
eval: {{heldout_top_k: 4, fidelity_sample: {sample}}}
search: {{n_trials: 14, seed: 3, sampler: dirichlet, heartbeat: 1, grace_period: 2}}
"""
N_DOCS = 12
SELECT_BEST, TEST_BEST = 0.2, 0.9  # the weight of model a each held-out part rewards


class _Task:
    def __init__(self, name: str) -> None:
        self.name = name

    def doc_ids(self, split: str) -> list[int]:
        return list(range(N_DOCS)) if split == "search" else list(range(1000, 1000 + N_DOCS))


class SplitBench(FakeWorkbench):
    """Search split as FakeWorkbench; held-out: 1 - (w_a - 0.2)^2 on each task's selection
    documents, 1 - (w_a - 0.9)^2 on its test documents."""

    def __init__(self) -> None:
        super().__init__(target=(0.7, 0.3), n_docs=N_DOCS, chunks=(None,))
        self.tasks = [_Task(n) for n in self.task_names]

    def _scores(self, recipe, split: str) -> dict[str, dict[int, float]]:
        if split != "heldout":
            return super()._scores(recipe, split)
        w = self.weights(recipe)[0] if recipe is not None else 0.5
        out = {}
        for name in self.task_names:
            select = set(heldout_parts(name, range(1000, 1000 + N_DOCS))["select"])
            out[name] = {
                i: 1 - (w - (SELECT_BEST if i in select else TEST_BEST)) ** 2
                for i in range(1000, 1000 + N_DOCS)
            }
        return out


def _study(root: Path, sample: int = 6) -> Path:
    models = {k: write_tiny_model(root / "models" / k, seed=s, num_layers=2, hidden=32)
              for k, s in (("base", 0), ("a", 1), ("b", 2))}  # fmt: skip
    space = root / "hp.yaml"
    space.write_text(SPACE.format(sample=sample, **{k: str(v) for k, v in models.items()}))
    run_search(space, results=root / "results", workbench=SplitBench(), quiet=True)
    return root / "results" / "hp"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    return _study(tmp_path_factory.mktemp("parts"))


def _w_a(outcome, number: int) -> float:
    trial = outcome.study.trials[number]
    return float(outcome.space.decode(trial.params).final.models[0].parameters["weight"])


def test_parts_are_disjoint_halves_and_order_free():
    ids = list(range(1000, 1013))
    parts = heldout_parts("task0", ids)
    assert parts is not None
    assert set(parts["select"]) | set(parts["test"]) == set(ids)
    assert not set(parts["select"]) & set(parts["test"]) and len(parts["select"]) == 6
    assert heldout_parts("task0", ids[::-1]) == parts  # the evaluator's order does not matter
    assert heldout_parts("task1", ids) != parts  # each task splits its own way
    assert heldout_parts("task0", [7]) is None  # one document cannot make two parts


def test_winner_chosen_on_selection_reported_on_test(study_dir: Path, tmp_path: Path, capsys):
    outcome = load_study_outcome(study_dir)
    rescored = [t for t in outcome.top_trials if t.number in outcome.heldout]
    assert len(rescored) >= 4
    # hand-computed: the selection part rewards w_a near 0.2; the whole split near 0.55
    by_select = max(rescored, key=lambda t: -((_w_a(outcome, t.number) - SELECT_BEST) ** 2))
    by_whole = max(rescored, key=lambda t: -((_w_a(outcome, t.number) - 0.55) ** 2))
    assert by_select.number != by_whole.number, "the fake must tell the two choices apart"
    assert outcome.best_trial.number == by_select.number
    n = by_select.number
    test = 1 - (_w_a(outcome, n) - TEST_BEST) ** 2  # the test part's score, by hand

    assert main(["status", str(study_dir)]) == 0
    text = capsys.readouterr().out
    assert f"held-out test of the pick: trial {n} = {test:.4f}" in text
    assert "chosen on the held-out selection part; tested on the held-out test part" in text

    out = tmp_path / "winner"
    assert main(["export", str(study_dir), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    held = card.split("Held-out scores on the held-out test part")[1].split("Search (proxy)")[0]
    assert f"| this merge (trial {n}) | {test:.4f} | {test:.4f} | {test:.4f} |" in held
    assert "| chosen on | the held-out selection part (12 documents over 2 tasks) |" in card
    assert "| tested on | the held-out test part (12 documents over 2 tasks), which chose" in card
    prov = (out / "recipe.yaml").read_text()
    for part in ("select", "test"):
        assert part + ":" in prov  # the provenance names the documents of each part


def test_fidelity_spearman_over_a_sample_of_all_trials(study_dir: Path, capsys):
    outcome = load_study_outcome(study_dir)
    sample = outcome.study.user_attrs["fidelity_sample"]
    complete = sorted(t.number for t in outcome.top_trials)
    top4 = [t.number for t in outcome.top_trials[:4]]
    assert len(sample) == 6 and set(sample) <= set(complete) and not set(sample) <= set(top4)
    proxy = [outcome.study.trials[n].values[0] for n in sample]
    test = [1 - (_w_a(outcome, n) - TEST_BEST) ** 2 for n in sample]  # by hand
    assert outcome.fidelity_n == 6
    assert outcome.fidelity == pytest.approx(spearmanr(proxy, test).statistic)
    assert main(["status", str(study_dir)]) == 0
    text = capsys.readouterr().out
    line = f"Spearman, seeded sample of all COMPLETE trials: {outcome.fidelity:.3f} (6 trials)"
    assert line in text and "Spearman, top trials:" in text


def test_old_study_without_parts_says_selection_used_its_score(tmp_path: Path, capsys):
    """A study written before the parts (entries without select/test) still loads: the winner
    is the best whole-held-out trial and the card says that score also chose it."""
    study_dir = _study(tmp_path, sample=0)
    study = optuna.load_study(study_name="hp", storage=f"sqlite:///{study_dir}/study.db")
    for key, value in list(study.user_attrs.items()):
        if key.startswith("heldout_") and isinstance(value, dict):
            study.set_user_attr(key, {k: value[k] for k in ("tasks", "objective")})
    with sqlite3.connect(study_dir / "study.db") as db:  # Optuna has no attribute delete
        db.execute("DELETE FROM study_user_attributes WHERE key IN ('base_select', 'base_test')")
    outcome = load_study_outcome(study_dir)
    whole = {n: e["objective"][0] for n, e in outcome.heldout.items()}
    feasible = [t.number for t in outcome.top_trials if t.number in whole]
    assert outcome.best_trial.number == max(feasible, key=whole.__getitem__)
    out = tmp_path / "old"
    assert main(["export", str(study_dir), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "its held-out score was also used for selection" in card
    assert main(["status", str(study_dir)]) == 0
    assert "its held-out score was also used for selection" in capsys.readouterr().out
