"""LoRA adapters as resident inputs of a search (merge/lowrank.py): an adapter input keeps its
low-rank factors, not a dense model copy, and the candidate merged in place equals the disk merge.

The space is a LoraHub-shaped one (base + 3 peft adapters: rsLoRA on q/v, q/v with
modules_to_save=[lm_head], k + the embedding); candidates are decoded from it at random points,
merged
in place (packed target and plain target) and compared with `evomerge merge` of the same recipe.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import load_tensors, write_tiny_model

from evomerge.cli import main as cli_main

pytest.importorskip("peft")
from test_lora import ADAPTERS, _make_adapter

HIDDEN, KV, LAYERS, VOCAB, R = 32, 16, 2, 64, 4  # write_tiny_model's sizes; r of ADAPTERS


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lowrank")
    out = {"base": write_tiny_model(root / "base", seed=0, num_layers=LAYERS)}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        _make_adapter(out["base"], root / name, seed=20 + i, options=options)
        out[name] = root / name
    return out


def _space(zoo: dict[str, Path], method: str, tmp_path: Path):
    from evomerge.search.space import SearchSpace

    models = "\n".join(f"  - {zoo['base']}+{zoo[n]}" for n in ADAPTERS)
    extra = "  density: {low: 0.3, high: 0.9}\n" if method != "task_arithmetic" else ""
    text = (
        f"name: lh\nbase_model: {zoo['base']}\nmodels:\n{models}\nmethod: {method}\n"
        f"parameters:\n  weight: {{low: -1.5, high: 1.5}}\n{extra}"
        "tasks: [arc_easy]\ndtype: float32\n"
    )
    (tmp_path / "space.yaml").write_text(text)
    return SearchSpace.from_yaml(tmp_path / "space.yaml")


def _stage_and_disk(space, method: str, seed: int, tmp_path: Path):
    """A random candidate of the space: its final stage and `evomerge merge`'s output of it."""
    from evomerge.recipe.yaml_io import save_recipe
    from evomerge.search.baselines import default_params

    rng = random.Random(seed)
    params = default_params(space, method)
    params = {k: rng.uniform(-1.0, 1.0) if "weight" in k else v for k, v in params.items()}
    recipe = space.decode(params)
    recipe.final.random_seed = 7  # DARE's draws: the same seed in both paths
    save_recipe(recipe, tmp_path / f"r{seed}.yaml")
    out = tmp_path / f"disk{seed}"
    assert cli_main(["merge", str(tmp_path / f"r{seed}.yaml"), str(out), "--no-progress"]) == 0
    return recipe.final, load_tensors(out)


def _merger(stage, zoo):
    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint
    from evomerge.recipe.schema import input_refs

    sources = {str(r): open_checkpoint(r) for r in input_refs(stage)}
    return CandidateMerger(stage, sources, num_layers=LAYERS)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_candidate_over_adapters_equals_the_disk_merge(zoo, tmp_path, method):
    space = _space(zoo, method, tmp_path)
    stage, _ = _stage_and_disk(space, method, 0, tmp_path)
    merger = _merger(stage, zoo)
    assert merger._lowrank is not None  # the adapters are held as factors
    packed = merger.packed_target()
    for seed in (1, 2):  # a second candidate reuses the expansion buffer and the caches
        stage, want = _stage_and_disk(space, method, seed, tmp_path)
        plain = {n: torch.empty_like(t) for n, t in packed.items()}
        merger.apply(stage, packed)
        merger.apply(stage, plain)
        for name in merger.tensor_names:
            assert torch.equal(packed[name], want[name]), (method, seed, name)
            assert torch.equal(plain[name], want[name]), (method, seed, name)
    base = load_tensors(zoo["base"])
    assert not torch.equal(plain["lm_head.weight"], base["lm_head.weight"])  # modules_to_save
    # an adapter input read back through the merger is base + its delta (peft's merge)
    ref = f"{zoo['base']}+{zoo['rs']}"
    from evomerge.merge.io import open_checkpoint

    with open_checkpoint(ref) as reader:
        for name, t in merger.source_tensors(ref):
            assert torch.equal(t, reader.get_tensor(name)), name


def test_resident_bytes_are_the_base_plus_the_factors(zoo, tmp_path):
    space = _space(zoo, "task_arithmetic", tmp_path)
    stage, _ = _stage_and_disk(space, "task_arithmetic", 0, tmp_path)
    merger = _merger(stage, zoo)
    f32 = 4
    inter = 2 * HIDDEN
    per_layer = (
        2 * HIDDEN  # two norms
        + HIDDEN * HIDDEN * 2  # q, o
        + KV * HIDDEN * 2  # k, v
        + inter * HIDDEN * 3  # gate, up, down
    )
    base = (LAYERS * per_layer + 2 * VOCAB * HIDDEN + HIDDEN) * f32  # + embed, lm_head, norm
    # per layer, A (r, in) and B (out, r) of each targeted linear layer
    q, k, v = R * HIDDEN + HIDDEN * R, R * HIDDEN + KV * R, R * HIDDEN + KV * R
    rs = LAYERS * (q + v) * f32
    save = LAYERS * (q + v) * f32 + VOCAB * HIDDEN * f32  # + its full lm_head copy
    emb = LAYERS * k * f32 + (R * VOCAB + HIDDEN * R) * f32  # embedding A (r, vocab), B (h, r)
    assert merger.resident_bytes == base + rs + save + emb
    assert merger.resident_bytes < 1.3 * base  # a dense stack would be 4x base
