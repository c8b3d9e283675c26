"""Peak memory and wall time of `evomerge merge` (and mergekit-yaml) at 7B / 14B scale.

Builds header-only sparse checkpoints (a safetensors header listing every tensor of a
Qwen2-7B / Qwen2-14B-shaped bf16 model, then truncate to full size: reads return zeros,
no disk used; in 5 GB shards with an index, as hub releases come, unless --shard-gb 0),
merges each method family in a subprocess, polls /proc/PID/status for
RssAnon and VmHWM every 0.2 s, and writes results/bench/merge_memory.{json,md}.

The bound each merge is compared with is measured in the same run:

- disk: a 2 GiB sequential write (64 MiB blocks, fsync'd) in the output's folder gives the
  write speed; reading that file back with O_DIRECT (or, where the file system refuses it,
  after posix_fadvise(DONTNEED) dropped its clean pages: no root needed) the read speed;
- CPU: the minimal work per entry of the method, timed on an in-memory block (256K entries
  of bf16 data with realistic deltas, one thread, in cache, so a lower bound): cast every
  input to float32 once, the delta of each merged row, the method's statistic (TIES /
  breadcrumbs: one histogram of the high 16 bits of |delta| per row, the first pass of any
  exact selection; DARE: the row's 16-bit draws; DELLA: the draws and a sort of |delta|
  along each row, for the ranks; slerp / model_stock: a dot product per row), one
  multiply-add per row into the result, and the result's cast to bf16; scaled to the
  model's entries and divided by the cores.

Reading, computing and writing overlap (readahead, two tensors in flight, write-back), so a
merge's bound is max(disk, CPU): disk = its output at the write speed for these sparse
inputs (nothing is read from disk), and, for real checkpoints, plus every input read once at
the read speed ("real-input bound", printed beside it). Each row prints wall / bound. A run
stopped at its time limit reports the share of the output it had written and the wall time
that projects to (none below 5%: too little to project from).

    python scripts/bench_merge_memory.py --sizes 7b --methods linear ties --mergekit-limit 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (3584, 18944, 28, 28, 4, 152064),
    "14b": (5120, 13824, 48, 40, 8, 152064),
}
RECIPES = {
    "linear": "merge_method: linear\nmodels:\n{rows}",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n{rows}",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n{rows}",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n{rows}",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n{rows}",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n{rows}parameters: {{t: 0.5}}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n{rows}"
    "parameters: {{select_topk: 0.5}}\n",
    "karcher": "merge_method: karcher\nmodels:\n{rows}",
}
PARAMS = {"linear": "weight: 0.5", "ties": "weight: 0.5, density: 0.5",
          "dare_ties": "weight: 0.5, density: 0.5", "della": "weight: 0.5, density: 0.5, "
          "epsilon: 0.1", "model_stock": "", "slerp": "", "sce": "", "karcher": ""}  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = REPO / ".mergekit-venv" / "bin" / "mergekit-yaml"


def tensors(size: str) -> dict[str, list[int]]:
    h, inter, layers, heads, kv, vocab = SHAPES[size]
    kvd = h // heads * kv
    out = {"model.embed_tokens.weight": [vocab, h], "lm_head.weight": [vocab, h],
           "model.norm.weight": [h]}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj.weight", [h, h]), ("self_attn.q_proj.bias", [h]),
                     ("self_attn.k_proj.weight", [kvd, h]), ("self_attn.k_proj.bias", [kvd]),
                     ("self_attn.v_proj.weight", [kvd, h]), ("self_attn.v_proj.bias", [kvd]),
                     ("self_attn.o_proj.weight", [h, h]), ("mlp.gate_proj.weight", [inter, h]),
                     ("mlp.up_proj.weight", [inter, h]), ("mlp.down_proj.weight", [h, inter]),
                     ("input_layernorm.weight", [h]),
                     ("post_attention_layernorm.weight", [h])]:  # fmt: skip
            out[p + n] = s
    return out


def write_sparse(folder: Path, size: str, shard_bytes: int | None = None) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_sparse_checkpoint  # the test suite's header-only writer

    h, inter, layers, heads, kv, vocab = SHAPES[size]
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 4096}  # fmt: skip
    write_sparse_checkpoint(folder, tensors(size), cfg, shard_bytes)


def watch(cmd: list[str], limit: float, env: dict | None = None) -> dict:
    """Run cmd, sampling RssAnon / VmHWM every 0.2 s; stop it after `limit` seconds."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak_anon = peak_hwm = ticks = 0
    while proc.poll() is None:
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
            ticks = int(fields[11]) + int(fields[12])  # utime + stime, all threads
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    peak_hwm = max(peak_hwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        if time.time() - t0 > limit:
            proc.kill()
            break
        time.sleep(0.2)
    out = proc.communicate()[0].decode(errors="replace")
    out = re.sub(r"\S*evomerge-bench-\w+", "<tmp>", out)  # the run's scratch folder
    return {"wall_s": round(time.time() - t0, 1), "rc": proc.returncode,
            "cpu_time_s": round(ticks / os.sysconf("SC_CLK_TCK"), 1),
            "peak_rss_anon_gb": round(peak_anon / 1e9, 3), "vm_hwm_gb": round(peak_hwm / 1e9, 3),
            "finished": proc.returncode == 0, "tail": out[-400:]}  # fmt: skip


def write_speed(folder: Path, size: int = 2 << 30) -> float:
    """Sequential write speed in bytes/s: `size` bytes in 64 MiB blocks, then fsync."""
    block = b"\1" * (64 << 20)
    path = folder / "write_speed.bin"
    t0 = time.time()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.time() - t0
    path.unlink()
    return size / dt


def read_speed(folder: Path, size: int = 2 << 30) -> tuple[float, str]:
    """Sequential read speed in bytes/s of a freshly written `size`-byte file, not from the
    page cache: O_DIRECT reads (64 MiB aligned blocks) or, where the file system refuses
    O_DIRECT, plain reads after fsync + posix_fadvise(DONTNEED). Returns (speed, how)."""
    import mmap

    block = 64 << 20
    path = folder / "read_speed.bin"
    with open(path, "wb") as f:
        for _ in range(size // block):
            f.write(os.urandom(1 << 20) * (block >> 20))
        f.flush()
        os.fsync(f.fileno())
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    how = "O_DIRECT"
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            os.preadv(fd, [memoryview(buf)[:4096]], 0)
        except OSError:
            how = "fadvise(DONTNEED), then read"
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0, got = time.time(), 0
        while got < size:
            n = os.preadv(fd, [buf], got)
            if n <= 0:
                break
            got += n
        dt = time.time() - t0
        os.close(fd)
    finally:
        path.unlink()
    return got / dt, how


def cpu_ns_per_entry(method: str, n_inputs: int, cols: int = 3584) -> float:
    """Seconds * 1e9 per entry of the method's minimal work (see the module docstring), on
    one thread over 256K-entry blocks of realistic bf16 data."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from evomerge.merge import sparsify as sp

    block, reps = (1 << 18) // cols * cols, 48
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(block, generator=g) * 0.02).to(torch.bfloat16)
    xs = [base] + [(base.float() + torch.randn(block, generator=g) * 0.002).to(torch.bfloat16)
                   for _ in range(n_inputs - 1)]  # fmt: skip
    f = [torch.empty(block) for _ in xs]
    acc, tmp, out = torch.empty(block), torch.empty(block), torch.empty(block, dtype=torch.bfloat16)
    draws = torch.empty((2, block), dtype=torch.uint8)
    rows = range(1, n_inputs) if method != "linear" else range(n_inputs)
    with_base = method != "linear"
    best = float("inf")
    with _threads(1):  # CPU time, not wall: the machine's other jobs do not inflate it
        for _ in range(3):
            t0 = time.process_time()
            for r in range(reps):
                for fi, x in zip(f, xs, strict=True):
                    fi.copy_(x)  # every input cast once
                acc.copy_(f[0]) if with_base else acc.zero_()
                for j in rows:
                    d = f[j].sub_(f[0]) if with_base else f[j]
                    if method in ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "sce"):
                        torch.abs(d, out=tmp)
                        torch.bincount(tmp.view(torch.int16)[1::2].contiguous(), minlength=1 << 15)
                    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
                        sp.draws(0, "bench", j, block * reps, "cpu", r * block, (r + 1) * block,
                                 out=draws)  # fmt: skip
                    if method in ("della", "della_linear"):
                        np.sort(tmp.numpy().reshape(-1, cols), axis=1)
                    if method in ("slerp", "model_stock", "nuslerp", "multislerp", "karcher"):
                        torch.dot(d, f[0])
                    acc.add_(d, alpha=0.5)
                out.copy_(acc)  # the result cast once
            best = min(best, time.process_time() - t0)
    return best / (block * reps) * 1e9


def _threads(n: int):
    from evomerge.common.device import torch_threads

    return torch_threads(n)


def output_bytes(size: str) -> int:
    """bf16 bytes of the merged checkpoint's tensors."""
    import math

    return sum(2 * math.prod(s) for s in tensors(size).values())


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def written(out: Path) -> int:
    """Bytes on disk under out (allocated blocks: a preallocated file counts what it holds)."""
    return sum(p.stat().st_blocks * 512 for p in out.rglob("*") if p.is_file())


def _torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["7b"])
    ap.add_argument("--methods", nargs="+", default=["linear", "ties"])
    ap.add_argument("--mergekit-limit", type=float, default=0.0, help="seconds; 0 skips it")
    ap.add_argument("--limit", type=float, default=3600.0)
    ap.add_argument("--out", default="results/bench/merge_memory")
    ap.add_argument("--shard-gb", type=float, default=5.0,
                    help="input shard size, as on the hub (0: one file)")  # fmt: skip
    args = ap.parse_args()
    results = []
    work = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    load0 = load_average()
    speed = write_speed(work)
    rspeed, rhow = read_speed(work)
    print(f"sequential write: {speed / 1e6:.0f} MB/s, read: {rspeed / 1e6:.0f} MB/s ({rhow})",
          flush=True)  # fmt: skip
    cpu_ns: dict[tuple[str, int], float] = {}
    try:
        for size in args.sizes:
            models = [work / f"{size}-{i}" for i in range(3)]
            for m in models:
                write_sparse(m, size, int(args.shard_gb * 1e9) or None)
            for method in args.methods:
                merged = models[1:2] if method == "slerp" else models[1:]  # slerp: base + 1
                rows = "".join(f"- model: {m}\n  parameters: {{{PARAMS[method]}}}\n"
                               for m in merged)  # fmt: skip
                recipe = work / f"{method}.yaml"
                recipe.write_text(RECIPES[method].format(base=models[0], rows=rows))
                for tool in ["evomerge", *(["mergekit"] if args.mergekit_limit else [])]:
                    out = work / "out"
                    if tool == "evomerge":
                        cmd = [sys.executable, "-m", "evomerge", "merge", str(recipe), str(out),
                               "--no-progress"]  # fmt: skip
                        limit = args.limit
                    else:
                        cmd = [str(MERGEKIT_YAML), str(recipe), str(out)]
                        limit = args.mergekit_limit
                    r = watch(cmd, limit)
                    total = output_bytes(size)
                    done = sum(written(p) for p in work.glob("*out*"))  # temp folders too
                    share = 1.0 if r["finished"] else min(1.0, done / total)
                    n_in = len(merged) + (method != "linear")
                    if (method, n_in) not in cpu_ns:
                        cpu_ns[method, n_in] = cpu_ns_per_entry(method, n_in)
                    cpu_s = cpu_ns[method, n_in] * (total // 2) / (os.cpu_count() or 1) / 1e9
                    write_s, read_s = total / speed, n_in * total / rspeed
                    bound = max(write_s, cpu_s)
                    r.update(
                        size=size,
                        method=method,
                        tool=tool,
                        write_mb_s=round(speed / 1e6),
                        read_mb_s=round(rspeed / 1e6),
                        write_s=round(write_s, 1),
                        read_s=round(read_s, 1),
                        cpu_ns_per_entry=round(cpu_ns[method, n_in], 2),
                        cpu_s=round(cpu_s, 1),
                        bound_s=round(bound, 1),
                        real_input_bound_s=round(max(write_s + read_s, cpu_s), 1),
                        share_written=round(share, 3),
                        projected_wall_s=round(r["wall_s"] / share, 1) if share >= 0.05 else None,
                    )
                    r["x_bound"] = (round(r["projected_wall_s"] / bound, 2)
                                    if r["projected_wall_s"] else None)  # fmt: skip
                    # CPU time against the CPU floor: what the load of other jobs leaves alone
                    full_cpu = r["cpu_time_s"] / share if share >= 0.05 else None
                    r["projected_cpu_time_s"] = round(full_cpu, 1) if full_cpu else None
                    floor = cpu_s * (os.cpu_count() or 1)
                    r["x_cpu_floor"] = round(full_cpu / floor, 2) if full_cpu else None
                    r["load_average"] = load_average()
                    print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
                    results.append(r)
                    shutil.rmtree(out, ignore_errors=True)
                    for p in work.glob("out*"):
                        shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    lines = ["| size | method | tool | wall s | written | projected s | write s | CPU ns/entry "
             "| CPU s | bound s | x bound | real-input bound s | CPU time s (projected) "
             "| x CPU floor | peak RssAnon GB | VmHWM GB | finished | load avg |",
             "|---" * 18 + "|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['size']} | {r['method']} | {r['tool']} | {r['wall_s']} | "
                     f"{r['share_written']:.0%} | {r['projected_wall_s']} | {r['write_s']} | "
                     f"{r['cpu_ns_per_entry']} | {r['cpu_s']} | {r['bound_s']} | "
                     f"{r['x_bound']} | {r['real_input_bound_s']} | {r['cpu_time_s']} "
                     f"({r['projected_cpu_time_s']}) | {r['x_cpu_floor']} | "
                     f"{r['peak_rss_anon_gb']} | "
                     f"{r['vm_hwm_gb']} | {r['finished']} | {r['load_average']} |")  # fmt: skip
    head = [f"# Merge memory and wall time ({' '.join(sys.argv[1:])})", "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {_torch_version()}; sequential write "
            f"{speed / 1e6:.0f} MB/s (2 GiB, fsync'd), read {rspeed / 1e6:.0f} MB/s (2 GiB, "
            f"{rhow}), same run. Load average {load0} at the start. Inputs: header-only "
            "sparse bf16 checkpoints (reads return zeros); output bf16. Bound = max(output at "
            "the write speed, CPU); real-input bound adds every input read once at the read "
            "speed; CPU = the method's minimal work per entry (script docstring, CPU time of one "
            "thread) x entries / cores. x CPU floor = the merge's CPU time (all threads, "
            "projected to the whole output) / (that minimal work x entries): less sensitive to "
            "the other jobs' load than wall / bound.", ""]  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
