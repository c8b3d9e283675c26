"""Compare evomerge's merge math with mergekit 0.1.5 on tiny random Llama, Mistral and Qwen2.

mergekit lives in its own venv (not a dependency of evomerge):

    python3 -m venv .mergekit-venv
    .mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5

Then, from the repository root with evomerge's venv active:

    python scripts/compare_mergekit.py [--mergekit-python .mergekit-venv/bin/python]

For each architecture it builds a base and three fine-tune-like variants (fp32), writes one
mergekit YAML per method (with a layer gradient so t matters), runs all mergekit merges in
one process of the other venv, runs evomerge's resolve.merge_tensor over the same
safetensors (t = arch.gradient_t) and prints the max abs difference per method and arch.
Random methods (DARE, DELLA) cannot match draw for draw: the kept fraction of one model's
task vector is compared instead.

Whole merges through evomerge's disk engine (`merge_recipe`) are compared file for file
(tensor names, values, layer count, tied embeddings): passthrough frankenmerges across two
models (tied and untied embeddings) and merges of bfloat16 inputs. The results are written to
results/compare_mergekit/ (compare.json and summary.md, with date, machine and versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.arch import gradient_t
from evomerge.merge.resolve import merge_tensor
from evomerge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 3
W = {"weight": [0.2, 0.9]}  # a gradient over layers
DETERMINISTIC = {
    "linear": ({"normalize": True}, [W, {"weight": 0.5}, {"weight": 0.3}], True),
    "task_arithmetic": ({"lambda": 0.8}, [W, {"weight": 0.5}, {"weight": -0.3}], False),
    "ties": ({}, [{**W, "density": 0.5}, {"weight": 0.5, "density": 0.3}, {"weight": 1.0}], False),
    "breadcrumbs": (
        {"gamma": 0.05},
        [{**W, "density": 0.6}, {"weight": 0.5, "density": 0.8}],
        False,
    ),
    "breadcrumbs_ties": (
        {"normalize": True},
        [{**W, "density": 0.6, "gamma": 0.02}, {"weight": 0.5, "density": 0.8}, {"weight": 0.4}],
        False,
    ),
    "model_stock": ({}, [{}, {}, {}], False),
    "model_stock_fw": ({"filter_wise": True}, [{}, {}, {}], False),
    "sce": ({"select_topk": 0.5}, [{}, {}, {}], False),
    "slerp": ({"t": [0.1, 0.7]}, [{}], False),
    "nearswap": ({"t": 0.02}, [{}], False),
    "nuslerp": ({}, [W, {"weight": 0.6}], False),
    "nuslerp_nobase": ({"nuslerp_flatten": False}, [W, {"weight": 0.6}], None),
    "multislerp": ({}, [W, {"weight": 0.6}, {"weight": 0.3}], False),
    "karcher": ({}, [{}, {}, {}], None),
    "passthrough": ({}, [{}], None),
}
RANDOM = {  # one variant, so the merged delta is that variant's sparsified task vector
    "dare_linear": {"density": 0.3, "weight": 1.0},
    "dare_ties": {"density": 0.3, "weight": 1.0},
    "della": {"density": 0.4, "epsilon": 0.1, "weight": 1.0},
    "della_linear": {"density": 0.4, "epsilon": 0.1, "weight": 1.0},
}


def build_models(arch: str, out: Path, tie: bool = False, dtype: str = "float32",
                 tag: str = "") -> list[str]:  # fmt: skip
    """Base + 3 variants of a tiny random model; returns the model folders (base first)."""
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
              max_position_embeddings=64, tie_word_embeddings=tie)  # fmt: skip
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]  # fmt: skip
    config = getattr(transformers, cls[0])(**kw)
    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3}[arch])
    base = getattr(transformers, cls[1])(config).to(torch.float32)
    paths = []
    for i in range(4):
        model = getattr(transformers, cls[1])(config)
        model.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02 * i + p.abs().mean() * 0.01)
        path = out / f"{arch}{tag}_m{i}"
        model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
        paths.append(str(path))
    return paths


def recipe(method: str, global_params: dict, model_params: list[dict], paths: list[str],
           base: bool | None) -> dict:  # fmt: skip
    """A mergekit config; base None: no base_model, True: base listed among models too."""
    name = method.removesuffix("_fw").removesuffix("_nobase")
    models = [{"model": p, **({"parameters": mp} if mp else {})}
              for p, mp in zip(paths[1:], model_params, strict=False)]  # fmt: skip
    cfg: dict = {"merge_method": name, "dtype": "float32", "models": models}
    if base is not None:
        cfg["base_model"] = paths[0]
        if base:
            cfg["models"].append({"model": paths[0], "parameters": {"weight": 0.4}})
    if global_params:
        cfg["parameters"] = global_params
    return cfg


def run_mergekit(python: str, jobs: list[tuple[str, str, int]]) -> dict[str, str]:
    """Run mergekit's run_merge (what mergekit-yaml calls) on each job in one process;
    returns {out_dir: error} for the merges mergekit refused or failed."""
    code = (
        "import json,sys,yaml\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\nfrom mergekit.options import MergeOptions\n"
        "errors = {}\n"
        "for cfg, out, seed in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))\n"
        "        run_merge(conf, out, MergeOptions(copy_tokenizer=False, quiet=True,\n"
        "                  write_model_card=False, random_seed=seed))\n"
        "    except Exception as exc:\n"
        "        errors[out] = f'{type(exc).__name__}: {exc}'.splitlines()[-1][:300]\n"
        "print('MERGEKIT-ERRORS ' + json.dumps(errors))\n"
    )
    res = subprocess.run([python, "-c", code, json.dumps(jobs)], check=True, text=True,
                         stdout=subprocess.PIPE)  # fmt: skip
    line = [x for x in res.stdout.splitlines() if x.startswith("MERGEKIT-ERRORS ")][-1]
    return json.loads(line.removeprefix("MERGEKIT-ERRORS "))


def mergekit_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    return subprocess.run([python, "-c", code], text=True, capture_output=True).stdout.strip()


def evomerge_merge(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    stage = parse_recipe({**cfg, "random_seed": seed}).final
    listed = [load_file(f"{m['model']}/model.safetensors") for m in cfg["models"]]
    base = load_file(f"{cfg['base_model']}/model.safetensors") if "base_model" in cfg else None
    out = {}
    for name in base or listed[0]:
        models = torch.stack([sd[name] for sd in listed])
        t = gradient_t(name, LAYERS)
        out[name] = merge_tensor(stage, name, models, None if base is None else base[name], t)
    return out


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def kept_fraction(merged: dict, base: dict) -> float:
    kept = total = 0
    for k, v in merged.items():
        kept += int(((v.float() - base[k].float()) != 0).sum())
        total += v.numel()
    return kept / total


BF16_METHODS = ("linear", "task_arithmetic", "ties", "slerp", "model_stock", "nuslerp")
HEAD = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
BF16_NOTE = (
    "The worst difference gates the float32 tensor math and the frankenmerges only. bf16 rows "
    "are reported: with `dtype: bfloat16` mergekit computes in bfloat16 and evomerge in "
    "float32, so entries differ by about one bfloat16 step; with float32 compute, linear "
    "differs where a different summation order rounds to the other bfloat16 neighbour, and "
    "ties where task-vector magnitudes tie at the density cutoff (frequent in bfloat16; which "
    "of the equal entries is kept is left to the sort in both tools)."
)


def frankenmerge(a: str, b: str) -> dict:
    """Passthrough over slices of two models: A's first two layers, then B's last two."""
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [1, LAYERS]}]},
    ]}  # fmt: skip


def engine_cases(arch: str, tmp: Path) -> list[tuple[str, dict]]:
    """(case, mergekit config) for whole-checkpoint comparisons through evomerge's engine."""
    cases = []
    for tie in (False, True):
        paths = build_models(arch, tmp, tie=tie, tag="_tied" if tie else "_untied")
        cases.append((f"frankenmerge {'tied' if tie else 'untied'}", frankenmerge(*paths[:2])))
    paths = build_models(arch, tmp, dtype="bfloat16", tag="_bf16")
    for method in BF16_METHODS:
        gp, mps, base_listed = DETERMINISTIC[method]
        cfg = recipe(method, gp, mps, paths, base_listed)
        # dtype bfloat16: mergekit computes in bfloat16; float32 + out_dtype: in float32
        cases.append((f"bf16 {method} (dtype bf16)", {**cfg, "dtype": "bfloat16"}))
        cases.append((f"bf16 {method} (dtype fp32)", {**cfg, "out_dtype": "bfloat16"}))
    return cases


def compare_dirs(ours: Path, theirs: Path) -> dict:
    """Tensor names, values (max |diff|, entries that differ) and config of two checkpoints."""
    to, tm = (load_dir(p) for p in (ours, theirs))
    co, cm = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    same = set(to) == set(tm)
    diffs = [(to[k].float() - tm[k].float()).abs() for k in tm if k in to]
    keys = ("num_hidden_layers", "tie_word_embeddings")
    return {
        "same_tensor_names": same,
        "max_abs_diff": max(float(d.max()) for d in diffs) if same else float("inf"),
        "entries_differing": sum(int((d > 0).sum()) for d in diffs),
        "entries": sum(d.numel() for d in diffs),
        "config_equal": all(co.get(k) == cm.get(k) for k in keys),
        "has_lm_head": "lm_head.weight" in to,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in to.values()}),
    }


def hand_check(cfg: dict, ours: Path) -> bool:
    """A frankenmerge's embeddings are the first model's, its final norm and lm_head the
    second's (mergekit's planner: pre-layer weights from the first slice, the rest from the
    last)."""
    a, b = (load_dir(Path(sl["sources"][0]["model"])) for sl in cfg["slices"])
    to = load_dir(ours)
    ok = torch.equal(to[HEAD[0]], a[HEAD[0]])
    return ok and all(torch.equal(to[n], b[n]) for n in HEAD[1:] if n in b)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def math_rows(plan: list, tmp: Path) -> list[dict]:
    rows = []
    for i, (arch, method, cfg, kind) in enumerate(plan):
        theirs = load_file(str(tmp / f"out_{i}" / "model.safetensors"))
        ours = evomerge_merge(cfg, seed=7)
        row = {"kind": "tensor math", "arch": arch, "case": method}
        if kind == "exact":
            # the second figure shows the merge moved away from the first model
            ref = load_file(f"{cfg['models'][0]['model']}/model.safetensors")
            row.update(max_abs_diff=max_diff(ours, theirs), mergekit_moved=max_diff(theirs, ref))
        else:
            base = load_file(f"{cfg['base_model']}/model.safetensors")
            row["kept_fraction"] = [kept_fraction(ours, base), kept_fraction(theirs, base)]
            row["density"] = cfg["models"][0]["parameters"]["density"]
        rows.append(row)
    return rows


def engine_rows(cases: list, tmp: Path, errors: dict[str, str]) -> list[dict]:
    from evomerge.merge.engine import merge_recipe

    rows = []
    for i, (arch, case, cfg) in enumerate(cases):
        ours = merge_recipe(parse_recipe(cfg), tmp / f"evo_{i}", seed=7, progress=False)
        row = {"kind": "engine", "arch": arch, "case": case}
        if "slices" in cfg:
            row["hand_reference_ok"] = hand_check(cfg, ours)
        err = errors.get(str(tmp / f"eng_{i}"))
        if err is not None:
            row["mergekit_error"] = err
        else:
            row.update(compare_dirs(ours, tmp / f"eng_{i}"))
        rows.append(row)
    return rows


def write_results(rows: list[dict], mk_version: str, out_dir: Path, worst: float) -> None:
    import transformers

    import evomerge

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "evomerge": getattr(evomerge, "__version__", "?"),
        "mergekit": mk_version,
        "worst_deterministic_diff": worst,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# evomerge vs mergekit {mk_version}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + ["", "| kind | arch | case | result |",
                                                        "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['kind']} | {r['arch']} | {r['case']} | {describe(r)} |")
    lines += ["", BF16_NOTE]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def describe(r: dict) -> str:
    if "kept_fraction" in r:
        k = r["kept_fraction"]
        return f"kept {k[0]:.3f} vs {k[1]:.3f} (density {r['density']})"
    hand = "" if "hand_reference_ok" not in r else f"; hand reference {r['hand_reference_ok']}"
    if "mergekit_error" in r:
        return f"mergekit failed: {r['mergekit_error']}{hand}"
    if r["kind"] == "engine":
        return (
            f"max abs diff {r['max_abs_diff']:.2e}, {r['entries_differing']}/{r['entries']} "
            f"entries differ, names equal {r['same_tensor_names']}, config equal "
            f"{r['config_equal']}, lm_head {r['has_lm_head']}, {'/'.join(r['dtypes'])}{hand}"
        )
    return f"max abs diff {r['max_abs_diff']:.2e} (mergekit moved {r['mergekit_moved']:.2e})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default=str(ROOT / ".mergekit-venv/bin/python"))
    ap.add_argument("--archs", default="llama,mistral,qwen2")
    ap.add_argument("--out", default=str(ROOT / "results/compare_mergekit"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        jobs, plan, cases = [], [], []
        for arch in args.archs.split(","):
            paths = build_models(arch, tmp)
            for method, (gp, mps, base_listed) in DETERMINISTIC.items():
                cfg = recipe(method, gp, mps, paths, base_listed)
                plan.append((arch, method, cfg, "exact"))
            for method, mp in RANDOM.items():
                plan.append((arch, method, recipe(method, {}, [mp], paths, False), "random"))
            cases += [(arch, case, cfg) for case, cfg in engine_cases(arch, tmp)]
        for i, (a, m, cfg, _) in enumerate(plan):
            (tmp / f"{a}_{m}.yaml").write_text(yaml.safe_dump(cfg))
            jobs.append((str(tmp / f"{a}_{m}.yaml"), str(tmp / f"out_{i}"), 7))
        for i, (_, _, cfg) in enumerate(cases):
            (tmp / f"eng_{i}.yaml").write_text(yaml.safe_dump(cfg))
            jobs.append((str(tmp / f"eng_{i}.yaml"), str(tmp / f"eng_{i}"), 7))
        errors = run_mergekit(args.mergekit_python, jobs)
        rows = math_rows(plan, tmp) + engine_rows(cases, tmp, errors)
    for r in rows:
        print(f"{r['kind']:<12} {r['arch']:<8} {r['case']:<28} {describe(r)}")
    # gated: the float32 math and the frankenmerges; bf16 rows are reported (see BF16_NOTE)
    exact = [r["max_abs_diff"] for r in rows if "mergekit_moved" in r]
    exact += [r["max_abs_diff"] for r in rows if r["case"].startswith("frankenmerge")
              and "max_abs_diff" in r]  # fmt: skip
    worst = max(exact, default=0.0)
    write_results(rows, mergekit_version(args.mergekit_python), Path(args.out), worst)
    print(f"worst exact-case difference: {worst:.2e} (target <= 1e-5); results in {args.out}")
    hand_ok = all(r.get("hand_reference_ok", True) for r in rows)
    return 0 if worst <= 1e-5 and hand_ok else 1


if __name__ == "__main__":
    sys.exit(main())
