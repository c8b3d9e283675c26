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
"""

from __future__ import annotations

import argparse
import json
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


def build_models(arch: str, out: Path) -> list[str]:
    """Base + 3 variants of a tiny random model; returns the model folders (base first)."""
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
              max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
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
        path = out / f"{arch}_m{i}"
        model.save_pretrained(path, safe_serialization=True)
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


def run_mergekit(python: str, jobs: list[tuple[str, str, int]]) -> None:
    code = (
        "import json,sys,yaml\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\nfrom mergekit.options import MergeOptions\n"
        "for cfg, out, seed in json.loads(sys.argv[1]):\n"
        "    conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))\n"
        "    run_merge(conf, out, MergeOptions(copy_tokenizer=False, quiet=True,\n"
        "              write_model_card=False, random_seed=seed))\n"
    )
    subprocess.run([python, "-c", code, json.dumps(jobs)], check=True)


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default=str(ROOT / ".mergekit-venv/bin/python"))
    ap.add_argument("--archs", default="llama,mistral,qwen2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        jobs, plan = [], []
        for arch in args.archs.split(","):
            paths = build_models(arch, tmp)
            for method, (gp, mps, base_listed) in DETERMINISTIC.items():
                cfg = recipe(method, gp, mps, paths, base_listed)
                plan.append((arch, method, cfg, "exact"))
            for method, mp in RANDOM.items():
                plan.append((arch, method, recipe(method, {}, [mp], paths, False), "random"))
            for i, (a, m, cfg, _) in enumerate(plan):
                if a == arch:
                    path = tmp / f"{a}_{m}.yaml"
                    path.write_text(yaml.safe_dump(cfg))
                    jobs.append((str(path), str(tmp / f"out_{i}"), 7))
        run_mergekit(args.mergekit_python, jobs)
        for i, (arch, method, cfg, kind) in enumerate(plan):
            theirs = load_file(str(tmp / f"out_{i}" / "model.safetensors"))
            ours = evomerge_merge(cfg, seed=7)
            if kind == "exact":
                # the second figure shows the merge moved away from the first model
                ref = load_file(f"{cfg['models'][0]['model']}/model.safetensors")
                moved = max_diff(theirs, ref)
                rows.append((arch, method, f"{max_diff(ours, theirs):.2e}", f"{moved:.2e}"))
            else:
                base = load_file(f"{cfg['base_model']}/model.safetensors")
                want = cfg["models"][0]["parameters"]["density"]
                k_ours, k_theirs = kept_fraction(ours, base), kept_fraction(theirs, base)
                res = f"kept {k_ours:.3f} vs {k_theirs:.3f} (density {want})"
                rows.append((arch, method, res, ""))
    print(f"{'arch':<8} {'method':<18} {'max|evo - mk|':<14} max|mk - models[0]|")
    for arch, method, res, moved in rows:
        print(f"{arch:<8} {method:<18} {res:<14} {moved}")
    worst = max((float(r[2]) for r in rows if r[3]), default=0.0)
    print(f"worst deterministic difference: {worst:.2e} (target <= 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
