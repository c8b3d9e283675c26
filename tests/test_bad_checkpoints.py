"""Bad and untrusted checkpoints through `evomerge merge`: one clear line naming the file and
tensor, exit 1 for a checkpoint that cannot be read (MergeError: corrupt, truncated, NaN) or 2
for input the user must change (ConfigError: no weights, pickles without --allow-pickle, models
that do not fit together), and no output folder left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.export.card import md_escape


def recipe_for(tmp_path: Path, models: list[Path], method: str = "linear") -> Path:
    entries = [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]
    doc = {"merge_method": method, "dtype": "float32", "models": entries}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def merge(tmp_path: Path, models: list[Path], capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["merge", str(recipe_for(tmp_path, models)), str(tmp_path / "out"),
                 "--no-progress", *extra])  # fmt: skip
    return code, capsys.readouterr().err


def assert_failed(tmp_path: Path, code: int, err: str, expect_code: int, *needles: str) -> None:
    assert code == expect_code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert left == [], left  # neither OUT_DIR nor OUT_DIR.tmp-*


def rewrite(model: Path, edit) -> None:
    """Load model.safetensors, let `edit(state_dict)` change it, save it back."""
    sd = load_file(str(model / "model.safetensors"))
    edit(sd)
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def pair(tiny_model) -> list[Path]:
    return [tiny_model("a", seed=1), tiny_model("b", seed=2)]


@pytest.mark.parametrize("cut", [4, 100, -16])
def test_truncated_safetensors(tmp_path, pair, capsys, cut):
    f = pair[1] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])  # header cut, or the last tensor cut
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 1, str(f))
    if cut < 0:  # the header is whole: the message names the tensor that lost its bytes
        assert "tensor '" in err and "truncated" in err


def test_garbage_header(tmp_path, pair, capsys):
    f = pair[0] / "model.safetensors"
    f.write_bytes((40).to_bytes(8, "little") + b"{not json at all" + b"\x00" * 64)
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 1, str(f), "not a valid safetensors")


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_model, capsys):
    models = [tiny_model("a", seed=1), tiny_model("b", seed=2, hidden=48)]
    code, err = merge(tmp_path, models, capsys)
    # models that do not fit together are the recipe's mistake: bad input, exit 2
    assert_failed(tmp_path, code, err, 2, "tensor 'model.layers.0", "[32]", "[48]")


def test_missing_tensor_names_it(tmp_path, pair, capsys):
    rewrite(pair[1], lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 2, "model.layers.1.mlp.up_proj.weight", "different tensors")


def test_architecture_mismatch(tmp_path, pair, capsys):
    cfg = json.loads((pair[1] / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (pair[1] / "config.json").write_text(json.dumps(cfg))
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 2, "different architectures", "MistralForCausalLM")


def test_missing_shard_named_in_index(tmp_path, tiny_model, capsys):
    models = [tiny_model("a", seed=1, shards=2), tiny_model("b", seed=2, shards=2)]
    (models[1] / "model-00002-of-00002.safetensors").unlink()
    code, err = merge(tmp_path, models, capsys)
    assert_failed(tmp_path, code, err, 1, "model-00002-of-00002.safetensors", "missing")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_a_source_names_file_and_tensor(tmp_path, pair, capsys, bad):
    def poison(sd):
        sd["model.layers.0.self_attn.k_proj.weight"][3, 5] = bad

    rewrite(pair[0], poison)
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 1, str(pair[0] / "model.safetensors"),
                  "model.layers.0.self_attn.k_proj.weight", "NaN or inf")  # fmt: skip


def test_config_json_corrupt_or_missing(tmp_path, pair, capsys):
    (pair[0] / "config.json").write_text("{broken")
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 2, "config.json", "not valid JSON")
    (pair[0] / "config.json").unlink()
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 2, "config.json")


def test_dtype_mismatch_is_converted_exactly(tmp_path, tiny_model, capsys, read_tensors):
    """bf16 + fp32 sources merge in fp32: out = 0.5 a + 0.5 float(b_bf16), by hand."""
    models = [tiny_model("a", seed=1), tiny_model("b", seed=2, dtype=torch.bfloat16)]
    code, err = merge(tmp_path, models, capsys)
    assert code == 0, err
    a, b, out = (read_tensors(p) for p in (*models, tmp_path / "out"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert b[name].dtype == torch.bfloat16 and out[name].dtype == torch.float32
    torch.testing.assert_close(out[name], 0.5 * a[name] + 0.5 * b[name].float())


# ---- untrusted files ---------------------------------------------------------------------------
def as_pickle(model: Path) -> None:
    sd = load_file(str(model / "model.safetensors"))
    torch.save(sd, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def test_pickles_refused_unless_allowed(tmp_path, pair, capsys, read_tensors):
    ref = read_tensors(pair[1])
    as_pickle(pair[1])
    code, err = merge(tmp_path, pair, capsys)
    assert_failed(tmp_path, code, err, 2, "--allow-pickle", str(pair[1]))
    code, err = merge(tmp_path, pair, capsys, "--allow-pickle")
    assert code == 0, err
    name = "model.norm.weight"
    torch.testing.assert_close(
        read_tensors(tmp_path / "out")[name], 0.5 * read_tensors(pair[0])[name] + 0.5 * ref[name]
    )


def test_remote_code_is_never_run_by_merge(tmp_path, pair, capsys):
    """A config with auto_map + modeling code: merging reads tensors only; the code never runs."""
    sentinel = tmp_path / "ran"
    for m in pair:
        cfg = json.loads((m / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    code, err = merge(tmp_path, pair, capsys)
    assert code == 0, err
    assert not sentinel.exists()
    from inspect import signature

    from evomerge.eval.hf.backend import HFBackend

    default = signature(HFBackend.__init__).parameters["trust_remote_code"].default
    assert default is False  # the evaluator loads custom code only when asked


ABS_ESCAPE = f"/tmp/evomerge-abs-escape-{os.getpid()}"


@pytest.mark.parametrize("evil", ["../../escape", "../escape", ABS_ESCAPE])
def test_tensor_name_with_dotdot_stays_inside(
    tmp_path, pair, capsys, read_tensors, monkeypatch, evil
):
    """A tensor name that reads as a path writes nothing outside OUT_DIR: the merge runs two
    folders deep (and from there as the working directory), so an escape relative to OUT_DIR
    or to the working directory lands inside tmp_path where it is seen; an absolute name is
    looked for where it points."""
    deep = tmp_path / "d1" / "d2"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    def add(sd):
        sd[evil] = torch.ones(3)

    for m in pair:
        rewrite(m, add)
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(deep / "out")}
    code, err = merge(deep, pair, capsys)
    assert code in (0, 1), err
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(deep / "out")}
    assert sorted(after - before - {deep / "recipe.yaml"}) == [], "written outside OUT_DIR"
    assert not Path(ABS_ESCAPE).exists()
    if code == 0:  # a tensor name is a key in the safetensors header, never a path
        torch.testing.assert_close(read_tensors(deep / "out")[evil], torch.ones(3))
    else:
        assert_failed(deep, code, err, 1)


def test_card_text_is_escaped():
    assert (
        md_escape("*bold* [x](http://e) | `c`") == r"\*bold\* \[x\](http://e) \| \`c\`"
    )  # no link
    assert "\n" not in md_escape("a\n# heading")
