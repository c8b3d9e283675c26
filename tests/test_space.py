"""Search spaces: simplex parameterizations, decoding into recipes, baselines, validation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from _search_fakes import ensure_methods

from evomerge.errors import ConfigError
from evomerge.recipe import FilterEntry, evaluate_setting
from evomerge.search import simplex
from evomerge.search.baselines import baseline_trials
from evomerge.search.codec import Codec
from evomerge.search.space import SearchSpace

ensure_methods()


def load(text: str) -> SearchSpace:
    return SearchSpace.from_text(text, source="test.yaml")


def space(text: str, sampler: str = "tpe") -> Codec:
    return load(text).codec(sampler)


LINEAR = """
models: [m/a, m/b, m/c]
method: linear
parameters:
  weight: {simplex: true}
tasks: [t1, t2]
"""


# ---- simplex parameterizations -----------------------------------------------------------
def test_logu_decode_hand_computed():
    ws = simplex.logu_decode([math.exp(-1), math.exp(-3), 1.0])  # -log x = (1, 3, 0)
    assert ws == pytest.approx([0.25, 0.75, 0.0])
    assert simplex.logu_decode([1.0, 1.0]) == [0.5, 0.5]  # no preference: the centre


def test_stick_decode_hand_computed():
    # n = 3: frac_0 = 1 - (1 - u0)^(1/2), frac_1 = u1; u = (0.75, 0.5) -> 0.5, 0.25, 0.25
    assert simplex.stick_decode([0.75, 0.5]) == pytest.approx([0.5, 0.25, 0.25])
    assert simplex.stick_decode([1.0, 0.3]) == pytest.approx([1.0, 0.0, 0.0])  # a corner
    assert simplex.stick_decode([0.0, 0.0]) == pytest.approx([0.0, 0.0, 1.0])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_roundtrips_and_sums(n):
    rng = random.Random(n)
    for _ in range(200):
        xs = [rng.uniform(simplex.LOGU_LOW, 1.0) for _ in range(n)]
        ws = simplex.logu_decode(xs)
        assert sum(ws) == pytest.approx(1.0) and min(ws) >= 0
        assert simplex.logu_decode(simplex.logu_encode(ws)) == pytest.approx(ws)
        us = [rng.random() for _ in range(n - 1)]
        ws = simplex.stick_decode(us)
        assert sum(ws) == pytest.approx(1.0) and min(ws) >= 0
        assert simplex.stick_encode(ws) == pytest.approx(us)


@pytest.mark.parametrize("decode", ["logu", "stick"])
def test_uniform_cube_maps_to_flat_dirichlet(decode):
    """Under a flat Dirichlet on 3 models, E[w_k] = 1/3 and P(w_0 > 1/2) = (1/2)^2 = 1/4."""
    rng = random.Random(0)
    n, draws = 3, 20000
    if decode == "logu":
        samples = [simplex.logu_decode([rng.random() for _ in range(n)]) for _ in range(draws)]
    else:
        samples = [simplex.stick_decode([rng.random() for _ in range(n - 1)]) for _ in range(draws)]
    for k in range(n):
        assert sum(s[k] for s in samples) / draws == pytest.approx(1 / 3, abs=0.01)
    assert sum(s[0] > 0.5 for s in samples) / draws == pytest.approx(0.25, abs=0.015)


# ---- decoding --------------------------------------------------------------------------------
def test_decode_weights_each_parameterization():
    sp = space(LINEAR)
    params = {"weight[a]": math.exp(-1), "weight[b]": math.exp(-3), "weight[c]": 1.0}
    stage = sp.decode(params).final
    assert [m.parameters["weight"] for m in stage.models] == pytest.approx([0.25, 0.75, 0.0])
    assert [str(m.model) for m in stage.models] == ["m/a", "m/b", "m/c"]
    cm = space(LINEAR, "cmaes")
    assert list(cm.distributions("linear")) == ["weight[stick0]", "weight[stick1]"]
    stage = cm.decode({"weight[stick0]": 0.75, "weight[stick1]": 0.5}).final
    assert [m.parameters["weight"] for m in stage.models] == pytest.approx([0.5, 0.25, 0.25])


def test_per_group_and_filter_values_land_in_gradient_and_filter_lists():
    sp = space("""
base_model: base
models: [a]
method: slerp
num_layers: 6
parameters:
  t: {layer_groups: 3, filters: [self_attn, mlp], rest: 0.5}
tasks: [t1]
""")
    names = list(sp.distributions("slerp"))
    assert names == [f"t[{f}][g{g}]" for f in ("self_attn", "mlp") for g in range(3)]
    params = {f"t[{f}][g{g}]": 0.1 * g + (0.5 if f == "mlp" else 0.0)
              for f in ("self_attn", "mlp") for g in range(3)}  # fmt: skip
    t = sp.decode(params).final.parameters["t"]
    assert isinstance(t[0], FilterEntry) and [e.filter for e in t] == ["self_attn", "mlp", None]
    attn = next(e.value for e in t if e.filter == "self_attn")
    assert attn == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])  # layer l -> group l * 3 // 6
    assert t[-1].value == 0.5
    for layer in range(6):  # what the merge evaluates is exactly the group's value
        pos = layer / 5
        got = evaluate_setting(t, f"model.layers.{layer}.mlp.up_proj.weight", pos)
        assert got == pytest.approx(0.5 + 0.1 * (layer * 3 // 6))
        got = evaluate_setting(t, f"model.layers.{layer}.self_attn.q_proj.weight", pos)
        assert got == pytest.approx(0.1 * (layer * 3 // 6))
        assert evaluate_setting(t, f"model.layers.{layer}.input_layernorm.weight", pos) == 0.5


def test_della_epsilon_never_breaks_its_bound():
    import optuna

    sp = space("""
base_model: base
models: [a, b]
method: della
parameters:
  weight: {simplex: true}
  density: {low: 0.05, high: 1.0}
  epsilon: {high: 0.99}
tasks: [t1]
""")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(200):
        stage = sp.suggest(study.ask()).final
        for m in stage.models:
            d, e = m.parameters["density"], m.parameters["epsilon"]
            assert 0 <= e < min(d, 1 - d) or e == 0.0


def test_decode_is_pure_and_matches_suggest():
    import optuna

    sp = space(LINEAR.replace("method: linear", "method: [linear, task_arithmetic]\n"
                              "base_model: base"))  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        recipe = sp.suggest(trial)
        assert sp.decode(dict(trial.params)) == recipe == sp.decode(dict(trial.params))
        assert recipe.final.merge_method == trial.params["method"]
        assert all(k == "method" or k.startswith(trial.params["method"] + ".")
                   for k in trial.params)  # fmt: skip


# ---- baselines -------------------------------------------------------------------------------
def test_baselines_uniform_experts_defaults(tmp_path: Path):
    sp = load(LINEAR)
    for sampler in ("tpe", "cmaes"):
        trials = baseline_trials(sp, sp.codec(sampler).parameterization)
        got = {label: sp.decode(p).final for label, p in trials}
        weights = {k: [m.parameters["weight"] for m in s.models] for k, s in got.items()}
        assert weights["uniform:linear"] == pytest.approx([1 / 3] * 3)
        assert weights["expert:b:linear"] == pytest.approx([0, 1, 0])
        assert weights["defaults:linear"] == pytest.approx([1 / 3] * 3)


def test_baseline_from_recipe(tmp_path: Path):
    recipe = tmp_path / "warm.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                      "  - model: a\n    parameters: {weight: 0.7}\n"
                      "  - model: b\n    parameters: {weight: 0.2}\n"
                      "parameters: {lambda: 1.2}\n")  # fmt: skip
    sp = load(f"""
base_model: base
models: [a, b]
method: task_arithmetic
parameters: {{weight: {{low: 0, high: 1}}, lambda: {{low: 0.5, high: 1.5}}}}
tasks: [t1]
baselines: [{recipe}]
""")
    ((_, params),) = baseline_trials(sp)
    stage = sp.decode(params).final
    assert [m.parameters["weight"] for m in stage.models] == pytest.approx([0.7, 0.2])
    assert stage.parameters["lambda"] == pytest.approx(1.2)


# ---- validation: one rule per case --------------------------------------------------------
BAD = {
    "unknown top key": (LINEAR + "modles: []\n", "did you mean 'models'"),
    "unknown parameter": (LINEAR.replace("weight: {", "wieght: {"), "did you mean 'weight'"),
    "param key": (LINEAR.replace("simplex: true", "simplx: true"), "did you mean 'simplex'"),
    "empty bounds": (
        LINEAR.replace("{simplex: true}", "{low: 0.8, high: 0.2}"),
        "low <= high must hold, but got low=0.8, high=0.2",
    ),
    "simplex one model": (
        LINEAR.replace("[m/a, m/b, m/c]", "[m/a]"),
        "simplex needs at least 2 models",
    ),
    "unknown method": (LINEAR.replace("method: linear", "method: lineer"), "did you mean 'linear'"),
    "needs base": (LINEAR.replace("method: linear", "method: ties"), "needs base_model"),
    "unknown objective task": (LINEAR + "objective: {tasks: {t3: 1}}\n", "unknown task 't3'"),
    "missing task file": (LINEAR.replace("[t1, t2]", "[evals/nope.yaml]"), "not found"),
    "groups without layers": (
        LINEAR.replace("{simplex: true}", "{simplex: true, layer_groups: 2}"),
        "needs the layer count",
    ),
    "unknown sampler": (LINEAR + "search: {sampler: tpee}\n", "did you mean 'tpe'"),
    "fixed value of wrong kind": (
        LINEAR.replace("weight: {simplex: true}", "weight: 0.5\n  normalize: 3"),
        "'normalize' must be true or false, but got 3",
    ),
    "not yaml": ("models: [a\n", "invalid YAML at line 2"),
    "batch size": (
        LINEAR + "eval: {batch_size: big}\n",
        "eval.batch_size: expected an integer >= 1 or 'auto', but got 'big'",
    ),
    "density on task_arithmetic": (
        LINEAR.replace("method: linear", "method: task_arithmetic\nbase_model: m/base").replace(
            "{simplex: true}", "{low: 0, high: 1}\n  density: {low: 0.2, high: 0.9}"
        ),
        "unknown parameter 'density'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_are_one_line(case):
    text, message = BAD[case]
    with pytest.raises(ConfigError) as exc:
        SearchSpace.from_text(text, source="test.yaml")
    assert message.lower() in str(exc.value).lower() and "\n" not in str(exc.value)
    assert str(exc.value).startswith("test.yaml")


def test_samplers_that_cannot_handle_the_space():
    cat = LINEAR.replace("method: linear", "method: [linear, task_arithmetic]\nbase_model: base")
    with pytest.raises(ConfigError, match="cmaes cannot search a categorical method"):
        space(cat, "cmaes")
    multi = LINEAR + "objectives: [t1, t2]\n"
    with pytest.raises(ConfigError, match="cmaes is single-objective"):
        space(multi, "cmaes")
    space(multi, "nsga2")  # fine
    space(cat, "gp")  # GP handles categorical parameters


def test_example_spaces_load_and_decode_to_valid_recipes(monkeypatch):
    import optuna

    from evomerge.recipe import validate_recipe

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # spaces name evals/ and zoo/ relative to the repository
    files = sorted((root / "search_spaces").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        sp = SearchSpace.from_yaml(f.relative_to(root))
        codec = sp.codec(sp.default_sampler())
        for _, params in baseline_trials(sp, codec.parameterization):
            validate_recipe(sp.decode(params), str(f))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        validate_recipe(codec.suggest(study.ask()), str(f))
