"""`evomerge plan` places the merger's inputs: on the device when they fit beside the engine,
else in (pinned) host memory streamed per candidate in row chunks -- the device then holds the
chunk buffers of merge/memory.py's `memory_figures`, the function that sets the candidate
path's chunking -- and exit 2 with the numbers when even streaming does not fit. 7B-shaped
header-only checkpoints (tests/conftest.py `write_sparse_checkpoint`): no weight is read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_plan import EMBED, GIB, TASK, P, write_models

from evomerge.cli import main
from evomerge.merge.memory import ENV_CHUNK_BYTES, memory_figures

RESIDENT = 3 * P * 2  # base + two experts, bf16 rows


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return write_models(tmp_path_factory.mktemp("7b"))


def _space(tmp: Path, models: list[Path], method: str, extra: str = "") -> Path:
    base, a, b = models
    experts = f"[{a}]" if method == "slerp" else f"[{a}, {b}]"
    params = "parameters: {t: {low: 0.0, high: 1.0}}\n" if method == "slerp" else ""
    p = tmp / f"{method}.yaml"
    p.write_text(
        f"name: big\nbase_model: {base}\nmodels: {experts}\nmethod: {method}\n{params}"
        f"tasks: [{TASK}]\neval:\n  chunks: [2, 4]\n{extra}"
    )
    return p


def _plan(space: Path, gpu: str, backend: str, capsys) -> tuple[int, str, str]:
    args = ["plan", str(space), "--device", "cuda:0", "--gpu-memory", gpu, "--backend", backend]
    code = main([*args, "--no-tasks"])
    out, err = capsys.readouterr()
    return code, out, err


def _row(label: str, n: int) -> str:
    return f"{label:<44} {n:>16,d} B"


def test_vllm_placement_follows_the_gpu_memory(tmp_path, models, capsys):
    space = _space(tmp_path, models, "linear")
    chunks = memory_figures("linear", 3, 2).peak_bytes(EMBED)
    on_device = chunks + EMBED * 4  # + the whole float32 tensor handed to vLLM
    code, out, _ = _plan(space, "80GiB", "vllm", capsys)  # everything fits on the device
    assert code == 0 and "inputs placement: device" in out
    assert _row("resident inputs (3 x bfloat16)", RESIDENT) in out and "host:" not in out
    code, out, _ = _plan(space, "30GiB", "vllm", capsys)  # inputs 37.65 GiB: streamed
    assert code == 0 and "inputs placement: host (pinned host memory" in out
    assert _row("host: resident inputs (3 x bfloat16)", RESIDENT) in out
    assert _row("merge buffers (linear row chunks)", chunks) in out
    budget = 30 * GIB
    util = math.floor(100 * (budget - on_device - 2 * GIB) / budget) / 100
    assert f"gpu_memory_utilization {util:.2f} (from what is left)" in out
    code, out, err = _plan(space, "14GiB", "vllm", capsys)  # weights 12.55 GiB + KV: no fit
    assert code == 2 and out == "" and "Traceback" not in err
    assert "does not fit on cuda:0" in err and "14.00 GiB (--gpu-memory)" in err
    assert (
        f"needs {on_device / GIB:.2f} GiB for the merger with its inputs in host memory "
        f"({RESIDENT / GIB:.2f} GiB there)"
    ) in err


def test_hf_placement(tmp_path, models, capsys):
    space = _space(tmp_path, models, "ties")
    code, out, _ = _plan(space, "200GiB", "hf", capsys)  # inputs + mask statistics fit
    assert code == 0 and "inputs placement: device" in out
    assert _row("mask statistics (order, 2 rows)", 2 * P * 4) in out
    code, out, _ = _plan(space, "40GiB", "hf", capsys)
    assert code == 0 and "inputs placement: host" in out and "mask statistics" not in out
    chunks = memory_figures("ties", 3, 2).peak_bytes(EMBED)
    assert _row("total on the device", chunks + P * 2) in out  # + the engine's bf16 weights


def test_placement_can_be_forced(tmp_path, models, capsys):
    space = _space(tmp_path, models, "linear", "  inputs: device\n")
    code, _, err = _plan(space, "30GiB", "vllm", capsys)
    assert code == 2 and "keep the inputs in host memory (eval.inputs: host)" in err
    space = _space(tmp_path, models, "linear", "  inputs: host\n")
    code, out, _ = _plan(space, "80GiB", "vllm", capsys)
    assert code == 0 and "inputs placement: host" in out
    space = _space(tmp_path, models, "linear", "  inputs: hots\n")
    code, _, err = _plan(space, "80GiB", "vllm", capsys)
    assert code == 2 and "eval.inputs: unknown placement 'hots'. Did you mean 'host'?" in err


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "della", "slerp",
                                    "model_stock", "sce", "karcher"])  # fmt: skip
def test_merge_buffers_are_memory_figures(tmp_path, models, capsys, monkeypatch, method):
    space = _space(tmp_path, models, method)
    n = 2 if method == "slerp" else 3
    for chunk in (None, 1 << 20):  # the figure follows the chunking it describes
        if chunk is not None:
            monkeypatch.setenv(ENV_CHUNK_BYTES, str(chunk))
        code = main(["plan", str(space), "--device", "cpu", "--gpu-memory", "1TiB", "--no-tasks"])
        out = capsys.readouterr().out
        figure = memory_figures(method, n, 2).peak_bytes(EMBED)
        assert code == 0 and _row(f"merge buffers ({method} row chunks)", figure) in out
