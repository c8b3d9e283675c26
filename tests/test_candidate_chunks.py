"""CandidateMerger's row-chunk pipeline: methods outside the fused kernels (and every method
with host-placed inputs) merge in the disk path's row chunks (chunked.merge_chunked, with
memory.rows_per_chunk rows), bit-identical to the whole-tensor merge."""

from __future__ import annotations

import pytest
import torch
from test_candidate import LAYERS, NAMES, Source, _disk, _shape, _stage, make_sources

from evomerge.merge import chunked
from evomerge.merge.candidate import CandidateMerger
from evomerge.merge.memory import ENV_CHUNK_BYTES, rows_per_chunk
from evomerge.merge.table import get_method
from evomerge.recipe import InputModel, MergeStage, ModelRef

CHUNK_BYTES = 5 * 16 * 4  # 5 rows of a (24, 16) float32 tensor: 5 chunks, the last short


@pytest.fixture(scope="module")
def sources() -> dict[str, Source]:
    return make_sources()


CASES = [
    ("slerp", {"t": [0.0, 1.0]}, None, 1),
    ("nuslerp", {"weight": [0.3, 0.9]}, None, 2),
    ("multislerp", {"weight": 0.5}, None, 3),
    ("karcher", {}, None, 3),
    ("model_stock", {"filter_wise": True}, None, 3),
    ("sce", {"select_topk": 0.4}, None, 3),
    ("nearswap", {"t": 0.05}, None, 1),
    ("ties", {"weight": [0.2, 1.0]}, [{"density": 0.3}, {"density": [0.9, 0.2]}, {}], 3),
    ("dare_ties", {"weight": 0.5, "density": 0.4}, None, 3),
    ("della", {"weight": 0.5, "density": 0.5, "epsilon": 0.2}, None, 3),
    ("linear", {"weight": [1.0, 0.1]}, None, 3),
]


@pytest.fixture
def spy(monkeypatch):
    """(tensor name, rows per chunk) of every chunked merge the candidate path runs."""
    calls: list[tuple[str, int]] = []
    real = chunked.merge_chunked

    def record(stage, name, shape, t, read, write, arena, step, kernels):
        calls.append((name, step))
        return real(stage, name, shape, t, read, write, arena, step, kernels)

    monkeypatch.setattr(chunked, "merge_chunked", record)
    monkeypatch.setenv(ENV_CHUNK_BYTES, str(CHUNK_BYTES))
    return calls


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize(("method", "params", "per_model", "n"), CASES)
def test_chunked_candidate_equals_whole_tensor_merge(
    sources, spy, method, params, per_model, n, placement
):
    st = _stage(method, params, per_model, n)
    merger = CandidateMerger(st, sources, num_layers=LAYERS, placement=placement)
    want = _disk(st, sources)  # whole tensors (_disk calls merge_tensor, never chunks)
    for how in ("merged", "apply"):
        spy.clear()
        if how == "merged":
            got = {name: x.clone() for name, x in merger.merged(st)}
        else:
            got = {name: torch.full(_shape(name), float("nan")) for name in NAMES}
            merger.apply(st, got)
        for name in NAMES:
            assert torch.equal(got[name], want[name]), (method, placement, how, name)
        fused = get_method(method).fused  # ties, dare_ties, della, linear, sce
        chunked_names = [x for x in NAMES if len(_shape(x)) == 2]
        if fused and placement == "device":  # the compiled path, as before: no chunks
            assert spy == []
        else:
            step = rows_per_chunk((24, 16))
            assert step == 5 and spy == [(x, step) for x in chunked_names]
            assert all(merger.chunk_rows(method, x) == step for x in chunked_names)


def test_passthrough_streams_from_host(sources, spy):
    st = MergeStage("passthrough", models=[InputModel(ModelRef("m1"), {"scale": 0.5})])
    merger = CandidateMerger(st, sources, num_layers=LAYERS, placement="host")
    got = {name: x.clone() for name, x in merger.merged(st)}
    for name in NAMES:
        assert torch.equal(got[name], sources["m1"].get_tensor(name) * 0.5)
    assert len(spy) == len([x for x in NAMES if len(_shape(x)) == 2])


def test_bad_placement(sources):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'host'"):
        CandidateMerger(_stage("linear", {"weight": 1.0}), sources, num_layers=LAYERS,
                        placement="hots")  # fmt: skip
