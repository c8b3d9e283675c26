"""`evomerge search` checks the whole space before any weights load (loop/preflight.py).

Through the CLI on real tiny checkpoints and real lm-eval task files made here: a minimal space
with no `parameters:` runs and searches what its method reads; every space of the broken corpus
(tests/spaces/broken/*.yaml, `# expect:` says what its one line must name) exits 2 with one
line, no traceback, no results/NAME, and without the workbench (the weights) ever being built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from _search_fakes import FakeWorkbench
from conftest import write_tiny_model
from test_eval_support import mc_records, write_task

from evomerge.cli import main
from evomerge.loop.workbench import LiveWorkbench
from evomerge.merge.table import get_method

BROKEN = sorted((Path(__file__).parent / "spaces" / "broken").glob("*.yaml"))


def _other_tokenizer(folder: Path) -> None:
    """Swap two tokens' ids: same vocabulary size and shapes, different token -> id map."""
    doc = json.loads((folder / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    """Placeholder -> path: Llama base and experts, a Qwen2 expert, a wider one, one with a
    larger vocabulary, one with another tokenizer; two multiple-choice tasks."""
    root = tmp_path_factory.mktemp("preflight")
    m = root / "models"
    paths = {
        "BASE": write_tiny_model(m / "base", seed=0),
        "A": write_tiny_model(m / "a", seed=1),
        "B": write_tiny_model(m / "b", seed=2),
        "QWEN": write_tiny_model(m / "qwen", arch="qwen2", seed=3),
        "WIDE": write_tiny_model(m / "wide", seed=4, hidden=48),
        "BIGVOCAB": write_tiny_model(m / "bigvocab", seed=5, vocab_size=80),
        "OTHERTOK": write_tiny_model(m / "othertok", seed=6),
        "T0": write_task(root / "tasks", "task0", "mc", mc_records(12)),
        "T1": write_task(root / "tasks", "task1", "mc", mc_records(12)),
        "DIR": root,
    }
    _other_tokenizer(paths["OTHERTOK"])
    return {k: str(v) for k, v in paths.items()}


def fill(text: str, zoo: dict[str, str]) -> str:
    return re.sub(r"\$([A-Z0-9]+)", lambda mt: zoo[mt.group(1)], text)


@pytest.fixture
def no_weights(monkeypatch):
    """Building the workbench (loading weights) fails the test: refusals must come first."""

    def forbidden(cls, *a, **k):
        raise AssertionError("the workbench was built: weights would load")

    monkeypatch.setattr(LiveWorkbench, "from_space", classmethod(forbidden))


def search(space: Path, results: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["search", str(space), "--results", str(results), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_space_exits_2_before_loading(path, zoo, tmp_path, capsys, no_weights):
    text = path.read_text()
    expect = re.match(r"# expect: (.+)", text).group(1).strip()
    space = tmp_path / "space.yaml"
    space.write_text(fill(text, zoo))
    code, err = search(space, tmp_path / "results", capsys, "--n-trials", "3")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in err, err
    assert not (tmp_path / "results").exists()


def test_corpus_is_large_enough():
    assert len(BROKEN) >= 15


def test_mixed_architectures_names_both_models(zoo, tmp_path, capsys, no_weights):
    space = tmp_path / "mixed.yaml"
    space.write_text(fill((BROKEN[0].parent / "mixed_architectures.yaml").read_text(), zoo))
    code, err = search(space, tmp_path / "r", capsys)
    assert code == 2
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", zoo["QWEN"]):
        assert name in err, err
    assert zoo["BASE"] in err or zoo["A"] in err, err


def test_shape_mismatch_names_tensor_and_both_shapes(zoo, tmp_path, capsys, no_weights):
    space = tmp_path / "wide.yaml"
    space.write_text(fill((BROKEN[0].parent / "shape_mismatch.yaml").read_text(), zoo))
    code, err = search(space, tmp_path / "r", capsys)
    assert code == 2
    # the first tensor that differs: the embedding is checked against the vocabulary (its rows
    # agree), so a layer norm of width 32 vs 48 is named, with both shapes
    assert re.search(r"tensor '[^']+' has shape \[\d+(, \d+)*\]", err), err
    assert "32" in err and "48" in err, err


def test_space_value_is_refused_even_when_the_cli_overrides_it(zoo, tmp_path, capsys, no_weights):
    space = tmp_path / "s.yaml"
    space.write_text(fill((BROKEN[0].parent / "n_trials_many.yaml").read_text(), zoo))
    code, err = search(space, tmp_path / "r", capsys, "--n-trials", "2")
    assert code == 2 and "search.n_trials" in err and "'many'" in err, err


MINIMAL = """
base_model: $BASE
models: [$A, $B]
method: task_arithmetic
tasks: [$T0, $T1]
eval: {chunks: [4, null], backend: hf, device: cpu, batch_size: 16}
"""


def test_minimal_space_searches_what_the_method_reads(zoo, tmp_path, capsys):
    """No `parameters:`: task_arithmetic's weight (per model) and lambda are searched within
    the method table's declared search bounds, the start-up line lists them, and a real search
    (HF backend, real merges in place) runs to exit 0."""
    space = tmp_path / "minimal.yaml"
    space.write_text(fill(MINIMAL, zoo))
    code, err = search(space, tmp_path / "r", capsys, "--n-trials", "3")
    assert code == 0, err
    table = get_method("task_arithmetic")
    weight, lam = table.param("weight"), table.param("lambda")
    line = next(x for x in err.splitlines() if x.startswith("searching "))
    assert "3 dimensions of task_arithmetic with gp" in line, line
    assert f"weight[a] in [{weight.search_low:g}, {weight.search_high:g}]" in line, line
    assert f"weight[b] in [{weight.search_low:g}, {weight.search_high:g}]" in line, line
    assert f"lambda in [{lam.search_low:g}, {lam.search_high:g}]" in line, line
    import optuna

    st = optuna.load_study(study_name="minimal", storage=f"sqlite:///{tmp_path}/r/minimal/study.db")
    done = [t for t in st.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and st.sampler is not None
    for t in done:
        assert set(t.params) == {"weight[a]", "weight[b]", "lambda"}
        assert weight.search_low <= t.params["weight[a]"] <= weight.search_high
        assert lam.search_low <= t.params["lambda"] <= lam.search_high


def test_minimal_space_runs_through_the_cli_with_a_fake_workbench(
    zoo, tmp_path, capsys, monkeypatch
):
    """The same space through the CLI with the workbench faked: every trial's recipe carries a
    weight for each model and a lambda (the merge would need them)."""
    bench = FakeWorkbench(target=(0.6, 0.3))
    monkeypatch.setattr(LiveWorkbench, "from_space", classmethod(lambda cls, *a, **k: bench))
    space = tmp_path / "minimal.yaml"
    space.write_text(fill(MINIMAL, zoo))
    code, err = search(space, tmp_path / "r", capsys, "--n-trials", "4")
    assert code == 0, err
    recipes = [r for r in bench.merged if r is not None]
    assert recipes
    for r in recipes:
        stage = r.final
        assert all("weight" in m.parameters for m in stage.models), stage
        assert "lambda" in stage.parameters, stage


def test_default_sampler_is_gp_and_tpe_for_a_method_choice(zoo, tmp_path):
    from evomerge.search.space import SearchSpace

    one = SearchSpace.from_text(fill(MINIMAL, zoo), "one.yaml")
    choice = yaml.safe_load(fill(MINIMAL, zoo))
    choice["method"] = ["task_arithmetic", "ties"]
    two = SearchSpace.from_text(yaml.safe_dump(choice), "two.yaml")
    assert (one.default_sampler(), two.default_sampler()) == ("gp", "tpe")
