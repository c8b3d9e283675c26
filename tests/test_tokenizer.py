"""Tokenizer union, per-token overrides, padding and chat templates, with hand-computed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_tiny_model

from evomerge.errors import ConfigError
from evomerge.merge.tokenizer import CHAT_TEMPLATES, plan_vocab, resolve_chat_template
from evomerge.recipe import parse_recipe

N_BASE = 48  # tiny_vocab(48): 4 specials + 44 characters


@pytest.fixture
def two_vocabs(tiny_model):
    """A: 48 tokens + '<x>' (id 48). B: 48 tokens + '<y>' (48), '<x>' (49)."""
    a = tiny_model("a", seed=0, vocab_size=N_BASE, extra_tokens=["<x>"])
    b = tiny_model("b", seed=1, vocab_size=N_BASE, extra_tokens=["<y>", "<x>"])
    return a, b


def _stage(a, b, tokenizer, base=None, **extra):
    doc = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5}}],
        "tokenizer": tokenizer,
        **extra,
    }  # fmt: skip
    if base:
        doc["base_model"] = str(base)
    return parse_recipe(doc).final


def _embeds(read_tensors, *paths):
    return [read_tensors(p)["model.embed_tokens.weight"] for p in paths]


def test_union_rows_hand_computed(two_vocabs, read_tensors):
    a, b = two_vocabs
    ea, eb = _embeds(read_tensors, a, b)
    stage = _stage(a, b, {"source": "union", "pad_to_multiple_of": 4})
    dirs = {str(a): a, str(b): b}
    plan = plan_vocab(stage, dirs, {str(a): 49, str(b): 50}, str(a))
    assert plan.vocab_size == 52  # 50 tokens padded to a multiple of 4
    vocab = json.loads(plan.files["tokenizer.json"])
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert added["<x>"] == 48 and added["<y>"] == 49  # base tokens first, then B's new one
    out = plan.align({str(a): ea, str(b): eb})
    ra, rb = out[str(a)], out[str(b)]
    assert ra.shape == rb.shape == (52, ea.shape[1])
    assert torch.equal(ra[:48], ea[:48]) and torch.equal(rb[:48], eb[:48])
    assert torch.equal(ra[48], ea[48]) and torch.equal(rb[48], eb[49])  # '<x>' moved in B
    assert torch.equal(ra[49], eb[48]) and torch.equal(rb[49], eb[48])  # A lacks '<y>': B's row
    assert not ra[50:].any() and not rb[50:].any()  # padding rows are zero


def test_missing_token_defaults_to_base_row_else_mean(tiny_model, read_tensors):
    a = tiny_model("a", seed=0, vocab_size=N_BASE)
    b = tiny_model("b", seed=1, vocab_size=N_BASE, extra_tokens=["<z>"])
    c = tiny_model("c", seed=2, vocab_size=N_BASE, extra_tokens=["<z>"])
    ea, eb, ec = _embeds(read_tensors, a, b, c)
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b, c)]
    doc = {"merge_method": "linear", "tokenizer": {"source": "union"}, "models": models}
    stage = parse_recipe(doc).final
    dirs = {str(p): p for p in (a, b, c)}
    plan = plan_vocab(stage, dirs, {str(a): 48, str(b): 49, str(c): 49}, str(a))
    out = plan.align({str(a): ea, str(b): eb, str(c): ec})
    assert torch.allclose(out[str(a)][48], (eb[48] + ec[48]) / 2)  # no base: mean of B and C
    stage.base_model = stage.models[1].model
    plan = plan_vocab(stage, dirs, {str(a): 48, str(b): 49, str(c): 49}, str(b))
    out = plan.align({str(a): ea, str(b): eb, str(c): ec})
    assert torch.equal(out[str(a)][48], eb[48])  # the base has it: the base's row


def test_token_overrides(two_vocabs, read_tensors):
    a, b = two_vocabs
    ea, eb = _embeds(read_tensors, a, b)
    tokens = {
        "<x>": {"source": str(b), "force": True},  # every model gets B's row
        "a": {"source": {"kind": "zero"}},  # both have 'a' and no force: unchanged
        "b": {"source": {"kind": "zero"}, "force": True},
        "<y>": {"source": {"kind": "model_token", "model": str(a), "token": "c"}},
    }
    stage = _stage(a, b, {"source": "union", "tokens": tokens})
    plan = plan_vocab(stage, {str(a): a, str(b): b}, {str(a): 49, str(b): 50}, str(a))
    out = plan.align({str(a): ea, str(b): eb})
    ra, rb = out[str(a)], out[str(b)]
    ia, ib, ic = 4, 5, 6  # 'a', 'b', 'c' follow the 4 specials
    assert torch.equal(ra[48], eb[49]) and torch.equal(rb[48], eb[49])
    assert torch.equal(ra[ia], ea[ia]) and torch.equal(rb[ia], eb[ia])
    assert not ra[ib].any() and not rb[ib].any()
    assert torch.equal(ra[49], ea[ic]) and torch.equal(rb[49], eb[48])  # B has '<y>' itself


def test_source_model_and_identity(two_vocabs, tiny_model):
    a, b = two_vocabs
    stage = _stage(a, b, {"source": str(b)})
    plan = plan_vocab(stage, {str(a): a, str(b): b}, {str(a): 49, str(b): 50}, str(a))
    assert plan.vocab_size == 50 and plan.tokenizer_dir == b and not plan.identity
    assert plan.perms[str(a)].tolist()[47:] == [47, -1, 48]  # A has no '<y>', '<x>' is its 48
    c = tiny_model("c", seed=5, vocab_size=N_BASE, extra_tokens=["<x>"])
    same = _stage(a, c, {"source": "base"})
    assert plan_vocab(same, {str(a): a, str(c): c}, {str(a): 49, str(c): 49}, str(a)).identity
    with pytest.raises(ConfigError, match="Did you mean"):
        plan_vocab(_stage(a, b, {"source": str(b) + "x"}), {str(a): a, str(b): b}, {}, str(a))


def test_chat_templates(two_vocabs, tmp_path):
    a, b = two_vocabs
    dirs = {str(a): a, str(b): b}
    assert resolve_chat_template("chatml", dirs, str(a)) == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template("{{ messages }}", dirs, str(a)) == "{{ messages }}"
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "B: {{ messages[0]['content'] }}"
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert resolve_chat_template(str(b), dirs, str(a)).startswith("B: ")
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_chat_template("base", dirs, str(a))
    with pytest.raises(ConfigError, match="Did you mean 'chatml'"):
        resolve_chat_template("chatlm", dirs, str(a))


def _with_template(folder: Path, template: str) -> Path:
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg))
    return folder


def test_chat_template_auto_takes_the_plurality_as_mergekit_does(tmp_path):
    """`chat_template: auto` through the CLI: the template two of three inputs carry, the same
    text mergekit 0.1.5 writes for the same recipe (its tie order is arbitrary, so no tie here)."""
    from test_mergekit_recipes import require_mergekit, run_mergekit
    from transformers import AutoTokenizer

    from evomerge.cli import main as cli_main

    loud = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    quiet = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    base = _with_template(write_tiny_model(tmp_path / "base", seed=1), quiet + "\n")
    x = _with_template(write_tiny_model(tmp_path / "x", seed=2), loud)
    y = _with_template(write_tiny_model(tmp_path / "y", seed=3), "  " + loud)  # strip-equal
    recipe = {
        "merge_method": "linear", "dtype": "float32", "chat_template": "auto",
        "tokenizer_source": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, x, y)],
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    ours = tmp_path / "ours"
    assert cli_main(["merge", str(tmp_path / "r.yaml"), str(ours), "--no-progress"]) == 0
    got = AutoTokenizer.from_pretrained(ours).chat_template
    assert got == loud
    require_mergekit()
    theirs = tmp_path / "theirs"
    assert run_mergekit([(str(tmp_path / "r.yaml"), str(theirs))]) == {}
    assert AutoTokenizer.from_pretrained(theirs).chat_template == got


def test_chat_template_auto_without_templates_keeps_the_tokenizer_files(two_vocabs):
    a, b = two_vocabs
    assert resolve_chat_template("auto", {str(a): a, str(b): b}, str(a)) is None
