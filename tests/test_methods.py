"""Merge methods: contract tests over every method table entry, hand-computed references per
method, and the parameter resolution in evomerge.merge.resolve."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.contract import load_function
from evomerge.merge.resolve import build_inputs, merge_tensor
from evomerge.merge.table import get_method, method_names
from evomerge.recipe import FilterEntry, InputModel, MergeStage, ModelRef
from evomerge.recipe.schema import base_index

RECIPES = Path(__file__).parent / "recipes"
SHAPE = (6, 5)


def stage(method, n, params=None, per_model=None, base=True, listed=False, seed=0) -> MergeStage:
    """Models m0..m{n-1} (+ base 'b' unless base=False; listed=True puts it in models: first)."""
    per_model = per_model or [{}] * n
    models = [InputModel(ModelRef(f"m{i}"), dict(per_model[i])) for i in range(n)]
    if listed:
        models.insert(0, InputModel(ModelRef("b"), {}))
    return MergeStage(
        method,
        models=models,
        base_model=ModelRef("b") if base else None,
        parameters=dict(params or {}),
        random_seed=seed,
    )


def tensors(n, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, torch.stack([base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)])


def default_stage(name: str, n_models=None) -> tuple[MergeStage, int]:
    """A valid stage for any method, with every required parameter set."""
    method = get_method(name)
    use_base = method.needs_base or name in ("nuslerp", "multislerp")
    n = n_models or {"slerp": 1, "nearswap": 1, "passthrough": 1, "nuslerp": 2}.get(name, 3)
    params = {}
    if method.param("weight"):
        params["weight"] = 0.5
    if method.param("t"):
        params["t"] = 0.4 if name == "slerp" else 0.05
    if method.param("density"):
        params["density"] = 0.6
    if method.param("epsilon"):
        params["epsilon"] = 0.1
    return stage(name, n, params, base=use_base and name != "passthrough"), n


@pytest.mark.parametrize("name", method_names())
def test_params_declared_with_defaults_inside_bounds(name):
    method = get_method(name)
    assert method.doc and len(set(method.param_names)) == len(method.param_names)
    for p in method.params:
        assert p.doc
        if p.default is not None:
            p.check(p.default, f"{name}.{p.name}")
        if p.search_low is not None:
            p.check(p.search_low, "search_low")
            p.check(p.search_high, "search_high")
            assert p.search_low < p.search_high
        assert not (p.required and p.default is not None)


@pytest.mark.parametrize("name", method_names())
def test_table_names_a_function_taking_its_options(name):
    """The static table and methods.py agree: each "module:function" exists and takes the
    inputs plus exactly the options the table binds."""
    method = get_method(name)
    fn = load_function(method.function)
    args = list(inspect.signature(fn).parameters)
    assert callable(fn) and args[0] == "inputs"
    assert args[1:] == [k for k, _ in method.options]


def test_loading_a_recipe_imports_no_torch():
    code = (
        "import sys; from evomerge.recipe import load_recipe; "
        f"load_recipe({str(RECIPES / 'della.yaml')!r}); "
        "from evomerge.merge.table import method_names; method_names(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", method_names())
def test_contract_shape_dtype_determinism(name):
    st, n = default_stage(name)
    base, models = tensors(n)
    b = base if st.base_model is not None else None
    out1 = merge_tensor(st, "model.layers.0.mlp.up_proj.weight", models, b, 0.5)
    out2 = merge_tensor(st, "model.layers.0.mlp.up_proj.weight", models.clone(), b, 0.5)
    assert out1.shape == SHAPE and out1.dtype == torch.float32
    assert torch.equal(out1, out2)
    assert torch.isfinite(out1).all()


@pytest.mark.parametrize("name", method_names())
def test_identity_when_all_models_equal(name):
    st, n = default_stage(name)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    if name == "multislerp":  # with a base, all task vectors would be 0 (mergekit: an error)
        st.base_model = None
    out = merge_tensor(st, "w", x.expand(n, *SHAPE).clone(), x.clone(), 0.0)
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()


def test_ties_by_hand():
    base = torch.ones(2, 3)
    a = base + torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 1.0]])
    b = base + torch.tensor([[-2.0, 2.5, 0.1], [1.0, 3.0, -5.0]])
    st = stage("ties", 2, {"density": 0.5}, [{"weight": 1.0}, {"weight": 0.5}])
    # trim to 3 of 6: A -> [[3,0,0],[2,-4,0]], B -> [[0,2.5,0],[0,3,-5]]; weighted B halves;
    # elected signs (sum) + + + / + - -; disjoint mean divides by the agreeing weights
    out = merge_tensor(st, "w", torch.stack([a, b]), base, 0.0)
    assert torch.allclose(out, base + torch.tensor([[3.0, 2.5, 0.0], [2.0, -4.0, -5.0]]))


def test_task_arithmetic_lambda_and_negative_weight():
    base, models = tensors(2)
    st = stage("task_arithmetic", 2, {"lambda": 0.5}, [{"weight": 1.0}, {"weight": -0.5}])
    want = base + 0.5 * ((models[0] - base) - 0.5 * (models[1] - base))
    assert torch.allclose(merge_tensor(st, "w", models, base, 0.0), want, atol=1e-6)


def test_breadcrumbs_by_hand():
    base = torch.zeros(10)
    delta = torch.tensor([4.0, -1.0, 10.0, 2.0, -7.0, 3.0, 9.0, -5.0, 6.0, 8.0])
    st = stage("breadcrumbs", 1, {"gamma": 0.1}, [{"weight": 1.0, "density": 0.5}])
    out = merge_tensor(st, "w", delta[None], base, 0.0)
    # keep 5: drop the largest (10) and the 4 smallest (1, 2, 3, 4)
    want = torch.tensor([0.0, 0.0, 0.0, 0.0, -7.0, 0.0, 9.0, -5.0, 6.0, 8.0])
    assert torch.equal(out, want)


def test_linear_normalizes_and_uses_an_unlisted_base_as_input():
    base, models = tensors(2)
    st = stage("linear", 2, {"weight": 1.0}, [{"weight": 3.0}, {}], base=False)
    assert torch.allclose(merge_tensor(st, "w", models, None, 0), (3 * models[0] + models[1]) / 4)
    st = stage("linear", 2, {"normalize": False}, [{"weight": 0.5}, {"weight": 0.25}], base=False)
    assert torch.allclose(
        merge_tensor(st, "w", models, None, 0), 0.5 * models[0] + 0.25 * models[1]
    )
    st = stage("linear", 2, {"weight": 1.0})  # base_model not listed: mergekit appends it
    assert base_index(st) == 2
    want = (models[0] + models[1] + base) / 3
    assert torch.allclose(merge_tensor(st, "w", models, base, 0), want, atol=1e-6)


def test_slerp_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    st = stage("slerp", 1, {"t": 0.5})
    out = merge_tensor(st, "w", b[None], a, 0.0)
    assert torch.allclose(out, (a + b) / math.sqrt(2))
    st = stage("slerp", 1, {"t": 0.25})  # parallel: falls back to lerp
    out = merge_tensor(st, "w", (3 * a)[None], a, 0.0)
    assert torch.allclose(out, 0.75 * a + 0.25 * 3 * a)


def test_model_stock_ratio_from_cosine():
    base = torch.ones(4)
    models = torch.stack([base + torch.tensor([1.0, 1, 0, 0]), base + torch.tensor([1.0, 0, 1, 0])])
    # cos = 1/2, N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3 of the way to the average
    out = merge_tensor(stage("model_stock", 2), "w", models, base, 0.0)
    assert torch.allclose(out, base + (2 / 3) * torch.tensor([1.0, 0.5, 0.5, 0.0]))


def test_nearswap_by_hand():
    base, other = torch.tensor([0.0, 0.0]), torch.tensor([0.1, 1.0])
    out = merge_tensor(stage("nearswap", 1, {"t": 0.2}), "w", other[None], base, 0.0)
    # weight = clamp(t / |a - b|, 0, 1) = 1, 0.2
    assert torch.allclose(out, torch.tensor([0.1, 0.2]))


def test_passthrough_scale():
    x = torch.randn(3)
    st = stage("passthrough", 1, per_model=[{"scale": 2.0}], base=False)
    assert torch.equal(merge_tensor(st, "w", x[None], None, 0.0), x * 2)


def test_sce_weights_by_energy():
    base = torch.zeros(2)
    models = torch.tensor([[1.0, 1.0], [3.0, -2.0]])
    # energies (mean square) 1 and 6.5 -> weights 1/7.5, 6.5/7.5; column 2 sums to -1, electing
    # -, so model 0 is erased there and model 1 alone remains
    out = merge_tensor(stage("sce", 2), "w", models, base, 0.0)
    assert torch.allclose(out, torch.tensor([(1 + 3 * 6.5) / 7.5, -2.0]))


def test_sce_selection_keeps_ties_at_the_cut_from_the_highest_index():
    """select_topk 0.5 of 6 nonzero variances keeps 3: in a stable ascending sort of the
    variances (0.25, 1, 1, 1, 1, 4 at indices 5, 0, 1, 2, 3, 4) the last three, so of the four
    tied at the cut the two highest indices. The models disagree everywhere: the elected sign
    is + (the sum is 0), and model 0 alone remains where an entry is kept."""
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    out = merge_tensor(stage("sce", 2, {"select_topk": 0.5}), "w", torch.stack([a, -a]),
                       torch.zeros(6), 0.0)  # fmt: skip
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.0]))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_methods_keep_fraction_and_seed(name):
    base = torch.zeros(300, 300)
    delta = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))
    st = stage(name, 1, {"rescale": False}, [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}])
    out = merge_tensor(st, "w", delta[None], base, 0.0)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01
    assert torch.equal(out[out != 0], delta[out != 0])  # kept entries untouched
    assert torch.equal(out, merge_tensor(st, "w", delta[None], base, 0.0))
    assert not torch.equal(out, merge_tensor(st, "v", delta[None], base, 0.0))
    st.random_seed = 1
    assert not torch.equal(out, merge_tensor(st, "w", delta[None], base, 0.0))


def _draw_values(seed: int, name: str, row: int, n: int) -> torch.Tensor:
    from evomerge.merge.sparsify import draws

    planes = draws(seed, name, row, n, "cpu")
    return planes[0].long() * 256 + planes[1].long()  # 16-bit draws in 0..65535


def test_dare_keeps_draw_below_density_by_hand():
    base = torch.zeros(4, 50)
    delta = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    st = stage("dare_linear", 1, {"rescale": False}, [{"weight": 2.0, "density": 0.3}], seed=9)
    out = merge_tensor(st, "w", delta[None], base, 0.0)
    keep = _draw_values(9, "w", 0, 200) < math.ceil(0.3 * 65536)  # u = draw / 65536 < 0.3
    assert torch.equal(out, torch.where(keep.view(4, 50), delta, 0.0) * 2.0)


def test_della_keep_probability_grows_with_rank_by_hand():
    base = torch.zeros(3, 40)
    delta = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    params = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]
    st = stage("della_linear", 1, {"rescale": False}, params, seed=2)
    out = merge_tensor(st, "w", delta[None], base, 0.0)
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1, stable=True), dim=1).float()
    # p = density - eps + 2 eps * rank / (cols - 1), in float32 as the kernel computes it
    c1 = torch.tensor(2 * 0.2 / 39, dtype=torch.float32)
    c0 = torch.tensor(0.5 - 0.2, dtype=torch.float32)
    u = _draw_values(2, "w", 0, 120).float().view(3, 40) / 65536
    keep = u < ranks * c1 + c0
    assert torch.equal(out, torch.where(keep, delta, 0.0))
    assert keep[ranks >= 30].float().mean() > keep[ranks < 10].float().mean()


def test_dare_rescale_preserves_l1_norm():
    base = torch.zeros(1000)
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    st = stage("dare_linear", 1, {}, [{"weight": 1.0, "density": 0.5}])
    out = merge_tensor(st, "w", delta[None], base, 0.0)
    assert math.isclose(out.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    kept = out != 0
    assert torch.allclose(out[kept] / delta[kept], torch.full_like(out[kept], 1000 / kept.sum()),
                          rtol=0.1)  # one factor, about 1 / density  # fmt: skip


def test_gradient_and_filter_resolution():
    base, models = tensors(2)
    grad = stage(
        "linear", 2, {"normalize": False}, [{"weight": [0.0, 1.0]}, {"weight": 0.0}], False
    )
    out = merge_tensor(grad, "w", models, None, 0.25)
    assert torch.allclose(out, 0.25 * models[0])
    filt = [FilterEntry("mlp", 2.0), FilterEntry(None, 1.0)]
    st = stage("linear", 2, {"normalize": False, "weight": filt}, base=False)
    inp = build_inputs(st, "layers.0.mlp.up", models, None, 0.0)
    assert inp.model_params["weight"].tolist() == [2.0, 2.0]
    # a filter list with no match falls through to the top level
    st = stage("linear", 2, {"weight": 0.7}, [{"weight": [FilterEntry("attn", 3.0)]}, {}], False)
    inp = build_inputs(st, "layers.0.mlp.up", models, None, 0.0)
    assert inp.model_params["weight"].tolist() == [0.7, 0.7]
    ties = build_inputs(stage("ties", 2, {"weight": 1.0}), "w", models, base, 0.0)
    assert ties.params == {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}
    assert ties.model_params["density"].tolist() == [1.0, 1.0, 1.0]


def test_bad_input_raises_config_error():
    base, models = tensors(2)
    with pytest.raises(ConfigError, match="needs parameter 'weight'"):
        merge_tensor(stage("ties", 2), "w", models, base, 0.0)
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensor(stage("linear", 2, {"weight": 0.0}, base=False), "w", models, None, 0.0)
    with pytest.raises(ConfigError, match="density"):
        bad = stage("della", 2, {"weight": 1.0, "density": 0.9, "epsilon": 0.2})
        merge_tensor(bad, "w", models, base, 0.0)
    with pytest.raises(ConfigError, match="needs a base_model"):
        merge_tensor(stage("ties", 2, {"weight": 1.0}, base=False), "w", models, None, 0.0)
    with pytest.raises(ConfigError, match="must be in"):
        merge_tensor(stage("ties", 2, {"weight": 1, "density": 1.5}), "w", models, base, 0.0)
    with pytest.raises(ConfigError, match="exactly 2"):
        merge_tensor(stage("slerp", 2, {"t": 0.5}), "w", models, base, 0.0)


def test_listed_base_is_not_weighted_by_task_arithmetic():
    base, models = tensors(2)
    listed = stage("task_arithmetic", 2, {"weight": 1.0}, listed=True)
    rows = torch.cat([base[None], models])
    unlisted = stage("task_arithmetic", 2, {"weight": 1.0})
    assert torch.equal(
        merge_tensor(listed, "w", rows, base, 0.0), merge_tensor(unlisted, "w", models, base, 0.0)
    )
