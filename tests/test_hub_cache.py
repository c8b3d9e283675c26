"""Models named by hub id (`org/name`, `org/name@revision`, `org/base+org/adapter`) resolve
through huggingface_hub's local cache, fully offline (HF_HUB_OFFLINE=1), through `evomerge
merge` in a fresh process (huggingface_hub reads HF_HUB_CACHE when it is imported).

The cache is laid out as huggingface_hub lays it out: models--org--name/blobs/<sha256>,
snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<branch> holding the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import load_tensors, write_tiny_model
from safetensors.torch import save_file

COMMITS = {"old": "1" * 40, "new": "2" * 40}


def _publish(cache: Path, repo: str, folder: Path, commit: str, branches: list[str]) -> None:
    """Put `folder` into the cache as `repo` at `commit`, with `branches` pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    for branch in branches:
        (root / "refs" / branch).write_text(commit)


def _adapter(out: Path, base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A plain PEFT LoRA folder on q_proj (r=2, alpha=6: scale 3); returns the hand deltas."""
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    sd, deltas = {}, {}
    for name, w in base.items():
        if name.endswith("q_proj.weight"):
            a = torch.randn(2, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], 2, generator=g) * 0.1
            module = name.removesuffix(".weight")
            sd[f"base_model.model.{module}.lora_A.weight"] = a
            sd[f"base_model.model.{module}.lora_B.weight"] = b
            deltas[name] = 3.0 * (b @ a)
    save_file(sd, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ["q_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return deltas


def _evomerge(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    code = "import sys; from evomerge.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_hub_ids_resolve_offline_from_the_cache(tmp_path: Path):
    cache, local = tmp_path / "hub", tmp_path / "local"
    base = write_tiny_model(local / "base", seed=0)
    old = write_tiny_model(local / "old", seed=1)
    new = write_tiny_model(local / "new", seed=2)
    _publish(cache, "org/base", base, COMMITS["new"], ["main"])
    _publish(cache, "org/expert", old, COMMITS["old"], ["dev"])
    _publish(cache, "org/expert", new, COMMITS["new"], ["main"])
    tensors = {k: load_tensors(p) for k, p in (("base", base), ("old", old), ("new", new))}
    deltas = _adapter(local / "adapter", tensors["base"], seed=3)
    _publish(cache, "org/adapter", local / "adapter", COMMITS["new"], ["main"])
    weights = {"org/expert": 0.3, f"org/expert@{COMMITS['old']}": 0.5, "org/base+org/adapter": 0.7}
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = _evomerge(["merge", "r.yaml", "out"], cache, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    b = tensors["base"]
    for k, got in load_tensors(tmp_path / "out").items():
        want = b[k] + 0.3 * (tensors["new"][k] - b[k]) + 0.5 * (tensors["old"][k] - b[k])
        want = want + 0.7 * deltas.get(k, torch.zeros_like(b[k]))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 32
    # a branch name resolves through refs/<branch>: dev is the old commit
    recipe["models"] = [{"model": "org/expert@dev", "parameters": {"weight": 1.0}}]
    (tmp_path / "dev.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert _evomerge(["merge", "dev.yaml", "dev"], cache, tmp_path).returncode == 0
    for k, got in load_tensors(tmp_path / "dev").items():
        torch.testing.assert_close(got, tensors["old"][k], atol=1e-6, rtol=0, msg=k)


def test_a_hub_model_missing_from_the_cache_is_bad_input(tmp_path: Path):
    cache = tmp_path / "hub"
    _publish(cache, "org/base", write_tiny_model(tmp_path / "m", seed=0), COMMITS["new"], ["main"])
    for i, ref in enumerate(["org/missing", "org/base@nosuchbranch", "org/base+org/nolora"]):
        recipe = {"merge_method": "linear", "models": [{"model": ref}],
                  "parameters": {"weight": 1.0}}  # fmt: skip
        (tmp_path / f"r{i}.yaml").write_text(yaml.safe_dump(recipe))
        run = _evomerge(["merge", f"r{i}.yaml", f"out{i}"], cache, tmp_path)
        err = run.stderr.strip()
        assert run.returncode == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "not in the cache" in err and str(cache) in err, err
        assert not (tmp_path / f"out{i}").exists()
