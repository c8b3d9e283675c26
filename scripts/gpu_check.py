"""The checks of scripts/gpu_check.sh (see there). Subcommands:

    python scripts/gpu_check.py deps            # distributions the GPU path imports (one a line)
    python scripts/gpu_check.py run OUT_DIR     # the CUDA checks; a table into OUT_DIR

`run` needs the zoo (zoo/, built by `evomerge zoo` when absent) and one CUDA device:
(a) `evomerge merge` of recipes over the zoo on cuda against cpu: every tensor within the
    float32 tolerance (DARE/DELLA draws come from numpy, keyed by seed: device-independent);
(b) the hf-backend search on the zoo with the same trials on cpu and cuda (QMC, fixed seed,
    the enqueued baselines): every stored trial value compared;
(c) one in-place candidate of a ~1.1B-parameter Llama (TinyLlama's shapes, random bf16
    weights built from a config) on cuda: the first candidate (mask statistics, compiling)
    and the median of the next ones.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp")
# what evomerge's GPU path imports (the search, the hf backend, lm-eval tasks, study storage)
GPU_PATH = (
    "from evomerge.eval.tasks import load_tasks\n"
    "load_tasks(['evals/zoo_add.yaml'])\n"
    "import evomerge.loop.run, evomerge.eval.hf.backend, evomerge.search.samplers\n"
    "import optuna.storages, sqlalchemy, alembic, cmaes, colorlog, mako\n"
)


def deps() -> None:
    """Distributions of every module the GPU path imports (the caller drops the ones the GPU
    image has): measured by importing it here, not guessed."""
    import importlib.metadata as md

    exec(compile(GPU_PATH, "<gpu path>", "exec"), {})
    owners = md.packages_distributions()
    names = {d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
    # pinned to the versions the tests ran with here
    print("\n".join(f"{n}=={md.version(n)}" for n in sorted(names) if n.lower() != "evomerge"))


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, **kw)


def recipe(method: str) -> str:
    models = ["zoo/add", "zoo/rev", "zoo/cap"]
    if method == "slerp":
        return ("merge_method: slerp\nbase_model: zoo/base\nmodels:\n  - model: zoo/base\n"
                "  - model: zoo/add\nparameters: {t: 0.4}\ndtype: float32\n")  # fmt: skip
    lines = [f"merge_method: {method}", "base_model: zoo/base", "models:"]
    for k, m in enumerate(models):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {0.5 + 0.2 * k}, density: 0.6}}"]
    if method == "linear":
        lines = [x for x in lines if "density" not in x] + ["parameters: {normalize: true}"]
        lines = [x.replace(", density: 0.6", "") for x in lines]
    return "\n".join([*lines, "dtype: float32", "random_seed: 7"]) + "\n"


def check_merge(tmp: Path) -> list[tuple[str, str, str]]:
    from safetensors.torch import load_file

    rows = []
    for m in METHODS:
        (tmp / f"{m}.yaml").write_text(recipe(m))
        out = {}
        for dev in ("cpu", "cuda"):
            sh([sys.executable, "-m", "evomerge", "merge", str(tmp / f"{m}.yaml"),
                str(tmp / f"{m}-{dev}"), "--device", dev, "--no-progress"])  # fmt: skip
            out[dev] = load_file(str(tmp / f"{m}-{dev}" / "model.safetensors"))
        diff = max(float((out["cpu"][k] - out["cuda"][k]).abs().max()) for k in out["cpu"])
        rows.append(
            (f"merge {m}", f"max |cuda - cpu| {diff:.2e}", "ok" if diff <= 1e-5 else "FAIL")
        )
    return rows


def trial_values(results: Path) -> dict[int, list[float] | None]:
    import optuna

    study = optuna.load_study(
        study_name="gpucheck", storage=f"sqlite:///{results}/gpucheck/study.db"
    )
    return {t.number: t.values for t in study.trials}


def check_search(tmp: Path) -> list[tuple[str, str, str]]:
    values = {}
    for dev in ("cpu", "cuda"):
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "evomerge", "search", "search_spaces/zoo_demo.yaml",
            "--study", "gpucheck", "--n-trials", "8", "--sampler", "qmc", "--seed", "0",
            "--device", dev, "--no-prune", "--results", str(tmp / dev)])  # fmt: skip
        values[dev] = (trial_values(tmp / dev), time.perf_counter() - t0)
    (cpu, t_cpu), (gpu, t_gpu) = values["cpu"], values["cuda"]
    same = sum(cpu[k] == gpu.get(k) for k in cpu)
    ok = "ok" if same == len(cpu) and len(cpu) == len(gpu) else "FAIL"
    return [("hf search, same trials", f"{same}/{len(cpu)} values equal; "
             f"cpu {t_cpu:.0f} s, cuda {t_gpu:.0f} s", ok)]  # fmt: skip


def big_models(tmp: Path) -> list[Path]:
    """Base + 2 experts of TinyLlama-1.1B's shapes, random bf16 weights (experts: base +
    small noise), written as safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        state = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    out = []
    for k, name in enumerate(("base", "e1", "e2")):
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        noisy = {
            n: (t + 0.01 * k * torch.randn_like(t)).contiguous().cpu() for n, t in state.items()
        }
        save_file(noisy, str(d / "model.safetensors"))
        out.append(d)
    return out


def candidate_recipe(method: str, base: Path, e1: Path, e2: Path) -> str:
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {e1}\n" \
            "parameters: {t: 0.3}\n"  # fmt: skip
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {e1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {e2}\n    parameters: {{weight: 0.4, density: 0.5}}\n")  # fmt: skip
    return text.replace(", density: 0.5", "") if method == "task_arithmetic" else text


def check_candidate(tmp: Path) -> list[tuple[str, str, str]]:
    """In-place candidates of a ~1.1B model with inputs resident on the GPU ("device") and
    streamed from pinned host memory in row chunks ("host", what the memory plan picks when
    they do not fit beside the engine): time per candidate, and host == device."""
    import torch
    import yaml

    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint
    from evomerge.recipe import parse_recipe, stage_models

    base, e1, e2 = big_models(tmp)
    rows = []
    for method in ("task_arithmetic", "ties", "slerp"):
        stage = parse_recipe(yaml.safe_load(candidate_recipe(method, base, e1, e2))).final
        readers = {str(r): open_checkpoint(r) for r in stage_models(stage)}
        merged = {}
        for placement in ("device", "host"):
            merger = CandidateMerger(
                stage, readers, num_layers=22, device="cuda", placement=placement
            )
            target = merger.packed_target()
            times = []
            for _ in range(4):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                merger.apply(stage, target)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            n = sum(t.numel() for t in target.values())
            merged[placement] = {k: v.cpu() for k, v in target.items()}
            rows.append((f"candidate {method} {placement} ({n / 1e9:.2f}B)",
                         f"first {times[0]:.3f} s, then median "
                         f"{statistics.median(times[1:]):.3f} s; "
                         f"resident {merger.nbytes() / 2**30:.1f} GiB", "ok"))  # fmt: skip
            del merger, target
            torch.cuda.empty_cache()
        diff = max(
            float((merged["device"][k] - merged["host"][k]).abs().max()) for k in merged["device"]
        )
        rows.append((f"candidate {method} host vs device", f"max |diff| {diff:.2e}",
                     "ok" if diff <= 1e-5 else "FAIL"))  # fmt: skip
    return rows


def run(out_dir: Path) -> int:
    import tempfile

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    if not (REPO / "zoo" / "zoo.json").is_file():
        sh([sys.executable, "-m", "evomerge", "zoo"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("device", torch.cuda.get_device_name(0), f"torch {torch.__version__}")]
    with tempfile.TemporaryDirectory() as tmp:
        for check in (check_merge, check_search, check_candidate):
            t0 = time.perf_counter()
            try:
                rows += check(Path(tmp) / check.__name__)
            except subprocess.CalledProcessError as exc:
                rows.append((check.__name__, (exc.stderr or "")[-300:].replace("\n", " "), "FAIL"))
            print(f"{check.__name__}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) for r in rows)
    print(table)
    (out_dir / "summary.txt").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r[2] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if sys.argv[1:2] == ["deps"]:
        deps()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        sys.exit(run(Path(sys.argv[2])))
    else:
        sys.exit("usage: gpu_check.py deps | run OUT_DIR")
