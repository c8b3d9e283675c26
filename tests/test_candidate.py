"""CandidateMerger: in-place candidates equal the disk path (resolve.merge_tensor) bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import needs_compiler

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.arch import gradient_t
from evomerge.merge.candidate import CandidateMerger
from evomerge.merge.resolve import merge_tensor
from evomerge.recipe import FilterEntry, InputModel, MergeStage, ModelRef

LAYERS = 3
NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)),
    *(f"model.layers.{i}.input_layernorm.weight" for i in range(LAYERS)),
    "lm_head.weight",
]


class Source:
    """What the engine's CheckpointReader offers: keys() and get_tensor(name)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t = tensors

    def keys(self):
        return self._t.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._t[name]


def _shape(name: str) -> tuple[int, ...]:
    return (16,) if "norm" in name else (24, 16)


def make_sources() -> dict[str, Source]:
    """A base and three models near it (also test_candidate_chunks' inputs)."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(_shape(n), generator=g) for n in NAMES}
    out = {"base": Source(base)}
    for i in range(3):
        out[f"m{i}"] = Source(
            {n: x + 0.1 * torch.randn(x.shape, generator=g) for n, x in base.items()}
        )
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, Source]:
    return make_sources()


def _stage(method: str, params: dict, per_model: list[dict] | None = None, n: int = 3):
    per_model = per_model or [{}] * n
    models = [InputModel(ModelRef(f"m{i}"), per_model[i]) for i in range(n)]
    return MergeStage(method, models=models, base_model=ModelRef("base"), parameters=params,
                      random_seed=11)  # fmt: skip


def _disk(stage: MergeStage, sources) -> dict[str, torch.Tensor]:
    out = {}
    for name in NAMES:
        models = torch.stack([sources[str(m.model)].get_tensor(name) for m in stage.models])
        base = sources["base"].get_tensor(name)
        out[name] = merge_tensor(stage, name, models, base, gradient_t(name, LAYERS))
    return out


CASES = [
    ("ties", {"weight": [0.2, 1.0]}, [{"density": 0.3}, {"density": [0.9, 0.2]}, {}]),
    ("dare_ties", {"weight": 0.5, "density": 0.4}, None),
    ("della", {"weight": 0.5, "density": 0.5, "epsilon": 0.2}, None),
    ("breadcrumbs", {"weight": 0.7, "density": 0.6, "gamma": 0.05}, None),
    ("linear", {"weight": [1.0, 0.1]}, None),
    ("task_arithmetic", {"weight": 0.4, "lambda": 1.3}, None),
    ("model_stock", {}, None),
    ("dare_linear", {"weight": 1.0, "density": 0.2}, None),
]


@pytest.mark.parametrize(("method", "params", "per_model"), CASES)
def test_candidate_equals_disk_path(sources, method, params, per_model):
    merger = CandidateMerger(_stage(method, params, per_model), sources, num_layers=LAYERS)
    for scale in (1.0, 0.5):  # a second candidate reuses the caches and buffers
        p = {
            k: (v * scale if isinstance(v, float) and k != "epsilon" else v)
            for k, v in params.items()
        }
        st = _stage(method, p, per_model)
        want = _disk(st, sources)
        got = {name: x.clone() for name, x in merger.merged(st)}
        assert list(got) == NAMES
        for name in NAMES:
            assert torch.equal(got[name], want[name]), (method, name)


@pytest.fixture(scope="module")
def bf16_sources(sources) -> dict[str, Source]:
    return {
        k: Source({n: s.get_tensor(n).to(torch.bfloat16) for n in NAMES})
        for k, s in sources.items()
    }


@pytest.mark.parametrize(("method", "params", "per_model"), CASES)
def test_bf16_sources_stay_bf16_and_equal_the_disk_path(bf16_sources, method, params, per_model):
    st = _stage(method, params, per_model)
    merger = CandidateMerger(st, bf16_sources, num_layers=LAYERS)
    entries = sum(math.prod(_shape(n)) for n in NAMES)
    assert merger.nbytes() == 4 * 2 * entries  # 4 inputs resident in bfloat16, nothing else yet
    want = _disk(st, bf16_sources)  # the disk path reads bf16 into float32 buffers
    target = {n: torch.empty(_shape(n)) for n in NAMES}
    merger.apply(st, target)
    for name in NAMES:
        assert torch.equal(target[name], want[name]), (method, name)


@needs_compiler()  # skipped without a compiler, failed under CI
@pytest.mark.parametrize("method", ["ties", "della"])
def test_compiled_candidate_equals_disk_path(bf16_sources, method):
    params = {"weight": 0.6, "density": 0.4, "epsilon": 0.1}
    st = _stage(method, params)
    merger = CandidateMerger(st, bf16_sources, num_layers=LAYERS, compiled=True)
    want = _disk(st, bf16_sources)
    target = {n: torch.empty(_shape(n)) for n in NAMES}
    merger.apply(st, target)
    for name in NAMES:
        assert torch.equal(target[name], want[name]), (method, name)


def test_slerp_candidate_and_apply_into_bf16_target(sources):
    st = _stage("slerp", {"t": [0.0, 1.0]}, n=1)
    merger = CandidateMerger(st, sources, num_layers=LAYERS)
    want = _disk(st, sources)
    target = {n: torch.zeros(_shape(n), dtype=torch.bfloat16) for n in NAMES}
    merger.apply(st, target)
    for name in NAMES:
        assert torch.equal(target[name], want[name].to(torch.bfloat16))
    # t = 0 at layer 0 (the base), t = 1 at the last layer (the model)
    base, m0 = sources["base"].get_tensor, sources["m0"].get_tensor
    assert torch.allclose(
        want["model.layers.0.mlp.up_proj.weight"], base("model.layers.0.mlp.up_proj.weight")
    )
    last = f"model.layers.{LAYERS - 1}.mlp.up_proj.weight"
    assert torch.allclose(want[last], m0(last), atol=1e-6)


def test_method_can_change_between_candidates(sources):
    merger = CandidateMerger(
        _stage("ties", {"weight": 1.0, "density": 0.5}), sources, num_layers=LAYERS
    )
    for method, params in [
        ("linear", {"weight": 1.0}),
        ("dare_ties", {"weight": 1.0, "density": 0.3}),
    ]:
        st = _stage(method, params)
        want = _disk(st, sources)
        for name, x in merger.merged(st):
            assert torch.equal(x, want[name])


def test_draws_do_not_depend_on_tensor_order(sources):
    st = _stage("dare_linear", {"weight": 1.0, "density": 0.3})
    fwd = CandidateMerger(st, sources, num_layers=LAYERS, tensor_names=NAMES)
    rev = CandidateMerger(st, sources, num_layers=LAYERS, tensor_names=NAMES[::-1])
    a = {n: x.clone() for n, x in fwd.merged(st)}
    b = {n: x.clone() for n, x in rev.merged(st)}
    assert all(torch.equal(a[n], b[n]) for n in NAMES)


def test_bad_inputs(sources):
    st = _stage("ties", {"weight": 1.0})
    merger = CandidateMerger(st, sources, num_layers=LAYERS)
    with pytest.raises(ConfigError, match="same models"):
        list(merger.merged(_stage("ties", {"weight": 1.0}, n=2)))
    typo = MergeStage("ties", models=[InputModel(ModelRef("m11"))], base_model=ModelRef("base"))
    with pytest.raises(ConfigError, match="Did you mean 'm1'"):
        CandidateMerger(typo, sources, num_layers=LAYERS)
    with pytest.raises(MergeError, match="no parameter"):
        merger.apply(st, {})
    assert merger.nbytes() > 0


def test_dare_norm_from_the_histogram_equals_the_pass(sources, monkeypatch):
    """Candidates read DARE's kept norm from a cached histogram (large tensors only)."""
    import evomerge.merge.gta as gta

    monkeypatch.setattr(gta, "DARE_HISTOGRAM_MIN", 0)
    for density in (0.2, 0.7, 0.7):  # the last one reuses the memoized factor
        st = _stage("dare_ties", {"weight": 0.6, "density": density})
        merger = CandidateMerger(st, sources, num_layers=LAYERS)
        want = _disk(st, sources)
        for name, x in merger.merged(st):
            assert torch.equal(x, want[name]), name
        assert any(k[0] == "dare_l1" for k in merger.cache._store)


class CountingKernels:
    """Wraps a merger's Kernels, counting the fused kernel calls and the entries they cover."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.compiled = inner.compiled

    def linear(self, spec, out, x, p):
        self.calls.append(out.numel())
        self.inner.linear(spec, out, x, p)

    def gta(self, spec, out, x, stats, p, firsts):
        self.calls.append(out.numel())
        self.inner.gta(spec, out, x, stats, p, firsts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


RUN_CASES = [  # (method, params, kernel calls into a packed target)
    ("linear", {"weight": 0.3}, 1),  # scalars: the whole model in one call
    ("task_arithmetic", {"weight": 0.4, "lambda": 1.3}, 1),
    # a gradient: t = 0 for the embedding and layer 0 (one run), then each tensor apart
    # (up_proj 1, 2; norms 0, 1, 2 -- norm 0 is not next to up_proj 0; lm_head at t = 0)
    ("linear", {"weight": [1.0, 0.1]}, 7),
    ("ties", {"weight": 0.5, "density": 0.5}, len(NAMES)),  # per-tensor cuts: no runs
]


@pytest.mark.parametrize(("method", "params", "calls"), RUN_CASES)
def test_packed_target_merges_runs_in_one_call(sources, method, params, calls):
    st = _stage(method, params)
    want = _disk(st, sources)
    for packed, expected in ((True, calls), (False, len(NAMES))):
        merger = CandidateMerger(st, sources, num_layers=LAYERS)
        merger.kernels = counting = CountingKernels(merger.kernels)
        target = merger.packed_target() if packed else {n: torch.empty(_shape(n)) for n in NAMES}
        for _ in range(2):  # the second candidate reuses every buffer
            counting.calls.clear()
            merger.apply(st, target)
            assert len(counting.calls) == expected, (method, packed)
            assert sum(counting.calls) == sum(math.prod(_shape(n)) for n in NAMES)
            for name in NAMES:
                assert torch.equal(target[name], want[name]), (method, packed, name)


def test_runs_stop_at_a_target_gap_and_at_a_parameter_change(sources):
    st = _stage("linear", {"weight": 0.3})
    merger = CandidateMerger(st, sources, num_layers=LAYERS)
    merger.kernels = counting = CountingKernels(merger.kernels)
    target = merger.packed_target()
    target[NAMES[3]] = target[NAMES[3]].clone()  # no longer inside the buffer
    merger.apply(st, target)
    assert len(counting.calls) == 3  # before it, itself, after it
    want = _disk(st, sources)
    assert all(torch.equal(target[n], want[n]) for n in NAMES)
    by_filter = [FilterEntry("norm", 0.9), FilterEntry(None, 0.3)]
    filtered = _stage("linear", {"weight": 0.3}, [{"weight": by_filter}, {}, {}])
    counting.calls.clear()
    target = merger.packed_target()
    merger.apply(filtered, target)
    assert len(counting.calls) == 3  # embed + up_proj, the norms, lm_head
    want = _disk(filtered, sources)
    assert all(torch.equal(target[n], want[n]) for n in NAMES)


def _merges_in_one_call(sources, compiled: bool | None = None) -> None:
    """A scalar linear stage into a packed target: one kernel call, the disk path's values."""
    st = _stage("linear", {"weight": 0.3})
    merger = CandidateMerger(st, sources, num_layers=LAYERS, compiled=compiled)
    merger.kernels = counting = CountingKernels(merger.kernels)
    target = merger.packed_target()
    merger.apply(st, target)
    assert len(counting.calls) == 1
    want = _disk(st, sources)
    assert all(torch.equal(target[n], want[n]) for n in NAMES)


@needs_compiler()  # skipped without a compiler, failed under CI
def test_compiled_run_over_bf16_inputs_equals_disk_path(bf16_sources):
    _merges_in_one_call(bf16_sources, compiled=True)


def test_linear_weights_summing_to_zero_name_a_tensor_in_a_run(sources):
    st = _stage("linear", {"weight": 0.0})
    merger = CandidateMerger(st, sources, num_layers=LAYERS)
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight': linear weights sum to 0"):
        merger.apply(st, merger.packed_target())


def test_a_run_merged_outside_the_target_is_copied_in(sources, monkeypatch):
    from dataclasses import replace

    from evomerge.merge import methods

    linear = methods.linear
    # merges into a scratch buffer: the table resolves "methods:linear" at each call
    monkeypatch.setattr(methods, "linear", lambda inputs: linear(replace(inputs, out=None)))
    _merges_in_one_call(sources)


def test_kernel_threads_fixed_or_measured(sources):
    st = _stage("linear", {"weight": 0.3})
    assert CandidateMerger(st, sources, num_layers=LAYERS, threads=1).kernel_threads("linear") == 1
    merger = CandidateMerger(st, sources, num_layers=LAYERS)
    target = merger.packed_target()
    merger.apply(st, target)
    expected = 1 if merger._choice.most == 1 else None  # nothing timed yet: the warm-up
    assert merger.kernel_threads("linear") == expected
    for _ in range(4):  # each count timed twice
        merger.apply(st, target)
    assert merger.kernel_threads("linear") in (1, merger._choice.most)
