"""Evaluator: nested fixed chunks, only new docs run, early stop, means and standard errors;
and parity with lm-eval's simple_evaluate on a tiny model."""

from __future__ import annotations

import math

import pytest
from test_eval_support import gen_records, mc_records, write_task

from evomerge.errors import ConfigError
from evomerge.eval.evaluator import Evaluator, summarize
from evomerge.eval.tasks import load_tasks


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


class FakeBackend:
    """Answers "7"-ish generations and fixed log-likelihoods; records what it was asked."""

    def __init__(self):
        self.seen = []

    def live_tensors(self):
        return None

    def load_weights(self, tensors):
        pass

    def loglikelihood(self, requests):
        self.seen.extend(requests)
        return [(-float(len(cont)), False) for _, cont in requests]  # shortest choice wins

    def generate(self, requests, answers=None):
        self.seen.extend(requests)
        # right answer when the sum's first operand is even
        out = []
        for ctx, _ in requests:
            a, b = ctx[4:-1].split("+")
            out.append(str(int(a) + int(b)) if int(a) % 2 == 0 else "x")
        return out


@pytest.fixture
def tasks(tmp_path):
    write_task(tmp_path, "tg", "gen", gen_records(90, with_split=False))
    write_task(tmp_path, "tm", "mc", mc_records(30))
    return load_tasks([str(tmp_path / "tg.yaml"), str(tmp_path / "tm.yaml")], seed=0)


def test_chunks_are_nested_fixed_and_only_new_docs_run(tasks):
    be = FakeBackend()
    ev = Evaluator(be, tasks, chunks=(16, 64, None), seed=3)
    calls = []

    def on_chunk(k, res):
        calls.append((k, {n: len(v) for n, v in res.per_example.items()}, len(be.seen)))
        return True

    res = ev.evaluate("search", on_chunk=on_chunk)
    # tg: 45 search docs -> 16, 45 (chunk 2 adds nothing: skipped); tm: 15 search docs
    assert [c[:2] for c in calls] == [(0, {"tg": 16, "tm": 15}), (1, {"tg": 45, "tm": 15})]
    assert calls[1][2] == 45 + 15 * 3  # every request asked exactly once
    assert res.complete
    order = ev.order(tasks[0], "search")
    assert list(res.per_example["tg"]) == order  # insertion order = evaluation order
    assert Evaluator(FakeBackend(), tasks, seed=3).order(tasks[0], "search") == order
    assert Evaluator(FakeBackend(), tasks, seed=4).order(tasks[0], "search") != order
    assert set(order) == set(tasks[0].doc_ids("search"))


def test_scores_means_and_stderr_by_hand(tasks):
    res = Evaluator(FakeBackend(), tasks).evaluate("all")
    tg = tasks[0]
    expected = {
        i: float(int(tg.doc(i)["question"][4:-1].split("+")[0]) % 2 == 0) for i in tg.doc_ids("all")
    }
    assert res.per_example["tg"] == pytest.approx(expected)
    # mc: the shortest choice is predicted; acc = 1 when it is the label
    tm = tasks[1]
    exp_mc = {}
    for i in tm.doc_ids("all"):
        d = tm.doc(i)
        lengths = [len(" " + c) for c in d["choices"]]
        exp_mc[i] = float(lengths.index(min(lengths)) == d["label"])
    assert res.per_example["tm"] == exp_mc
    s = res.tasks["tm"]
    vals = list(exp_mc.values())
    m = sum(vals) / len(vals)
    assert s.mean == pytest.approx(m) and s.n == 30
    assert s.stderr == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in vals) / 29 / 30))


def test_stop_early_and_limit(tasks):
    res = Evaluator(FakeBackend(), tasks).evaluate("search", on_chunk=lambda k, r: False)
    assert not res.complete and res.tasks["tg"].n == 16
    res = Evaluator(FakeBackend(), tasks, chunks=(None,)).evaluate("heldout", limit=5)
    assert res.complete and res.tasks["tg"].n == 5 and res.tasks["tm"].n == 5


def test_summarize_small_cases():
    s = summarize("t", "acc", {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0})
    assert (s.mean, s.n) == (0.75, 4)
    assert s.stderr == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)
    assert math.isnan(summarize("t", "acc", {1: 1.0}).stderr)


def test_bad_arguments(tasks):
    with pytest.raises(ConfigError, match="increasing"):
        Evaluator(FakeBackend(), tasks, chunks=(64, 16))
    with pytest.raises(ConfigError, match="only the last chunk"):
        Evaluator(FakeBackend(), tasks, chunks=(None, 16))
    with pytest.raises(ConfigError, match="split must be"):
        Evaluator(FakeBackend(), tasks).evaluate("train")
