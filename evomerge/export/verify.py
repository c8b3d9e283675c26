"""Check an exported checkpoint against the candidate the search scored, tensor by tensor.

The search never writes a candidate to disk: CandidateMerger computes it in float32 straight
into the evaluator's weights. Export merges recipe.yaml from scratch with the streaming disk
merge, so this check rebuilds the scored candidate, casts it to the checkpoint's dtype and
compares per-tensor sha256 digests: the exported weights are the ones that were measured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import MergeError

if TYPE_CHECKING:
    import torch

    from evomerge.recipe import MergeStage, Recipe

CHUNK_BYTES = 1 << 30  # float32 inputs held at once while rebuilding candidates


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes (bf16 included: hashed as bytes, not numbers)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _name_chunks(names: Sequence[str], nbytes: dict[str, int], budget: int) -> Iterator[list[str]]:
    """Consecutive groups of tensor names whose float32 inputs fit in `budget` bytes."""
    group: list[str] = []
    used = 0
    for name in names:
        if group and used + nbytes[name] > budget:
            yield group
            group, used = [], 0
        group.append(name)
        used += nbytes[name]
    if group:
        yield group


def candidate_tensors(
    stage: MergeStage, num_layers: int, device: str = "cpu", budget: int = CHUNK_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) of the candidate exactly as the search computed it.

    The inputs are loaded a group of tensors at a time (a fresh CandidateMerger per group), so
    memory stays bounded; every value depends on its own tensor only (DARE draws are keyed by
    seed and tensor name), so the result equals one merger over the whole model.
    """
    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint
    from evomerge.recipe.schema import base_index, input_refs

    refs = input_refs(stage)
    sources = {str(r): open_checkpoint(r) for r in refs}
    try:
        bi = base_index(stage)
        first = sources[str(refs[0 if bi is None else bi])]
        names = list(first.keys())
        sizes = {n: 4 * len(refs) * _numel(first.shape(n)) for n in names}
        for group in _name_chunks(names, sizes, budget):
            merger = CandidateMerger(
                stage, sources, num_layers=num_layers, device=device, tensor_names=group
            )
            yield from merger.merged(stage)
    finally:
        for r in sources.values():
            r.close()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def verify_checkpoint(
    stage: MergeStage, ckpt_dir: Path, num_layers: int, device: str = "cpu"
) -> int:
    """Raise MergeError naming the first tensor of `ckpt_dir` that differs from the scored
    candidate (cast to the checkpoint's dtype); return the number of tensors checked."""
    return compare_checkpoint(ckpt_dir, candidate_tensors(stage, num_layers, device))


def stacked_candidate(
    recipe: Recipe, num_layers: int, device: str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The layer-stacking candidate as the search scored it: the weight candidate (stage
    `merged`) rebuilt as above, the other sources read as they are, stacked by the layer plan
    the live model follows (merge/stack.py). Holds every source in memory at once."""
    from evomerge.merge.io import open_checkpoint
    from evomerge.merge.stack import stack_plan, stacked_tensors
    from evomerge.search.stacking import MERGED, split_recipe

    weights, stacked = split_recipe(recipe)
    assert stacked is not None
    plan = stack_plan(stacked)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensors_of(key: str) -> dict[str, torch.Tensor]:
        if key not in cache and key == MERGED:
            assert weights is not None
            pairs = candidate_tensors(weights, num_layers, device)
            cache[key] = {n: t.clone() for n, t in pairs}
        elif key not in cache:
            with open_checkpoint(key) as r:
                cache[key] = {n: r.get_tensor(n).float() for n in r.keys()}
        return cache[key]

    names = list(tensors_of(plan[0].key))
    yield from stacked_tensors(plan, tensors_of, names, tied="lm_head.weight" not in names)


def compare_checkpoint(ckpt_dir: Path, pairs: Iterable[tuple[str, torch.Tensor]]) -> int:
    """MergeError at the first tensor of `ckpt_dir` that differs from `pairs` (the candidate,
    cast to the checkpoint's dtype); the number of tensors checked."""
    from evomerge.merge.io import CheckpointReader

    with CheckpointReader(Path(ckpt_dir)) as written:
        on_disk = set(written.keys())
        seen: set[str] = set()
        for name, cand in pairs:
            if name not in on_disk:
                raise MergeError(f"exported checkpoint lacks tensor '{name}' of the candidate")
            disk = written.get_tensor(name)
            cast = cand.to(disk.dtype)
            if tensor_digest(cast) != tensor_digest(disk):
                diff = _max_diff(cast, disk)
                raise MergeError(
                    f"exported checkpoint differs from the candidate scored in the search at "
                    f"tensor '{name}' (max |diff| {diff:.3g} in {str(disk.dtype)[6:]}); "
                    "the merge engine and CandidateMerger disagree"
                )
            seen.add(name)
        extra = sorted(on_disk - seen)
        if extra:
            raise MergeError(
                f"exported checkpoint has {len(extra)} tensor(s) the candidate lacks, "
                f"first '{extra[0]}'"
            )
    return len(seen)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
