"""PEFT LoRA adapters as merge inputs (`model: BASE+ADAPTER`, as mergekit spells it), through
`evomerge merge` and `evomerge search`, against independent references: peft's own
`merge_and_unload`, the hand-computed base + sum w_i * scale_i * B_i @ A_i read straight from the
adapter files, and mergekit 0.1.5's `+adapter` output (its own venv; skipped without it).

The adapters are made by peft itself (get_peft_model + save_pretrained) on a tiny Llama: one
with rsLoRA (scale alpha / sqrt(r)), one with modules_to_save=[lm_head], one on the embedding
(lora_embedding_A/B, stored transposed); lora_B is randomized so the deltas are non-zero.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tensors, write_tiny_model
from safetensors.torch import load_file

from evomerge.cli import main as cli_main

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_PY = ROOT / ".mergekit-venv" / "bin" / "python"
PREFIX = "base_model.model."
ADAPTERS = {  # name -> LoraConfig options (r=4, lora_alpha=8 for all)
    "rs": {"target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "save": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    "emb": {"target_modules": ["k_proj", "embed_tokens"]},
}


def _make_adapter(base: Path, out: Path, seed: int, options: dict) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, **options),
    )
    with torch.no_grad():  # lora_B (lora_embedding_A) starts at zero: make it do something
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_embedding", "modules_to_save")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    out = {"base": write_tiny_model(root / "base", seed=0)}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        _make_adapter(out["base"], root / name, seed=10 + i, options=options)
        out[name] = root / name
    out["other_base"] = write_tiny_model(root / "other", seed=1, hidden=48)
    return out


def _merge(tmp_path: Path, recipe: dict, name: str = "out") -> tuple[int, Path]:
    cfg, out = tmp_path / f"{name}.yaml", tmp_path / name
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return cli_main(["merge", str(cfg), str(out)]), out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _hand_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A per base tensor, from the adapter files with the scale written out here
    (modules_to_save: the saved tensor itself, marked by the key 'replace:...')."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".lora_A.weight"):
            b = sd[key.replace("lora_A", "lora_B")]
            out[name.replace(".lora_A.weight", ".weight")] = scale * (b @ a)
        elif name.endswith(".lora_embedding_A"):
            b = sd[key.replace("lora_embedding_A", "lora_embedding_B")]
            out[name.replace(".lora_embedding_A", ".weight")] = scale * (b @ a).T
        elif "lora_" not in name and ".base_layer." not in name:
            out["replace:" + name] = a
    return out


def _hand_sum(lora_zoo: dict[str, Path], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """base + sum w_i * task vector of adapter i (a replaced tensor's: its copy - base)."""
    base = load_tensors(lora_zoo["base"])
    want = {k: v.clone() for k, v in base.items()}
    for n, w in weights.items():
        for key, d in _hand_delta(lora_zoo[n]).items():
            name = key.removeprefix("replace:")
            want[name] += w * (d - base[name] if key.startswith("replace:") else d)
    return want


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_base_plus_adapter_equals_peft_merge_and_unload(lora_zoo, tmp_path, adapter):
    ref = f"{lora_zoo['base']}+{lora_zoo[adapter]}"
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": ref, "parameters": {"weight": 1.0}}]}  # fmt: skip
    rc, out = _merge(tmp_path, recipe)
    assert rc == 0
    got, want = load_tensors(out), _peft_merged(lora_zoo["base"], lora_zoo[adapter])
    assert set(got) == set(want)
    base = load_tensors(lora_zoo["base"])
    changed = [k for k in got if not torch.equal(base[k], want[k])]
    assert len(changed) >= 3  # the adapter really changes the model (q/v or k/embed, lm_head)
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_task_arithmetic_over_adapters_equals_hand_sum(lora_zoo, tmp_path):
    weights = {"rs": 0.7, "save": -0.4, "emb": 1.3}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(lora_zoo["base"]),
              "dtype": "float32", "models": [
                  {"model": f"{lora_zoo['base']}+{lora_zoo[n]}", "parameters": {"weight": w}}
                  for n, w in weights.items()]}  # fmt: skip
    rc, out = _merge(tmp_path, recipe)
    assert rc == 0
    want = _hand_sum(lora_zoo, weights)
    got = load_tensors(out)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


_MERGEKIT = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg, out, cache = sys.argv[1:4]
conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
run_merge(conf, out, MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False,
                                  lora_merge_cache=cache))
"""


@pytest.mark.skipif(not MERGEKIT_PY.exists(), reason="mergekit venv (.mergekit-venv) absent")
def test_adapters_equal_mergekit_lora_merge(lora_zoo, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]), "dtype": "float32",
              "models": [
                  {"model": f"{lora_zoo['base']}+{lora_zoo['rs']}",
                   "parameters": {"weight": 0.7, "density": 0.5}},
                  {"model": f"{lora_zoo['base']}+{lora_zoo['save']}",
                   "parameters": {"weight": 0.5, "density": 0.7}}]}  # fmt: skip
    rc, out = _merge(tmp_path, recipe)
    assert rc == 0
    mk = tmp_path / "mergekit"
    run = subprocess.run(
        [str(MERGEKIT_PY), "-c", _MERGEKIT, str(tmp_path / "out.yaml"), str(mk),
         str(tmp_path / "lora-cache")],
        capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got, want = load_tensors(out), load_tensors(mk)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def _one_line_error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_adapters_exit_2_and_leave_nothing(lora_zoo, tmp_path, capsys):
    base = lora_zoo["base"]
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / f).write_bytes((lora_zoo["rs"] / f).read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases = {
        f"{base}+{tmp_path / 'missing'}": ("LoRA adapter", "does not exist"),
        f"{base}+{base}": ("adapter_config.json",),  # a model folder, not an adapter
        f"{lora_zoo['other_base']}+{lora_zoo['rs']}": ("shape", "trained on this base"),
        f"{base}+{lora_zoo['rs']}+{lora_zoo['save']}": ("one '+'",),
        f"{base}+{dora}": ("use_dora",),
    }
    for i, (ref, needles) in enumerate(cases.items()):
        recipe = {"merge_method": "linear", "models": [{"model": ref}],
                  "parameters": {"weight": 1.0}}  # fmt: skip
        rc, out = _merge(tmp_path, recipe, name=f"bad{i}")
        _one_line_error(capsys, rc, *needles)
        assert not out.exists()


def test_adapter_refs_parse_and_round_trip():
    from evomerge.recipe import parse_recipe
    from evomerge.recipe.schema import ModelRef

    ref = ModelRef.parse("org/base@v1+org/adapter@abc")
    assert (ref.path, ref.revision, str(ref.lora), str(ref)) == (
        "org/base", "v1", "org/adapter@abc", "org/base@v1+org/adapter@abc")  # fmt: skip
    assert ref.base == ModelRef("org/base", "v1")
    doc = {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [
        {"model": {"model": {"path": "org/base"}, "lora": {"path": "org/adapter",
                                                           "revision": "abc"}}}]}  # fmt: skip
    assert str(parse_recipe(doc).final.models[0].model) == "org/base+org/adapter@abc"


def test_lorahub_search_over_adapters_then_export(lora_zoo, tmp_path, capsys, monkeypatch):
    """A LoraHub-style search (task-arithmetic weights over adapters of one base) runs its
    candidates in place; the exported winner is re-merged on disk, verified identical to the
    scored candidate, and equals the hand-computed base + sum w_i * scale_i * B_i @ A_i."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = lora_zoo["base"]
    models = [f"{base}+{lora_zoo[n]}" for n in ADAPTERS]
    space = tmp_path / "lorahub.yaml"
    space.write_text(yaml.safe_dump({
        "name": "lorahub", "base_model": str(base), "models": models,
        "method": "task_arithmetic", "parameters": {"weight": {"low": -1.5, "high": 1.5}},
        "tasks": [str(ROOT / "evals" / "zoo_add.yaml")],
        "eval": {"chunks": [8, None], "device": "cpu", "heldout_top_k": 1},
        "search": {"sampler": "cmaes", "n_trials": 2, "seed": 0}, "baselines": ["uniform"],
    }))  # fmt: skip
    results = tmp_path / "results"
    assert cli_main(["search", str(space), "--results", str(results), "--n-trials", "2"]) == 0
    out = tmp_path / "export"
    assert cli_main(["export", str(results / "lorahub"), "--trial", "1", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "identical to the scored candidate" in said.out + said.err
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    weights = {m["model"]: m["parameters"]["weight"] for m in recipe["models"]}
    assert list(weights) == models and len(set(weights.values())) == 3  # searched, not uniform
    sources = recipe["provenance"]["sources"]  # the adapters are sources too, with their hashes
    assert all("adapter_model.safetensors" in sources[str(lora_zoo[n])]["sha256"] for n in ADAPTERS)
    want = _hand_sum(lora_zoo, {n: weights[f"{base}+{lora_zoo[n]}"] for n in ADAPTERS})
    for k, got in load_tensors(out).items():
        torch.testing.assert_close(got, want[k], atol=1e-5, rtol=0, msg=k)
