"""`evomerge plan`: models, genome and memory plan from configs and safetensors headers only.

The models are 7B-shaped Llama checkpoints that hold no weights: config.json and a safetensors
file whose header lists every tensor, truncated to its full size (a sparse file). The expected
byte counts are computed here from the shapes, as the module docstring of loop/memory.py
states them; the plan must not read the weights (peak RSS far below one model's size).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import write_sparse_checkpoint

from evomerge.cli import main
from evomerge.merge.memory import memory_figures

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "evals" / "zoo_add.yaml"
GIB = 1 << 30


def llama_shapes(hidden: int, layers: int, vocab: int, inter: int) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = [hidden, hidden]
        shapes[f"{p}mlp.gate_proj.weight"] = [inter, hidden]
        shapes[f"{p}mlp.up_proj.weight"] = [inter, hidden]
        shapes[f"{p}mlp.down_proj.weight"] = [hidden, inter]
        shapes[f"{p}input_layernorm.weight"] = [hidden]
        shapes[f"{p}post_attention_layernorm.weight"] = [hidden]
    shapes["model.norm.weight"] = [hidden]
    shapes["lm_head.weight"] = [vocab, hidden]
    return shapes


def write_models(
    tmp: Path, hidden=4096, layers=32, vocab=32000, inter=11008, shard_bytes: int | None = None
) -> list[Path]:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": vocab, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }  # fmt: skip
    shapes = llama_shapes(hidden, layers, vocab, inter)
    out = [tmp / name for name in ("base", "expert_a", "expert_b")]
    for folder in out:
        write_sparse_checkpoint(folder, shapes, cfg, shard_bytes)
    return out


def _space(tmp: Path, method: str, extra: str = "", shard_bytes: int | None = None) -> Path:
    base, a, b = write_models(tmp, shard_bytes=shard_bytes)
    p = tmp / f"{method}.yaml"
    p.write_text(
        f"name: big\nbase_model: {base}\nmodels: [{a}, {b}]\nmethod: {method}\n"
        f"tasks: [{TASK}]\neval:\n  chunks: [2, 4]\n{extra}"
    )
    return p


P = 6_738_415_616  # Llama-2-7B's parameter count (the shapes above)
EMBED = 32000 * 4096  # the largest tensor


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """`evomerge ARGS` in a child; its peak RSS (KiB) is printed last on stdout."""
    code = (
        "import resource, sys\nfrom evomerge.cli import main\nrc = main(sys.argv[1:])\n"
        "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
        timeout=120,
    )  # fmt: skip


def test_plan_7b_vllm_cuda_without_weights(tmp_path) -> None:
    space = _space(tmp_path, "linear")
    assert (tmp_path / "base" / "model.safetensors").stat().st_size > 13 * 10**9
    args = ["plan", str(space), "--device", "cuda:0", "--gpu-memory", "80GiB"]
    r = _run([*args, "--backend", "vllm", "--no-tasks"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"LlamaForCausalLM, {P:,d} parameters, bfloat16" in out
    resident = 3 * P * 2  # base + two experts, bf16 rows
    chunks = memory_figures("linear", 3, 2).peak_bytes(EMBED)  # the candidate's row chunks
    buffers = chunks + EMBED * 4  # + the whole float32 tensor handed to vLLM
    engine = P * 2  # vLLM "auto": the checkpoint's bf16
    assert "resident inputs (3 x bfloat16)" in out and f"{resident:,d} B" in out
    assert f"{'merge buffers (linear row chunks)':<44} {chunks:>16,d} B" in out
    assert "inputs placement: device" in out and "engine weights (bfloat16)" in out
    assert f"{engine:,d} B" in out
    budget = 80 * GIB
    util = math.floor(100 * (budget - resident - buffers - 2 * GIB) / budget) / 100
    assert f"gpu_memory_utilization {util:.2f} (from what is left)" in out
    assert "searching 2 dimensions of linear" in out  # the genome: one weight per model
    planned = float(re.search(r"planned in ([0-9.]+) s", r.stderr).group(1))
    assert planned < 1.0
    rss_kib = int(out.rsplit("maxrss", 1)[1])
    assert rss_kib * 1024 < P * 2 / 10  # far below one model's 13.5 GB: no weight was read


def test_plan_of_sharded_checkpoints_counts_every_shard(tmp_path, capsys) -> None:
    """Hub releases of 7B models come in 5 GB shards with an index: the plan reads the tensors
    of every shard and gives the same figures as for one file."""
    outs = []
    for shard_bytes in (None, 5 * 10**9):
        space = _space(tmp_path / str(shard_bytes), "linear", shard_bytes=shard_bytes)
        args = ["plan", str(space), "--device", "cuda", "--gpu-memory", "80GiB", "--no-tasks"]
        assert main([*args, "--backend", "vllm"]) == 0
        outs.append(capsys.readouterr().out.replace(str(tmp_path / str(shard_bytes)), "<tmp>"))
    shards = sorted(p.name for p in (tmp_path / str(5 * 10**9) / "base").glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert f"LlamaForCausalLM, {P:,d} parameters, bfloat16" in outs[1]
    assert f"{3 * P * 2:,d} B" in outs[1]  # resident inputs: every shard's tensors
    assert outs[0] == outs[1]


def test_plan_that_cannot_fit_exits_2_with_numbers(tmp_path) -> None:
    space = _space(tmp_path, "ties", "  inputs: device\n")  # host placement would fit
    r = _run(["plan", str(space), "--device", "cuda", "--gpu-memory", "80GiB", "--backend",
              "vllm", "--no-tasks"])  # fmt: skip
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr
    masks = 2 * P * 4  # TIES: int32 magnitude order per expert entry
    merger = 3 * P * 2 + masks + memory_figures("ties", 3, 2).peak_bytes(EMBED) + EMBED * 4
    assert "does not fit on cuda" in err[0]
    assert f"{merger / GIB:.2f} GiB for the merger" in err[0]
    assert f"mask statistics (order, 2 rows) {masks / GIB:.2f} GiB" in err[0]
    assert "80.00 GiB" in err[0]


def test_user_utilization_is_kept(tmp_path, capsys) -> None:
    space = _space(tmp_path, "linear", "  vllm: {gpu_memory_utilization: 0.4}\n")
    args = ["plan", str(space), "--device", "cuda", "--gpu-memory", "141GB", "--backend", "vllm"]
    assert main([*args, "--no-tasks"]) == 0
    assert "gpu_memory_utilization 0.40 (set in eval.vllm)" in capsys.readouterr().out


def test_plan_documents_and_trial_times(tmp_path, capsys) -> None:
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    from evomerge.eval.tasks import load_tasks

    space = _space(tmp_path, "linear")
    results = tmp_path / "results"
    (results / "big").mkdir(parents=True)
    study = optuna.create_study(study_name="big", storage=f"sqlite:///{results}/big/study.db")
    t0 = datetime(2026, 1, 1)
    for k, secs in enumerate([3.0, 5.0, 10.0]):
        study.add_trial(
            FrozenTrial(
                number=k, state=TrialState.COMPLETE, value=0.5, datetime_start=t0,
                datetime_complete=t0 + timedelta(seconds=secs), params={}, distributions={},
                user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=k,
            )
        )  # fmt: skip
    code = main(["plan", str(space), "--gpu-memory", "200GiB", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0
    search = len(load_tasks([str(TASK)])[0].doc_ids("search"))
    assert f"documents per chunk (1 tasks, search split): 2: {min(2, search)}, 4: " in out
    assert "time per trial (study big): complete 3 x median 5.00 s" in out


def test_plan_bad_gpu_memory_exit_2(tmp_path, capsys) -> None:
    space = _space(tmp_path, "linear")
    assert main(["plan", str(space), "--gpu-memory", "lots"]) == 2
    assert "expected a size such as 80GiB" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu"])
def test_plan_on_cpu_counts_host_memory(tmp_path, capsys, device) -> None:
    space = _space(tmp_path, "linear")
    code = main(["plan", str(space), "--device", device, "--gpu-memory", "1TiB", "--no-tasks"])
    out = capsys.readouterr().out
    assert code == 0
    assert "engine weights (float32)" in out and f"{P * 4:,d} B" in out  # fp32 on CPU
