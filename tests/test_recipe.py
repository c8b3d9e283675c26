"""Tests of the recipe format (evomerge/recipe/): mergekit YAML in, validation, YAML out."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge import recipe as R
from evomerge.errors import ConfigError
from evomerge.merge.arch import gradient_t

# the real method table (evomerge/merge/table.py) supplies every method's declared parameters

RECIPES = Path(__file__).parent / "recipes"
FIXTURES = sorted(RECIPES.glob("*.yaml"))


def bad(text: str, *parts: str) -> str:
    """Load YAML text that must fail; check the one-line message holds every part in order."""
    with pytest.raises(ConfigError) as info:
        R.load_recipe(text)
    msg = str(info.value)
    assert "\n" not in msg
    pos = 0
    for part in parts:
        found = msg.find(part, pos)
        assert found >= 0, f"{part!r} not in {msg!r}"
        pos = found + len(part)
    return msg


LINEAR = """\
merge_method: linear
models:
  - model: org/a
    parameters: {weight: 0.6}
  - model: org/b
    parameters: {weight: 0.4}
"""

TIES = """\
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {weight: 0.5, density: 0.5}
  - model: org/b
    parameters: {weight: 0.5, density: DENSITY}
"""


# ---------------------------------------------------------------- fixtures load and dump back


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_round_trips(path: Path) -> None:
    recipe = R.load_recipe(path)
    text = R.dump_recipe(recipe)
    assert R.load_recipe(text) == recipe
    assert R.dump_recipe(R.load_recipe(text)) == text  # dumping is a fixed point
    if path.stem != "revision":  # the other fixtures are already written in canonical form
        original = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert [d for d in yaml.safe_load_all(text)] == original


def test_fixture_set_is_complete() -> None:
    assert {p.stem for p in FIXTURES} >= {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "della",
        "model_stock",
        "passthrough",
        "multistage",
        "tokenizer",
        "revision",
    }


def test_dump_uses_mergekit_key_order() -> None:
    text = R.dump_recipe(R.load_recipe(RECIPES / "dare_ties.yaml"))
    keys = [line.split(":")[0] for line in text.splitlines() if re.match(r"^\w", line)]
    assert keys == [
        "merge_method",
        "base_model",
        "models",
        "parameters",
        "dtype",
        "random_seed",
        "provenance",
    ]
    assert "- model: org/base\n" in text  # no empty `parameters: {}` written


def test_slerp_filter_gradient_values() -> None:
    stage = R.load_recipe(RECIPES / "slerp.yaml").final
    t = stage.parameters["t"]
    assert t == [
        R.FilterEntry("self_attn", [0, 0.5, 0.3, 0.7, 1]),
        R.FilterEntry("mlp", [1, 0.5, 0.7, 0.3, 0]),
        R.FilterEntry(None, 0.5),
    ]
    assert stage.slices[0].sources[1].layer_range == (0, 32)
    attn, mlp, norm = "self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"
    # t=0.5 -> position 2 of 4 -> third element; t=0.625 -> halfway between third and fourth
    assert R.evaluate_setting(t, f"model.layers.16.{attn}", 0.5) == pytest.approx(0.3)
    assert R.evaluate_setting(t, f"model.layers.16.{mlp}", 0.5) == pytest.approx(0.7)
    assert R.evaluate_setting(t, f"model.layers.20.{attn}", 0.625) == pytest.approx(0.5)
    assert R.evaluate_setting(t, f"model.layers.20.{mlp}", 0.625) == pytest.approx(0.5)
    assert R.evaluate_setting(t, f"model.layers.3.{norm}", 0.1) == 0.5
    assert R.evaluate_setting(t, f"model.layers.31.{attn}", 1.0) == 1
    # layer 8 of 33 is at t = 8/32 = 0.25 -> exactly the second element
    assert (
        R.evaluate_setting(t, f"model.layers.8.{attn}", gradient_t("model.layers.8.x", 33)) == 0.5
    )


def test_model_references_and_revisions() -> None:
    stage = R.load_recipe(RECIPES / "revision.yaml").final
    assert [m.model for m in stage.models] == [
        R.ModelRef("org/model-a", "v1.2"),
        R.ModelRef("org/model-b", "5c2e4f1"),
        R.ModelRef("./local/model-c", "main"),
    ]
    assert stage.tokenizer == R.TokenizerConfig(source="org/model-a@v1.2")
    assert stage.out_dtype == "bf16" and stage.chat_template == "chatml"
    out = R.recipe_to_dict(R.load_recipe(RECIPES / "revision.yaml"))[0]
    assert [m["model"] for m in out["models"]] == [
        "org/model-a@v1.2",
        "org/model-b@5c2e4f1",
        "./local/model-c@main",
    ]
    assert out["out_dtype"] == "bf16"  # the user's spelling is kept


def test_tokenizer_section_and_chat_template() -> None:
    stage = R.load_recipe(RECIPES / "tokenizer.yaml").final
    tok = stage.tokenizer
    assert tok.source == "union" and tok.pad_to_multiple_of == 64
    assert tok.tokens["<|im_start|>"] == R.TokenSource("org/chatml-ft", False)
    assert tok.tokens["<|im_end|>"] == R.TokenSource("org/chatml-ft", True)
    assert tok.tokens["<|pad|>"] == R.TokenSource({"kind": "zero"})
    assert tok.tokens["<|sep|>"].source == {
        "kind": "model_token",
        "model": "org/base",
        "token": "</s>",
    }
    assert stage.chat_template.startswith("{% for message in messages %}")
    assert stage.chat_template.endswith("{% endfor %}\n")
    assert "chat_template: |\n" in R.dump_recipe(R.load_recipe(RECIPES / "tokenizer.yaml"))


def test_tokenizer_source_forms() -> None:
    base = R.load_recipe(LINEAR + "tokenizer_source: base\n").final.tokenizer
    assert base == R.TokenizerConfig(source="base")
    # a `tokenizer:` section without source means mergekit's default, union
    section = R.load_recipe(LINEAR + "tokenizer:\n  pad_to_multiple_of: 8\n").final.tokenizer
    assert section == R.TokenizerConfig(source="union", pad_to_multiple_of=8)
    assert R.load_recipe(LINEAR).final.tokenizer is None


def test_multistage_recipe() -> None:
    recipe = R.load_recipe(RECIPES / "multistage.yaml")
    assert [s.name for s in recipe.stages] == ["stage-della", "stage-ties", None]
    assert [s.merge_method for s in recipe.stages] == ["della", "ties", "model_stock"]
    assert recipe.stages[0].random_seed == 3
    assert recipe.stages[0].models[1].parameters == {"weight": 0.4, "density": 0.5, "epsilon": 0.15}
    assert [str(r) for r in R.stage_models(recipe.final)] == [
        "org/base",
        "stage-della",
        "stage-ties",
        "org/expert-c",
    ]
    assert R.dump_recipe(recipe).count("---\n") == 2


def test_seed_provenance_and_helpers() -> None:
    stage = R.load_recipe(RECIPES / "dare_ties.yaml").final
    assert stage.random_seed == 1234
    assert stage.provenance == {
        "evomerge": "0.1.0",
        "study": "demo",
        "sha256": {"org/expert-math": "3f2a9c", "org/expert-code": "77b0e1"},
    }
    assert R.base_index(stage) == 0
    della = R.load_recipe(RECIPES / "della.yaml").final  # base_model not listed: appended
    assert R.input_refs(della)[R.base_index(della)] == della.base_model == R.ModelRef("org/base")
    assert R.base_index(della) == len(della.models) == 2
    slerp = R.load_recipe(RECIPES / "slerp.yaml").final
    assert R.stage_models(slerp) == [R.ModelRef("org/base-7b"), R.ModelRef("org/chat-7b")]
    passthrough = R.load_recipe(RECIPES / "passthrough.yaml").final
    assert [str(r) for r in R.stage_models(passthrough)] == ["org/model-a", "org/model-b"]


def test_empty_provenance_is_left_out() -> None:
    recipe = R.load_recipe(LINEAR + "provenance: {}\n")
    assert recipe.final.provenance is None and "provenance" not in R.dump_recipe(recipe)


def test_floats_round_trip_exactly() -> None:
    weights = [0.1 + 0.2, 1 / 3, 1e-5, 2.5e-300, 1e16, 123456789.123456789, 0.0]
    data = {
        "merge_method": "linear",
        "models": [
            {"model": f"org/m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)
        ],
    }
    recipe = R.parse_recipe(data)
    again = R.load_recipe(R.dump_recipe(recipe))
    assert [m.parameters["weight"] for m in again.final.models] == weights  # bit for bit


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=4),
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=5),
)
def test_round_trip_property(weights: list[float], grad: list[float]) -> None:
    data = {
        "merge_method": "linear",
        "models": [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "parameters": {"weight": [{"filter": "mlp", "value": grad}, {"value": grad[0]}]},
    }
    recipe = R.parse_recipe(data)
    assert R.load_recipe(R.dump_recipe(recipe)) == recipe


def test_scientific_notation_is_a_number() -> None:
    stage = R.load_recipe(LINEAR.replace("0.6", "1e-5").replace("0.4", "2E+1")).final
    assert stage.models[0].parameters["weight"] == 1e-5
    assert stage.models[1].parameters["weight"] == 20.0


def test_text_or_path_and_parse_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(LINEAR)
    assert R.load_recipe(path) == R.load_recipe(str(path)) == R.load_recipe(LINEAR)
    named = tmp_path / "merge_method_test.yaml"  # a file name holding "merge_method" is a path
    named.write_text(LINEAR)
    assert R.load_recipe(str(named)) == R.load_recipe(LINEAR)
    assert R.parse_recipe(yaml.safe_load(LINEAR)) == R.load_recipe(LINEAR)
    assert R.parse_recipe([yaml.safe_load(LINEAR)]) == R.load_recipe(LINEAR)


def test_save_recipe_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = R.load_recipe(RECIPES / "multistage.yaml")
    out = tmp_path / "recipe.yaml"
    R.save_recipe(recipe, out)
    assert R.load_recipe(out) == recipe and os.listdir(tmp_path) == ["recipe.yaml"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        R.save_recipe(R.load_recipe(LINEAR), out)
    assert os.listdir(tmp_path) == ["recipe.yaml"]  # no temp file left behind
    assert R.load_recipe(out) == recipe  # the old file is intact


# ---------------------------------------------------------------- evaluate_setting


def test_evaluate_setting_by_hand() -> None:
    ev = R.evaluate_setting
    assert ev(0.3, "x", 0.7) == 0.3 and ev(True, "x", 0.5) is True and ev("sum", "x", 1) == "sum"
    assert ev([0, 1], "x", 0.25) == pytest.approx(0.25)
    assert ev([1, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)  # 0.5 * 0.7 + 0.5 * 0.1
    assert ev([1, 0.7, 0.1], "x", 1.0) == pytest.approx(0.1)
    assert ev([2.0], "x", 0.6) == 2.0
    first_wins = [R.FilterEntry("attn", 0.1), R.FilterEntry("self_attn", 0.2)]
    assert ev(first_wins, "layers.0.self_attn.k_proj.weight", 0) == 0.1
    star = [R.FilterEntry("mlp", 0.9), R.FilterEntry("*", [0, 4])]
    assert ev(star, "layers.1.self_attn.k_proj.weight", 0.5) == pytest.approx(2.0)
    assert ev(star, "layers.1.mlp.up_proj.weight", 0.5) == 0.9
    with pytest.raises(KeyError):
        ev([R.FilterEntry("mlp", 1.0)], "lm_head.weight", 0)


# ---------------------------------------------------------------- validation: one test per rule


def test_unknown_top_level_key() -> None:
    bad(
        LINEAR.replace("merge_method", "merge_methd"),
        "recipe: unknown key 'merge_methd'.",
        "Did you mean 'merge_method'?",
    )


UNKNOWN_SECTION_KEYS = [  # (recipe, text replaced, replacement, expected parts of the message)
    (None, "    parameters: {weight: 0.4}", "    parameter: {weight: 0.4}",
     ("recipe.models[1]: unknown key 'parameter'.", "Did you mean 'parameters'?")),
    ("slerp.yaml", "  - sources:", "  - source:",
     ("recipe.slices[0]: unknown key 'source'.", "Did you mean 'sources'?")),
    ("slerp.yaml", "layer_range: [0, 32]\n      - model", "layer_rang: [0, 32]\n      - model",
     ("recipe.slices[0].sources[0]: unknown key 'layer_rang'.", "'layer_range'?")),
    ("tokenizer.yaml", "pad_to_multiple_of", "pad_to_multiple",
     ("recipe.tokenizer: unknown key 'pad_to_multiple'.", "'pad_to_multiple_of'?")),
    ("tokenizer.yaml", "force: true", "forced: true",
     ("recipe.tokenizer.tokens['<|im_end|>']: unknown key 'forced'.", "'force'?")),
]  # fmt: skip


@pytest.mark.parametrize(("recipe", "old", "new", "expected"), UNKNOWN_SECTION_KEYS)
def test_unknown_keys_in_sections(recipe: str | None, old: str, new: str, expected) -> None:
    text = LINEAR if recipe is None else (RECIPES / recipe).read_text()
    assert old in text
    bad(text.replace(old, new), *expected)


def test_per_module_merges_are_refused() -> None:
    bad(LINEAR + "modules: {}\n", "recipe.modules: per-module merges", "not supported yet")


def test_unknown_merge_method() -> None:
    bad(
        TIES.replace("merge_method: ties", "merge_method: tie").replace("DENSITY", "0.5"),
        "recipe.merge_method: unknown merge method 'tie'.",
        "Did you mean 'ties'?",
    )


def test_parameter_out_of_bounds() -> None:
    bad(TIES.replace("DENSITY", "1.5"), "recipe.models[2].parameters.density:", "'density'", "1.5")
    bad(TIES.replace("DENSITY", "-0.1"), "recipe.models[2].parameters.density:", "but got -0.1")


def test_gradient_and_filter_elements_are_checked() -> None:
    bad(
        TIES.replace("DENSITY", "[0.5, 0.9, 1.5]"), "recipe.models[2].parameters.density[2]:", "1.5"
    )
    filt = "[{filter: mlp, value: [0.2, 0.3]}, {value: [0.5, -1]}]"
    bad(TIES.replace("DENSITY", filt), "recipe.models[2].parameters.density[1].value[1]:", "-1")
    eps = "[{filter: mlp, value: [0.1, 0.6]}, {value: 0.1}]"
    della = (RECIPES / "della.yaml").read_text().replace("epsilon: 0.2", f"epsilon: {eps}")
    bad(della, "recipe.models[0].parameters.epsilon[0].value[1]:", "'epsilon'", "0.6")


def test_wrong_kinds_of_values() -> None:
    bad(TIES.replace("DENSITY", "high"), "recipe.models[2].parameters.density:", "'high'")
    bad(
        TIES.replace("DENSITY", "[0.5, high]"),
        "recipe.models[2].parameters.density[1]:",
        "numbers only",
        "'high'",
    )
    bad(LINEAR + "parameters: {normalize: 0.5}\n", "recipe.parameters.normalize:", "true or false")
    bad(
        LINEAR.replace("weight: 0.4", "weight: null"), "recipe.models[1].parameters.weight:", "None"
    )


def test_della_epsilon_keeps_density_inside() -> None:
    della = (RECIPES / "della.yaml").read_text()
    bad(
        della.replace("epsilon: 0.2", "epsilon: 0.4"),
        "recipe.models[0].parameters:",
        "density ± epsilon inside (0, 1)",
        "model 'org/expert-a'",
        "density=0.7, epsilon=0.4",
        "[0.3, 1.1]",
    )
    # epsilon given once at the top level applies to every model: the second one breaks it
    top = della.replace("      epsilon: 0.2\n", "").replace("      epsilon: 0.1\n", "")
    top = top.replace("lambda: 1.1", "lambda: 1.1\n  epsilon: 0.25")
    bad(top, "recipe.models[1].parameters:", "model 'org/expert-b'", "density=0.8, epsilon=0.25")
    # a density gradient is checked at its endpoints: 0.7 at t=0 is fine, 0.1 at t=1 is not
    grad = della.replace("density: 0.7", "density: [0.7, 0.1]")
    bad(grad, "model 'org/expert-a'", "density=0.1, epsilon=0.2", "(t=1)")
    # density 1 keeps every entry, so epsilon does not matter (mergekit skips the draw)
    R.load_recipe(della.replace("density: 0.7", "density: 1.0"))


def test_slerp_needs_exactly_two_models() -> None:
    slerp = (RECIPES / "slerp.yaml").read_text()
    three = slerp.replace(
        "merge_method", "      - model: org/other-7b\n        layer_range: [0, 32]\nmerge_method"
    )
    bad(
        three,
        "recipe.slices[0].sources: merge method 'slerp' takes exactly 2 models",
        "got 3: org/base-7b, org/chat-7b, org/other-7b",
    )
    one = "merge_method: slerp\nbase_model: a\nmodels: [{model: a}]\nparameters: {t: 0.5}\n"
    bad(one, "recipe.models: merge method 'slerp' takes exactly 2 models", "got 1: a")


def test_method_needing_a_base() -> None:
    bad(
        TIES.replace("base_model: org/base\n", "").replace("DENSITY", "0.5"),
        "recipe: merge method 'ties' needs a base_model",
    )


def test_min_models_counts_the_base() -> None:
    one = "merge_method: model_stock\nbase_model: org/base\nmodels: [{model: org/ft-1}]\n"
    bad(
        one,
        "recipe.models: merge method 'model_stock' takes at least 3 models",
        "(base_model included), but got 2: org/ft-1, org/base",
    )
    R.load_recipe(one.replace("[{model: org/ft-1}]", "[{model: org/ft-1}, {model: org/ft-2}]"))


def test_required_parameter_missing() -> None:
    slerp = (RECIPES / "slerp.yaml").read_text()
    no_t = slerp[: slerp.index("parameters:")] + "dtype: bfloat16\n"
    bad(no_t, "recipe.slices[0]: merge method 'slerp' needs parameter 't'")
    bad(
        LINEAR.replace("    parameters: {weight: 0.4}\n", ""),
        "recipe.models[1]: merge method 'linear' needs parameter 'weight'",
        "for model 'org/b'",
    )
    # linear merges an unlisted base_model as one more input (as mergekit and the engine do)
    bad(
        LINEAR + "base_model: org/base\n",
        "recipe.base_model: merge method 'linear' needs parameter 'weight'",
        "'org/base'",
    )
    R.load_recipe(LINEAR + "base_model: org/base\nparameters: {weight: 0.1}\n")
    # base-relative methods do not read the base's parameters (ties.yaml lists the base bare)
    R.load_recipe(RECIPES / "ties.yaml")


def test_models_section_shape() -> None:
    bad("merge_method: linear\nmodels: []\n", "recipe.models: expected a non-empty list")
    bad(
        "merge_method: linear\ndtype: float16\n",
        "exactly one of 'models:' or 'slices:'",
        "got neither",
    )
    slices = "slices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n"
    bad(LINEAR + slices, "exactly one of 'models:' or 'slices:', got both")
    bad("models: [{model: a}]\n", "recipe: missing 'merge_method:'")
    bad(
        LINEAR.replace("  - model: org/b\n", "  - modl: org/b\n"),
        "recipe.models[1]:",
        "unknown key 'modl'",
    )


def test_empty_gradient_list() -> None:
    bad(
        TIES.replace("DENSITY", "[]"),
        "recipe.models[2].parameters.density:",
        "non-empty gradient or filter list, but got []",
    )


def test_filter_entry_without_value() -> None:
    bad(
        TIES.replace("DENSITY", "[{filter: mlp}, {value: 0.5}]"),
        "recipe.models[2].parameters.density[0]: a filter entry needs a 'value'",
    )
    # a last entry that is not a default is allowed, as in mergekit
    R.load_recipe(TIES.replace("DENSITY", "[{filter: mlp, value: 0.3}]"))


def test_nan_and_inf_are_rejected() -> None:
    bad(
        LINEAR.replace("weight: 0.4", "weight: .nan"),
        "recipe.models[1].parameters.weight:",
        "finite",
        "nan",
    )
    bad(TIES.replace("DENSITY", "[0.5, .inf]"), "recipe.models[2].parameters.density[1]:", "inf")
    bad(
        LINEAR + "parameters: {interpolation_factor: .nan}\n",
        "recipe.parameters.interpolation_factor:",
        "finite",
    )
    bad(LINEAR + "provenance: {score: [0.5, .nan]}\n", "recipe.provenance.score[1]:", "finite")


def test_stage_names_defined_once_and_before_use() -> None:
    text = (RECIPES / "multistage.yaml").read_text()
    bad(
        text.replace("name: stage-ties", "name: stage-della"),
        "recipe[stage 2].name: stage name 'stage-della' is defined twice (stages 1 and 2)",
    )
    early = text.replace("  - model: org/expert-b\n", "  - model: stage-ties\n", 1)
    bad(early, "recipe[stage 1].models[1].model: 'stage-ties' is used before it is defined")
    itself = text.replace("  - model: org/expert-c\n", "  - model: stage-ties\n", 1)
    bad(itself, "recipe[stage 2].models[1].model: 'stage-ties'", "this stage's own name")


def test_layer_range_shape() -> None:
    base = "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: LR}]}]\n"
    bad(
        base.replace("LR", "[3]"),
        "recipe.slices[0].sources[0].layer_range:",
        "two integers [start, end], but got [3]",
    )
    bad(base.replace("LR", "[0.5, 2]"), "layer_range: expected two integers", "[0.5, 2]")
    bad(
        base.replace("LR", "[8, 4]"),
        "recipe.slices[0].sources[0].layer_range:",
        "0 <= start < end, but got [8, 4]",
    )
    bad(base.replace("LR", "[4, 4]"), "but got [4, 4]")
    bad(base.replace("LR", "[.nan, 4]"), "layer_range: expected two integers", "nan")


def test_slice_sources_span_the_same_layers() -> None:
    slerp = (RECIPES / "slerp.yaml").read_text().replace("[0, 32]\nmerge", "[0, 30]\nmerge")
    bad(
        slerp,
        "recipe.slices[0].sources: every source must span the same number of layers",
        "org/chat-7b [0, 30]",
    )


def test_validate_layer_ranges_against_configs() -> None:
    stage = R.load_recipe(RECIPES / "passthrough.yaml").final
    R.validate_layer_ranges(stage, {"org/model-a": 32, "org/model-b": 32})
    with pytest.raises(ConfigError) as info:
        R.validate_layer_ranges(stage, {"org/model-a": 32, "org/model-b": 20})
    assert str(info.value) == (
        "slices[1].sources[0].layer_range: [8, 24] is out of bounds for 'org/model-b' (20 layers)"
    )
    with pytest.raises(ConfigError, match=r"^recipe\[stage 2\]\.slices\[2\]"):
        R.validate_layer_ranges(stage, {"org/model-a": 24}, where="recipe[stage 2]")


def test_unread_parameter_warns_with_location() -> None:
    with pytest.warns(UserWarning) as rec:
        R.load_recipe(LINEAR.replace("weight: 0.4}", "weight: 0.4, interpolation_factor: 0.3}"))
    msgs = [str(w.message) for w in rec]
    assert any(
        m.startswith(
            "recipe.models[1].parameters.interpolation_factor: merge method 'linear' "
            "does not read parameter 'interpolation_factor'"
        )
        for m in msgs
    ), msgs
    with pytest.warns(UserWarning, match=r"parameters\.densty: .*Did you mean 'density'\?"):
        R.load_recipe(TIES.replace("DENSITY", "0.5") + "parameters: {densty: 0.5}\n")


def test_global_parameter_given_per_model_warns() -> None:
    models = "models: [{model: a}, {model: b, parameters: {t: 0.3}}]\n"
    slerp = "merge_method: slerp\nbase_model: a\n" + models
    with pytest.warns(UserWarning, match=r"^recipe\.models\[1\]\.parameters\.t: 't' is one value"):
        R.load_recipe(slerp + "parameters: {t: 0.5}\n")


def test_known_parameters_do_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    for path in FIXTURES:
        R.load_recipe(path)
    assert [str(w.message) for w in recwarn if w.category is UserWarning] == []


def test_dtypes() -> None:
    bad(LINEAR + "dtype: float8\n", "recipe.dtype: unknown dtype 'float8'.", "Available:")
    bad(LINEAR + "out_dtype: bfloat\n", "recipe.out_dtype:", "Did you mean 'bfloat16'?")
    for alias in ("fp16", "bf16", "fp32", "float32"):
        recipe = R.load_recipe(LINEAR + f"dtype: {alias}\n")
        assert recipe.final.dtype == alias and f"dtype: {alias}\n" in R.dump_recipe(recipe)


def test_lora_adapters_parse_as_mergekit_spells_them() -> None:
    plus = R.parse_recipe(yaml.safe_load(LINEAR.replace("org/b", "org/b+org/b-lora")))
    assert str(plus.final.models[1].model) == "org/b+org/b-lora"
    assert plus.final.models[1].model.lora == R.ModelRef("org/b-lora")
    dict_lora = LINEAR.replace("model: org/b", "model: {model: org/b, lora: org/lora@v1}")
    assert str(R.parse_recipe(yaml.safe_load(dict_lora)).final.models[1].model) == (
        "org/b+org/lora@v1"
    )
    bad(LINEAR.replace("org/b", "org/b+x+y"), "recipe.models[1].model:", "one '+'")


def test_bad_model_references() -> None:
    bad(
        LINEAR.replace("org/b", "org/b@v1@v2"),
        "recipe.models[1].model:",
        "'path@revision', but got 'org/b@v1@v2'",
    )
    bad(LINEAR.replace("model: org/b", "model: 42"), "recipe.models[1].model:", "but got 42")
    bad(
        LINEAR.replace("model: org/b", "model: {model: org/b@v1, revision: v2}"),
        "revision given twice",
    )


def test_other_stage_fields() -> None:
    bad(LINEAR + "random_seed: 1.5\n", "recipe.random_seed: expected an integer, but got 1.5")
    bad(LINEAR + "provenance: [a]\n", "recipe.provenance: expected a mapping")
    bad(
        LINEAR + "tokenizer_source: base\ntokenizer: {source: base}\n",
        "give 'tokenizer_source' or 'tokenizer:', not both",
    )
    tok = (RECIPES / "tokenizer.yaml").read_text()
    bad(
        tok.replace("kind: zero", "kind: zeros"),
        "recipe.tokenizer.tokens['<|pad|>'].source.kind:",
        "'zero' or 'model_token'",
    )
    bad(
        tok.replace('token: "</s>"', "token_id: 2\n        token: x"),
        "exactly one of 'token_id' or 'token'",
    )


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    bad("merge_method: linear\nmodels: [a\n", "recipe: invalid YAML at line")
    bad(LINEAR + "---\n3\n", "recipe[stage 2]: expected a mapping", "but got int 3")
    with pytest.raises(ConfigError, match=r"recipe file not found: .*missing\.yaml"):
        R.load_recipe(tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(TIES.replace("DENSITY", "2"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: recipe\.models\[2\]\.parameters\.density"):
        R.load_recipe(path)


def test_validate_recipe_on_recipes_built_in_code() -> None:
    stage = R.MergeStage(
        "ties",
        [R.InputModel(R.ModelRef("a"), {"density": float("nan")})],
        base_model=R.ModelRef("b"),
    )
    with pytest.raises(ConfigError, match=r"recipe\.models\[0\]\.parameters\.density: .*finite"):
        R.validate_recipe(R.Recipe([stage]))


# ---------------------------------------------------------------- the command line


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    engine = importlib.util.find_spec("evomerge.merge.engine")
    if engine is None or not hasattr(importlib.import_module("evomerge.merge.engine"), "cli_merge"):
        pytest.skip("evomerge.merge.engine:cli_merge (the merge command) has not landed yet")
    from evomerge.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(TIES.replace("DENSITY", "1.5"))
    code = main(["merge", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "models[2].parameters.density" in err and "1.5" in err
    assert not (tmp_path / "out").exists()
