"""Fuzzed bad recipes through `evomerge merge` in-process: every one ends in exit code 2, exactly
one stderr line, no traceback, and no output folder (nor a temporary one) left behind."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.cli import main

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {n: str(write_tiny_model(root / n, seed=i)) for i, n in enumerate(["base", "a", "b"])}


def valid(models: dict[str, str]) -> dict:
    """A recipe that merges (checked by test_valid_recipe_merges): ties over two experts."""
    return {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models["a"], "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": models["b"], "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"lambda": 1.0, "normalize": True},
        "dtype": "float32",
    }


def valid_slices(models: dict[str, str], lo: int, hi: int) -> dict:
    src = [{"model": models[k], "layer_range": [lo, hi]} for k in ("a", "b")]
    return {
        "merge_method": "linear",
        "slices": [{"sources": src, "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }


# ---- broken values, each one a rule the validator must state ---------------------------------
NOT_A_NUMBER = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, "abc", [], {}, None, True]),
    st.text(alphabet="xyz!?", min_size=1, max_size=5),
)
BAD_DENSITY = st.one_of(
    st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False),
    st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=False),
    st.sampled_from([math.nan, math.inf]),
)
GARBAGE = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["{", "[1, 2", ": :", "- a\n b: [", "\t\tx", "a: *undefined", "!!python/x 1"]),
    st.sampled_from(["[]", "{}", "null", "42", "models: 3", "- 1\n- 2", "---\n---\n"]),
)


@st.composite
def broken_recipe(draw, models: dict[str, str]) -> dict | list:
    r = valid(models)
    kind = draw(
        st.sampled_from(
            [
                "drop_key",
                "wrong_type",
                "unknown_method",
                "unknown_top_key",
                "empty_models",
                "nan_weight",
                "density",
                "model_not_mapping",
                "bad_dtype",
                "missing_model",
                "lambda",
            ]
        )
    )
    if kind == "drop_key":
        del r[draw(st.sampled_from(["merge_method", "models"]))]
    elif kind == "wrong_type":
        key = draw(st.sampled_from(["merge_method", "models", "parameters", "base_model"]))
        r[key] = draw(st.sampled_from([3, 1.5, ["x"], {"a": 1}, True]).filter(
            lambda v, k=key: not (k == "models" and isinstance(v, list))
            and not (k == "parameters" and isinstance(v, dict))  # unknown names only warn
        ))  # fmt: skip
    elif kind == "unknown_method":
        r["merge_method"] = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1,
                                         max_size=12).filter(lambda s: s not in KNOWN))  # fmt: skip
    elif kind == "unknown_top_key":
        r[draw(st.sampled_from(["model", "method", "merge-method", "slice", "tokenizers"]))] = 1
    elif kind == "empty_models":
        r["models"] = []
    elif kind == "nan_weight":
        r["models"][draw(st.integers(0, 1))]["parameters"]["weight"] = draw(NOT_A_NUMBER)
    elif kind == "density":
        r["models"][draw(st.integers(0, 1))]["parameters"]["density"] = draw(BAD_DENSITY)
    elif kind == "model_not_mapping":
        r["models"][0] = draw(st.sampled_from([3, [1, 2], None, {"modle": "x"}]))
    elif kind == "bad_dtype":
        r["dtype"] = draw(st.sampled_from(["float64x", "fp17", "int4", 16, "bfloat"]))
    elif kind == "missing_model":
        r["models"][1]["model"] = str(Path(models["a"]).parent / "no-such-model")
    elif kind == "lambda":
        r["parameters"]["lambda"] = draw(st.sampled_from([math.nan, math.inf, "big", [1, "x"]]))
    return r


KNOWN = set(
    "linear ties dare_ties della slerp task_arithmetic passthrough model_stock breadcrumbs "
    "breadcrumbs_ties dare_linear della_linear nuslerp karcher sce multislerp nearswap "
    "arcee_fusion ram core".split()
)


def run_merge(text: str, capsys) -> tuple[int, str, Path]:
    """Run `evomerge merge` on recipe text in a fresh folder; (exit code, stderr, folder)."""
    capsys.readouterr()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-recipe-"))
    (tmp / "recipe.yaml").write_text(text)
    code = main(["merge", str(tmp / "recipe.yaml"), str(tmp / "out"), "--no-progress"])
    return code, capsys.readouterr().err, tmp


def assert_clean_config_error(code: int, err: str, tmp: Path) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir()) == ["recipe.yaml"]  # no out, no out.tmp-*


def test_valid_recipe_merges(models, capsys):
    code, err, tmp = run_merge(yaml.safe_dump(valid(models)), capsys)
    assert code == 0, err
    assert (tmp / "out" / "config.json").is_file() and (tmp / "out" / "model.safetensors").is_file()
    code, err, tmp = run_merge(yaml.safe_dump(valid_slices(models, 0, 2)), capsys)
    assert code == 0, err


@FUZZ
@given(data=st.data())
def test_fuzzed_recipe_exits_2(models, capsys, data):
    recipe = data.draw(broken_recipe(models))
    assert_clean_config_error(*run_merge(yaml.safe_dump(recipe), capsys))


@FUZZ
@given(text=GARBAGE)
def test_garbage_yaml_exits_2(capsys, text):
    assert_clean_config_error(*run_merge(text, capsys))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(lo=st.integers(-3, 5), hi=st.integers(-3, 5))
def test_layer_ranges_reversed_or_out_of_bounds(models, capsys, lo, hi):
    code, err, tmp = run_merge(yaml.safe_dump(valid_slices(models, lo, hi)), capsys)
    if 0 <= lo < hi <= 2:  # the tiny models have 2 layers
        assert code == 0, err
    else:
        assert_clean_config_error(code, err, tmp)
        assert "layer_range" in err


def test_multistage_recipe_error_in_a_later_stage_leaves_nothing(models, capsys):
    first = {**copy.deepcopy(valid(models)), "name": "stage-one"}
    second = valid(models)
    second["models"][0]["model"] = "stage-one"
    second["models"][1]["parameters"]["density"] = 2.0
    text = yaml.safe_dump_all([first, second])
    assert_clean_config_error(*run_merge(text, capsys))


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../b", "../../../up3", "/abs/stage", "..", "x/y"]
)
def test_stage_name_is_never_a_path(models, capsys, monkeypatch, name):
    """A stage `name:` is a label: a path in it must not make the merge write outside OUT_DIR.
    The merge runs three folders deep in a watched folder, from there as working directory, so
    an escape relative to OUT_DIR or to the working directory lands where it is seen; an
    absolute name is looked for where it points."""
    first = {**valid(models), "name": name}
    second = valid(models)
    second["models"][0]["model"] = name
    watched = Path(tempfile.mkdtemp(prefix="fuzz-stage-"))
    deep = watched / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    capsys.readouterr()
    (deep / "recipe.yaml").write_text(yaml.safe_dump_all([first, second]))
    code = main(["merge", str(deep / "recipe.yaml"), str(deep / "out"), "--no-progress"])
    err = capsys.readouterr().err
    written = {p.relative_to(deep).as_posix() if p.is_relative_to(deep) else str(p)
               for p in watched.rglob("*") if p != deep and p not in deep.parents}  # fmt: skip
    outside = {w for w in written if not w.startswith("out") and w != "recipe.yaml"}
    assert not outside, (code, err, sorted(outside))
    if name.startswith("/"):
        assert not Path(name).exists() and not Path(name).parent.exists()
    if code != 0:
        assert_clean_config_error(code, err, deep)
