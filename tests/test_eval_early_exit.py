"""Early exit for exact-match generation: a row stops once its text can no longer become a
gold target, and every per-example score stays what full generation gives.

The string rule is checked against lm-eval's own exact_match and filters by brute force; the
task rule on task configs, including those where early exit must stay off; the backend on a
tiny model, with and without early exit, on planted answers that diverge at every position.
"""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path

import pytest
import torch
from test_eval_support import build_tiny_model, write_task

from evomerge.eval.early_exit import ExactAnswers, committed_prefix
from evomerge.eval.evaluator import Evaluator
from evomerge.eval.hf.backend import HFBackend
from evomerge.eval.hf.generate import cut_at_stops, prefix_stable_decoding, settled_text
from evomerge.eval.protocol import GenerationSpec
from evomerge.eval.tasks import load_tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------- the string rule
@cache
def lm_eval_exact(prediction: str, reference: str) -> bool:
    from lm_eval.api.metrics import exact_match_fn

    return exact_match_fn(predictions=[prediction], references=[reference])["exact_match"] == 1


@cache
def lm_eval_strip(text: str) -> str:
    from lm_eval.filters.extraction import WhitespaceFilter

    return WhitespaceFilter().apply([[text]], [{}])[0][0]


def strings(alphabet: str, max_len: int) -> list[str]:
    return ["".join(p) for n in range(max_len + 1) for p in itertools.product(alphabet, repeat=n)]


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("stops", [(), ("\n",), ("\n\n",), ("b\n", "\n\n")])
@pytest.mark.parametrize(
    "answers", [("ab",), ("a b", "b"), ("ab\0",), (" a",), ("a\nb",), ("",), ("a\n",)]
)
def test_could_match_is_never_wrong_when_it_says_no(answers, stops, strip):
    """For every text so far (no stop string in it) that could_match rejects, no way of
    going on gives a final answer (cut at the stops, filtered) that lm-eval scores 1."""
    alphabet = "ab \n\0"
    hint = ExactAnswers(answers, strip=strip)
    rejected = 0
    for text in strings(alphabet, 3):
        if any(s in text for s in stops) or hint.could_match(text, stops):
            continue
        rejected += 1
        for more in strings(alphabet, 3):
            final = cut_at_stops(text + more, list(stops))
            final = lm_eval_strip(final) if strip else final
            assert not any(lm_eval_exact(final, a) for a in answers), (text, more, final)
    assert rejected > 0  # the rule does stop rows


def test_committed_prefix_by_hand():
    assert committed_prefix("12", strip=False) == "12"
    assert committed_prefix("12\0", strip=False) == "12"  # numpy drops trailing NULs
    assert committed_prefix("  12 \0 ", strip=True) == "12"
    assert committed_prefix(" \n", strip=True) == ""
    hint = ExactAnswers(("579",))
    assert hint.could_match("57") and hint.could_match("579")
    assert not hint.could_match("58") and not hint.could_match("5790")
    assert ExactAnswers(("579",), strip=True).could_match(" 579 ")
    assert not ExactAnswers(("579",)).could_match(" 5")
    assert ExactAnswers(("5",)).could_match("5\n", ("\n\n",))  # "\n\n" may still cut there
    assert not ExactAnswers(("5",)).could_match("5\n")


# ---------------------------------------------------------------------- decoding
def byte_level_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_settled_text_of_byte_tokens_is_a_prefix_of_every_longer_trace():
    tok = byte_level_tokenizer()
    assert prefix_stable_decoding(tok)
    ids = tok.encode("a€ b😀 é\nz")
    whole = tok.decode(ids)
    raw = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    assert any(not whole.startswith(r) for r in raw)  # an unfinished character: U+FFFD
    assert all(whole.startswith(settled_text(r)) for r in raw)


def test_decoders_that_rewrite_earlier_text_turn_early_exit_off():
    from tokenizers import Regex, decoders

    tok = byte_level_tokenizer()
    tok.clean_up_tokenization_spaces = True  # " ." becomes "." once the "." arrives
    assert not prefix_stable_decoding(tok)
    tok.clean_up_tokenization_spaces = False
    for decoder in (
        decoders.WordPiece(cleanup=True),
        decoders.Replace(Regex("ab"), "c"),
        decoders.Replace("ab", "c"),
        decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 0, 1)]),
    ):
        tok.backend_tokenizer.decoder = decoder
        assert not prefix_stable_decoding(tok), decoder
    tok.backend_tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )  # Llama 2's
    assert prefix_stable_decoding(tok)


# ---------------------------------------------------------------------- task configs
def filter_list(*steps: str) -> str:
    """A one-pipeline filter_list; each step is a function name plus any YAML fields."""
    lines = ["filter_list:", "  - name: f", "    filter:"]
    lines += [f"      - function: {step}" for step in steps]
    return "\n".join(lines) + "\n"


STRIP = filter_list("remove_whitespace", "take_first")
REGEX = filter_list('regex\n        regex_pattern: "(\\\\d+)"', "take_first")
LOWER = filter_list("lowercase", "take_first")
PROCESS = "process_results: !function utils.process\n"
UTILS = (
    "def process(doc, results):\n    return {'exact_match': float(results[0] == doc['answer'])}\n"
)

# name: (yaml fields, early exit allowed)
CONFIGS = {
    "plain": ({}, True),
    "zoo_like": ({"options": "    ignore_case: false\n    ignore_punctuation: false\n"}, True),
    "strip": ({"extra": STRIP}, True),
    "multiple_targets": ({"target": '"{{answers}}"'}, True),
    "stop_in_target": ({"target": '"{{answer}}\\n{{answer}}"'}, True),
    "two_char_stop": ({"until": '["\\n\\n"]'}, True),
    "ignore_case": ({"options": "    ignore_case: true\n"}, False),
    "regexes_to_ignore": ({"options": '    regexes_to_ignore: [" "]\n'}, False),
    "regex_filter": ({"extra": REGEX}, False),
    "lowercase_filter": ({"extra": LOWER}, False),
    "own_process_results": ({"extra": PROCESS}, False),
}


def write_gen_task(folder: Path, name: str, records: list[dict], **fields: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS)
    delimiter = 'target_delimiter: ""\n'
    return write_task(folder, name, "gen", records, max_gen_toks=8, delimiter=delimiter, **fields)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_task_config_decides(tmp_path, name):
    fields, allowed = CONFIGS[name]
    recs = [{"question": "q", "answer": "1", "answers": ["1", "2"]}]
    (task,) = load_tasks([str(write_gen_task(tmp_path, name, recs, **fields))])
    assert (task.early_exit_blocker is None) == allowed, task.early_exit_blocker
    hints = task.answers(task.doc_ids("all")[0])
    assert (hints[0] is not None) == allowed


def test_other_metrics_and_output_types_generate_in_full(tmp_path):
    from test_eval_support import mc_records

    recs = [{"question": "q", "answer": "1"}]
    gen = write_gen_task(tmp_path, "bleu_task", recs, metric="bleu")
    mc = write_task(tmp_path, "mc_task", "mc", mc_records(3))
    for task in load_tasks([str(gen), str(mc)]):
        assert task.early_exit_blocker is not None


def test_answers_follow_lm_eval_golds(tmp_path):
    recs = [{"question": "q", "answer": 7, "answers": ["x", "yz"]}]
    int_gold = write_gen_task(tmp_path, "int_gold", recs, target="answer")
    multi = write_gen_task(tmp_path, "multi", recs, target="answers")
    t_int, t_multi = load_tasks([str(int_gold), str(multi)])
    assert t_int.answers(0) == [ExactAnswers(("7",))]  # lm-eval casts the gold to str
    assert t_multi.answers(0) == [ExactAnswers(("x", "yz"))]


# ---------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=5)


def planted_records(be: HFBackend, n: int) -> list[dict]:
    """Questions whose answers are the model's own output (score 1), its output cut or
    changed at every position (the row can stop there), or its output and more."""
    questions = [f"add {i * 7 % 50}+{i * 11 % 50}=" for i in range(n)]
    plain = HFBackend.from_model(be.model, be.tokenizer, batch_size=8, drafts=False)
    spec = GenerationSpec(until=("\n",), max_gen_toks=8)
    own = plain.generate([(q, spec) for q in questions])
    recs = []
    for i, (q, out) in enumerate(zip(questions, own, strict=True)):
        k = i % (len(out) + 2)
        answer = [out, out[:k] + "#", out[:k], out + "x", " " + out + " "][i % 5]
        recs.append({"id": i, "question": q, "answer": answer, "answers": [answer, out[:k]]})
    return recs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scores_equal_with_and_without_early_exit(tmp_path, model_dir, name):
    fields, allowed = CONFIGS[name]
    be = HFBackend(model_dir, batch_size=8)
    assert be.early_exit
    path = write_gen_task(tmp_path, name, planted_records(be, 40), **fields)
    tasks = load_tasks([str(path)])
    full = HFBackend.from_model(be.model, be.tokenizer, batch_size=8, early_exit=False)
    scores, tokens = {}, {}
    for label, backend in (("exit", be), ("full", full)):
        scores[label] = Evaluator(backend, tasks, chunks=(16, None)).evaluate("all")
        tokens[label] = sum(len(t) for t in backend._drafts.values())  # generated ids
    assert scores["exit"].per_example == scores["full"].per_example
    if name in ("plain", "zoo_like", "strip", "multiple_targets"):
        assert 0 < scores["full"].tasks[name].mean < 1  # rows that match, rows that do not
    if allowed:
        assert tokens["exit"] < tokens["full"]  # rows did stop early
    else:
        assert tokens["exit"] == tokens["full"]


def test_drafts_after_early_exit_stay_exact(model_dir):
    """A candidate's early-exited answers are the next candidate's drafts; after a weight
    change the scores still equal full generation's."""
    be = HFBackend(model_dir, batch_size=4)
    full = HFBackend.from_model(
        be.model, be.tokenizer, batch_size=4, early_exit=False, drafts=False
    )
    recs = planted_records(be, 12)
    spec = GenerationSpec(until=("\n",), max_gen_toks=8)
    reqs = [(r["question"], spec) for r in recs]
    hints = [ExactAnswers((r["answer"],)) for r in recs]
    norm = be.live_tensors()["model.norm.weight"]
    saved = norm.clone()
    try:
        for scale in (None, 0.7, 1.3):
            if scale is not None:
                with torch.no_grad():
                    norm.mul_(scale)
            mine, theirs = be.generate(reqs, hints), full.generate(reqs)
            for m, t, r in zip(mine, theirs, recs, strict=True):
                assert (m == r["answer"]) == (t == r["answer"])
                assert t.startswith(m)  # what an early exit returns is the text so far
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_zoo_tasks_score_the_same(model_dir):
    """The repository's evals/ tasks (the zoo's configs) on the tiny model."""
    specs = sorted(
        str(p) for p in (REPO / "evals").glob("zoo_*.yaml") if "leaderboard" not in p.name
    )
    tasks = load_tasks(specs)
    be = HFBackend(model_dir, batch_size=16)
    full = HFBackend.from_model(be.model, be.tokenizer, batch_size=16, early_exit=False)
    gen = [t for t in tasks if t.request_type == "generate_until"]
    assert gen and all(t.early_exit_blocker is None for t in gen)
    ours = Evaluator(be, tasks).evaluate("all", limit=24)
    theirs = Evaluator(full, tasks).evaluate("all", limit=24)
    assert ours.per_example == theirs.per_example


# ---------------------------------------------------------------------- shared batches
def test_rows_of_different_specs_share_batches(model_dir):
    """Requests with different max_gen_toks and stop strings run in one batch and give what
    each spec gives alone."""
    be = HFBackend(model_dir, batch_size=16, drafts=False, early_exit=False)
    specs = [
        GenerationSpec(until=("\n",), max_gen_toks=3),
        GenerationSpec(until=(), max_gen_toks=9),
        GenerationSpec(until=("a", "\n\n"), max_gen_toks=6),
    ]
    reqs = [(f"add {i}+{2 * i}=", specs[i % 3]) for i in range(12)]
    alone = {}
    for spec in specs:
        group = [r for r in reqs if r[1] == spec]
        alone |= dict(zip(group, be.generate(group), strict=True))
    calls, run = [], be.forward
    be.forward = lambda ids, *a: calls.append(tuple(ids.shape)) or run(ids, *a)
    try:
        together = be.generate(reqs)
    finally:
        del be.forward
    assert together == [alone[r] for r in reqs]
    assert max(rows for rows, _ in calls) == len(reqs)  # one batch for all three specs
