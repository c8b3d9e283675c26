"""The tiny model zoo: tokenizer, task generators, evals/ files, deterministic idempotent builds."""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from evomerge.zoo import build as zoo
from evomerge.zoo import tasks as zoo_tasks
from evomerge.zoo.tasks import TASKS, check_answer, eval_records, fact_tables, format_answer

REPO = Path(__file__).resolve().parents[1]
TINY = zoo.ZooSettings(
    hidden=32,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate=64,
    base_steps=4,
    base_batch=8,
    expert_steps=2,
    expert_batch=8,
    mlp_steps=2,
    mlp_batch=8,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", TINY, progress=False)


# --- tasks ---------------------------------------------------------------------------------


def test_answers_by_hand() -> None:
    assert format_answer("upper", "abc") == "ABC"
    assert format_answer("box", "abc") == "[abc]"
    assert check_answer("add", "add 123+456=", "579")
    assert not check_answer("add", "add 123+456=", "578")
    assert check_answer("rev", "rev abcde=", "edcba")
    assert check_answer("fmt", "fmt box hello=", "[hello]")
    assert check_answer("fmt", "fmt upper hello=", "HELLO")
    assert not check_answer("fmt", "fmt upper hello=", "hello")
    country, city = fact_tables().real[0]
    assert check_answer("cap", f"cap {country}=", city)


@pytest.mark.parametrize("task", TASKS)
def test_samplers_give_exact_answers(task: str) -> None:
    rng = random.Random(0)
    for level in (zoo_tasks.EASY, zoo_tasks.HARD):
        for _ in range(200):
            prompt, answer = level[task](rng)
            assert check_answer(task, prompt, answer), (prompt, answer)


def test_easy_and_hard_differ() -> None:
    rng = random.Random(0)
    sums = [int(p[4:-1].split("+")[0]) for p, _ in (zoo_tasks.add_easy(rng) for _ in range(300))]
    assert max(sums) < 50
    rev_len = {len(a) for _, a in (zoo_tasks.rev_hard(rng) for _ in range(300))}
    assert rev_len == {5, 6, 7}
    real = {c for c, _ in fact_tables().real}
    base = {c for c, _ in fact_tables().base}
    assert len(real) == zoo_tasks.N_FACTS and not real & base


# --- evals/ --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_eval_records(task: str) -> None:
    recs = eval_records(task)
    assert [r["id"] for r in recs] == list(range(2 * zoo_tasks.N_PER_SPLIT))
    by_split = {s: [r for r in recs if r["split"] == s] for s in ("search", "heldout")}
    assert [len(v) for v in by_split.values()] == [zoo_tasks.N_PER_SPLIT] * 2
    prompts = {s: {r["prompt"] for r in v} for s, v in by_split.items()}
    assert not prompts["search"] & prompts["heldout"]  # held-out facts/prompts never searched
    for r in recs:
        assert check_answer(task, r["prompt"], r["answer"])
        if task == "cap":
            assert r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == 4


def test_committed_evals_match_generator() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import make_evals

    for rel, text in make_evals.render().items():
        assert (REPO / "evals" / rel).read_text() == text, f"evals/{rel} is stale"
    on_disk = [json.loads(line) for line in (REPO / "evals/data/zoo_add.jsonl").open()]
    assert on_disk == eval_records("add")


# --- tokenizer -----------------------------------------------------------------------------


def test_autotokenizer_encodes_like_training(tiny_zoo: Path) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    tok = zoo.build_tokenizer()
    texts = [r["prompt"] + r["answer"] + "\n" for t in TASKS for r in eval_records(t)[::7]]
    texts += ["add 73+36=", "  two  spaces\n\n", "[Caps] é"]
    for text in texts:
        ids = auto(text)["input_ids"]
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert ids == list(text.encode())  # one token per byte, id = byte value
        assert auto.decode(ids) == text
    assert auto.eos_token_id == auto.pad_token_id == 256
    assert json.loads((tiny_zoo / "base/config.json").read_text())["model_type"] == "qwen2"


def test_batched_generation_matches_single(tiny_zoo: Path) -> None:
    import torch

    from evomerge.zoo import evaluate as zoo_eval

    model, tok = zoo_eval.load(tiny_zoo / "add")
    prompts = ["add 1+2=", "add 123+456=", "rev ab="]
    batched = zoo_eval.generate(model, tok, prompts, 5)
    for p, out in zip(prompts, batched, strict=True):
        ids = torch.tensor([list(p.encode())])
        cont = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :]
        assert out == tok.decode(cont, skip_special_tokens=True).split("\n")[0]
    # choice log-likelihood against a hand-rolled sum over the continuation's tokens
    ll = zoo_eval.choice_loglik(model, tok, ["cap X=", "cap X="], ["Ab", "Abc"])
    ids = torch.tensor([list(b"cap X=Abc")])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], -1)
    by_hand = [
        logp[5, ord("A")] + logp[6, ord("b")],
        logp[5, ord("A")] + logp[6, ord("b")] + logp[7, ord("c")],
    ]
    assert ll == pytest.approx([float(x) for x in by_hand], abs=1e-4)


# --- builds --------------------------------------------------------------------------------


def test_zoo_layout(tiny_zoo: Path) -> None:
    marker = json.loads((tiny_zoo / zoo.MARKER).read_text())
    assert marker["settings"] == TINY.digest()
    assert marker["experts"] == {f"zoo_{t}": t for t in TASKS}
    for name in ("base", *TASKS):
        files = {p.name for p in (tiny_zoo / name).iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        } <= files
    assert not list(tiny_zoo.glob(".tmp-*"))


def test_rebuild_is_bit_identical_and_idempotent(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = zoo.build_zoo(tmp_path / "again", TINY, progress=False)
    assert _tree(other) == _tree(tiny_zoo)

    def no_training(*a: object, **k: object) -> float:
        raise AssertionError("a finished zoo must be reused, not retrained")

    monkeypatch.setattr(zoo, "train", no_training)
    zoo.build_zoo(other, TINY, progress=False)
    assert _tree(other) == _tree(tiny_zoo)


def test_dense_zoo_first_then_mlp_experts(tiny_zoo: Path, tmp_path: Path) -> None:
    """The demo builds the zoo without MLP experts; a later full build adds only those."""
    dense = zoo.build_zoo(tmp_path / "dense", TINY, progress=False, mlp=False)
    assert not (dense / zoo.MLP_DIR).exists()
    assert zoo.zoo_is_built(dense, TINY, mlp=False) and not zoo.zoo_is_built(dense, TINY)
    before = _tree(dense)
    zoo.build_zoo(dense, TINY, progress=False)
    after = _tree(dense)
    assert {k: v for k, v in after.items() if k in before and k != zoo.MARKER} == {
        k: v for k, v in before.items() if k != zoo.MARKER
    }  # the dense models were reused, not retrained
    assert after == _tree(tiny_zoo)  # and the result is the zoo a full build makes


def test_experts_differ_from_base_and_each_other(tiny_zoo: Path) -> None:
    blobs = {n: (tiny_zoo / n / "model.safetensors").read_bytes() for n in ("base", *TASKS)}
    assert len(set(blobs.values())) == len(blobs)


def test_half_built_zoo_is_finished(tiny_zoo: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(tiny_zoo, half)
    (half / zoo.MARKER).unlink()
    shutil.rmtree(half / "cap")
    (half / ".tmp-rev").mkdir()  # an interrupted write
    (half / ".tmp-rev" / "junk").write_text("x")
    (half / "fmt" / "model.safetensors").write_bytes(b"truncated")
    assert not zoo.zoo_is_built(half, TINY)
    zoo.build_zoo(half, TINY, progress=False)
    assert zoo.zoo_is_built(half, TINY)
    assert _tree(half) == _tree(tiny_zoo)


def test_other_settings_rebuild(tiny_zoo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "z"
    shutil.copytree(tiny_zoo, copy)
    changed = replace(TINY, seed=1)
    assert not zoo.zoo_is_built(copy, changed)
    zoo.build_zoo(copy, changed, progress=False)
    assert zoo.zoo_is_built(copy, changed) and not zoo.zoo_is_built(copy, TINY)
    a = (copy / "base/model.safetensors").read_bytes()
    assert a != (tiny_zoo / "base/model.safetensors").read_bytes()


def test_cli(
    tiny_zoo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from evomerge.cli import main

    monkeypatch.setattr(zoo, "DEFAULT_SETTINGS", TINY)
    shutil.copytree(tiny_zoo, tmp_path / "z")
    assert main(["zoo", "--out", str(tmp_path / "z")]) == 0
    assert "up to date" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["zoo", "--out", str(tmp_path / "file")]) == 2
    assert "expected a folder" in capsys.readouterr().err


# --- the real zoo (minutes) ----------------------------------------------------------------


@pytest.mark.slow
def test_full_zoo_experts_beat_base(tmp_path: Path) -> None:
    from evomerge.zoo import evaluate as zoo_eval

    out = zoo.build_zoo(tmp_path / "zoo", progress=False)
    model, tok = zoo_eval.load(out / "base")
    base = zoo_eval.score_all(model, tok, "heldout")
    for task in TASKS:
        model, tok = zoo_eval.load(out / task)
        own = zoo_eval.score_task(model, tok, task, "heldout")
        assert own >= base[task] + 0.30, (task, own, base[task])


def test_mlp_experts_change_only_mlp_tensors(tiny_zoo: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(tiny_zoo / "base/model.safetensors")
    for t in TASKS:
        mlp = load_file(tiny_zoo / zoo.MLP_DIR / t / "model.safetensors")
        changed = {k for k in base if not torch_equal(base[k], mlp[k])}
        assert changed and all(".mlp." in k for k in changed), (t, changed)
    marker = json.loads((tiny_zoo / zoo.MARKER).read_text())
    assert marker["mlp_experts"] == {f"zoo_{t}": f"mlp/{t}" for t in TASKS}


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


def test_mlp_settings_leave_the_dense_digest_alone() -> None:
    changed = replace(TINY, mlp_steps=3, mlp_lr=1e-2)
    assert changed.digest() == TINY.digest() and changed.mlp_digest() != TINY.mlp_digest()


# --- depth experts: one half of the layers trained -----------------------------------------

TWO_LAYERS = replace(TINY, layers=2, depth_steps=2, depth_batch=8)


@pytest.fixture(scope="module")
def depth_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("depth") / "zoo"
    return zoo.build_zoo(out, TWO_LAYERS, progress=False, mlp=False, depth=True)


def test_depth_experts_change_only_their_half(depth_zoo: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(depth_zoo / "base/model.safetensors")
    halves = {"add": 0, "cap": 0, "rev": 1, "fmt": 1}  # depth_lower = add, cap
    for t in TASKS:
        expert = load_file(depth_zoo / zoo.DEPTH_DIR / t / "model.safetensors")
        assert expert.keys() == base.keys()
        mine = {k for k in base if k.startswith(f"model.layers.{halves[t]}.")}
        changed = {k for k in base if not torch_equal(base[k], expert[k])}
        # every trainable matrix moved; nothing outside the expert's half moved by one bit
        assert changed <= mine and {k for k in mine if k.endswith("proj.weight")} <= changed, t
    marker = json.loads((depth_zoo / zoo.MARKER).read_text())
    assert marker["depth_experts"] == {f"zoo_{t}": f"depth/{t}" for t in TASKS}
    assert "mlp_experts" not in marker
    assert zoo.zoo_is_built(depth_zoo, TWO_LAYERS, mlp=False, depth=True)
    assert not zoo.zoo_is_built(depth_zoo, TWO_LAYERS)  # the MLP experts are missing


def test_depth_experts_add_to_a_dense_zoo(depth_zoo: Path, tmp_path: Path) -> None:
    """Depth experts are added to a zoo without retraining its base and experts."""
    dense = zoo.build_zoo(tmp_path / "z", TWO_LAYERS, progress=False, mlp=False)
    assert not (dense / zoo.DEPTH_DIR).exists()
    before = _tree(dense)
    zoo.build_zoo(dense, TWO_LAYERS, progress=False, mlp=False, depth=True)
    after = _tree(dense)
    assert {k: after[k] for k in before if k != zoo.MARKER} == {
        k: v for k, v in before.items() if k != zoo.MARKER
    }
    assert after == _tree(depth_zoo)


def test_depth_settings_leave_the_other_digests_alone() -> None:
    changed = replace(TINY, depth_steps=3, depth_lower=("rev",))
    assert changed.digest() == TINY.digest() and changed.mlp_digest() == TINY.mlp_digest()
    assert changed.depth_digest() != TINY.depth_digest()
    assert replace(TINY, mlp_lr=1.0).depth_digest() == TINY.depth_digest()
    assert [TWO_LAYERS.depth_layers(t) for t in ("add", "rev")] == [range(0, 1), range(1, 2)]
    assert zoo.DEFAULT_SETTINGS.depth_layers("cap") == range(0, 2)
    assert zoo.DEFAULT_SETTINGS.depth_layers("fmt") == range(2, 4)
