"""ProxyTask / load_tasks: spec resolution, data paths, ids, splits, per-doc scoring."""

from __future__ import annotations

import pytest
from test_eval_support import gen_records, mc_records, write_task

from evomerge.errors import ConfigError
from evomerge.eval.tasks import generation_spec, load_tasks


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_yaml_path_with_relative_data_ids_and_split_field(tmp_path, monkeypatch):
    path = write_task(tmp_path / "tasks", "tg", "gen", gen_records(9))
    monkeypatch.chdir(tmp_path)  # data path must resolve against the YAML, not the CWD
    (task,) = load_tasks([str(path)])
    assert (task.name, task.metric, task.higher_is_better) == ("tg", "exact_match", True)
    assert task.doc_ids("heldout") == [100, 103, 106]  # records with i % 3 == 0
    assert task.doc_ids("search") == [101, 102, 104, 105, 107, 108]
    assert task.doc_ids("all") == list(range(100, 109))
    ctx, spec = task.requests(101)[0]
    assert ctx == "add 10+16="
    assert spec.until == ("\n",) and spec.max_gen_toks == 6


def test_seeded_split_without_field_is_exact_and_reproducible(tmp_path):
    path = write_task(tmp_path, "tg", "gen", gen_records(20, with_split=False))
    a = load_tasks([str(path)], heldout_fraction=0.25, seed=1)[0]
    b = load_tasks([str(path)], heldout_fraction=0.25, seed=1)[0]
    c = load_tasks([str(path)], heldout_fraction=0.25, seed=2)[0]
    held, search = a.doc_ids("heldout"), a.doc_ids("search")
    assert len(held) == 5 and sorted(held + search) == list(range(100, 120))
    assert held == b.doc_ids("heldout")
    assert held != c.doc_ids("heldout")


def test_name_from_evals_folder_and_folder_spec(tmp_path, monkeypatch):
    write_task(tmp_path / "evals", "tg", "gen", gen_records(4))
    write_task(tmp_path / "evals", "tm", "mc", mc_records(4))
    monkeypatch.chdir(tmp_path)
    assert [t.name for t in load_tasks(["tm"])] == ["tm"]
    assert sorted(t.name for t in load_tasks([str(tmp_path / "evals")])) == ["tg", "tm"]


def test_score_uses_the_task_metrics(tmp_path):
    write_task(tmp_path, "tg", "gen", gen_records(3))
    write_task(tmp_path, "tm", "mc", mc_records(3))
    gen, mc = load_tasks([str(tmp_path / "tg.yaml"), str(tmp_path / "tm.yaml")])
    # doc 100: "add 3+5=" -> "8"
    assert gen.score(100, ["8"]) == 1.0 and gen.score(100, ["9"]) == 0.0
    # mc doc 1 has label 1: acc is argmax of the log-likelihoods
    assert len(mc.requests(1)) == 3 and mc.requests(1)[0] == ("q1: pick?", " dog")
    assert mc.score(1, [(-3.0, False), (-0.5, True), (-2.0, False)]) == 1.0
    assert mc.score(1, [(-0.1, True), (-0.5, False), (-2.0, False)]) == 0.0


def test_generation_spec_aliases():
    spec = generation_spec({"until": "\n\n", "max_new_tokens": 5, "do_sample": False})
    assert (spec.until, spec.max_gen_toks, spec.do_sample) == (("\n\n",), 5, False)
    assert generation_spec(None).max_gen_toks == 256


def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="task file not found"):
        load_tasks([str(tmp_path / "nope.yaml")])
    path = write_task(tmp_path, "tg", "gen", gen_records(3))
    (tmp_path / "data" / "tg.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"data file 'data/tg.jsonl'.*not found"):
        load_tasks([str(path)])
    write_task(tmp_path / "b", "tb", "gen", [{"id": 1, "question": "q", "answer": "a"}] * 2)
    with pytest.raises(ConfigError, match="id 1 appears twice"):
        load_tasks([str(tmp_path / "b" / "tb.yaml")])
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_tasks(["x"], heldout_fraction=1.5)


def test_unknown_name_message_lists_local_tasks(tmp_path, monkeypatch):
    from evomerge.eval.task_specs import unknown_task

    monkeypatch.chdir(tmp_path)
    msg = unknown_task("tinygen", ["tiny_gen", "tiny_mc"], ["hellaswag"])
    assert "Did you mean 'tiny_gen'?" in msg and "tiny_mc" in msg


@pytest.mark.slow  # indexes lm-eval's whole registry (~20 s)
def test_unknown_name_searches_the_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'hellaswag'"):
        load_tasks(["hellaswagg"])
