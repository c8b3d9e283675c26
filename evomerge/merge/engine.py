"""Streaming disk merge: `evomerge merge RECIPE.yaml OUT_DIR`.

For each stage: open every source lazily, check architectures, tensor names and shapes before
any tensor work, plan the output tensors, then stream: each output tensor's sources are read
into reused buffers (float32, or their stored dtype for fused methods), merged by the
recipe's method, cast and written straight to its place in a shard. A few tensors are merged
at once, one thread each (pipeline.py). Peak memory is a few tensors (the largest, times
the number of models).
"""

from __future__ import annotations

import copy
import math
import os
import secrets
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.common.model_dir import num_layers
from evomerge.errors import ConfigError, MergeError
from evomerge.merge.buffers import Buffers
from evomerge.merge.io import CheckpointReader, open_checkpoint, torch_dtype
from evomerge.merge.plan import (
    OutTensor,
    check_compatible,
    output_config,
    plan_models,
    plan_slices,
)
from evomerge.merge.tokenizer import (
    VocabPlan,
    check_vocab_rows,
    is_vocab_tensor,
    plan_vocab,
    tokenizer_files,
)
from evomerge.merge.writer import CheckpointWriter, check_out_dir, parse_size

if TYPE_CHECKING:
    import argparse

    import torch

    from evomerge.recipe.schema import MergeStage, Recipe

DEFAULT_SHARD_BYTES = 5 * 10**9


# ---- streaming ----------------------------------------------------------------------------------


def _input_dtype(item: OutTensor, readers: Mapping[str, CheckpointReader]) -> torch.dtype:
    """The dtype the inputs are held in: their stored dtype when they share one that float32
    holds exactly and the method converts entry by entry (`fused`), else float32."""
    import torch

    from evomerge.merge.table import get_method

    srcs = [*item.sources, *([item.base] if item.base is not None else [])]
    dtypes = {readers[k].dtype(n) for k, n in srcs}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    exact = dtype in (torch.bfloat16, torch.float16, torch.float32)
    return dtype if exact and get_method(item.stage.merge_method).fused else torch.float32


def _read_stack(
    item: OutTensor, readers: Mapping[str, CheckpointReader], bufs: Buffers, vocab: VocabPlan | None
) -> torch.Tensor:
    """The sources of one output tensor, stacked in the sub-stage's models order."""
    import torch

    if vocab is not None and not vocab.identity and is_vocab_tensor(item.name):
        # rows are permuted into the output vocabulary before the method sees them
        keys = list(vocab.perms)
        full = {}
        for k in keys:
            name = item.sources[0][1]
            if name in readers[k].keys():
                full[k] = readers[k].get_tensor(name).to(bufs.device, torch.float32)
        aligned = vocab.align(full)
        return torch.stack([aligned[k] for k, _ in item.sources]).to(bufs.device)
    n = len(item.sources)
    # a base that is not among the sources goes in the row after them, so the method's input
    # rows (models, then base: resolve.stack_rows) are this buffer, not a new (n + 1) copy
    dtype = _input_dtype(item, readers)
    rows = n + (item.base is not None)
    stacked = bufs.get("models", (rows, *item.shape), dtype)  # (n [+ 1], ...)
    for i, (k, name) in enumerate(item.sources):
        readers[k].read_into(name, stacked[i])
    if item.base is not None:
        readers[item.base[0]].read_into(item.base[1], stacked[n])
    return stacked


def _merge_one(item, readers, bufs, scratch, vocab, out_dtype, lock) -> torch.Tensor:
    """The merged tensor (in `bufs`, or new); reads hold `lock` (readers share files)."""
    from evomerge.merge.resolve import merge_tensor
    from evomerge.recipe.schema import base_index

    with lock:
        stacked = _read_stack(item, readers, bufs, vocab)
    n = len(item.sources)
    bi = base_index(item.stage)  # < n: listed among the sources; n: appended (item.base)
    if bi is not None and bi < n:
        base = stacked[bi]
    elif bi is not None and item.base is not None:
        base = stacked[n] if stacked.shape[0] > n else None
        if base is None:  # vocabulary-aligned rows came without the base
            base = bufs.get("base", item.shape)
            with lock:
                readers[item.base[0]].read_into(item.base[1], base)
    else:
        base = None
    out = bufs.get("out", item.shape, out_dtype)  # fused methods write it directly
    merged = merge_tensor(item.stage, item.name, stacked[:n], base, item.t, scratch=scratch,
                          out=out)  # fmt: skip
    if tuple(merged.shape) != item.shape:
        raise MergeError(
            f"merge of '{item.name}' gave shape {list(merged.shape)}, expected {list(item.shape)}"
        )
    return merged


def _chunk_rows(item: OutTensor, readers: Mapping[str, CheckpointReader], vocab) -> int | None:
    """Rows per chunk when `item` is merged in row chunks (chunked.py), else None: a
    streamed method, a tensor larger than one chunk, plain safetensors sources."""
    from evomerge.merge.chunked import chunkable
    from evomerge.merge.memory import rows_per_chunk

    if not chunkable(item.stage.merge_method, item.shape):
        return None
    if vocab is not None and not vocab.identity and is_vocab_tensor(item.name):
        return None
    srcs = [*item.sources, *([item.base] if item.base is not None else [])]
    if not all(
        type(readers[k]) is CheckpointReader and readers[k].streams_rows(n) for k, n in srcs
    ):
        return None
    step = rows_per_chunk(item.shape)
    return step if step < item.shape[0] else None


def _merge_in_chunks(item, readers, arena, step: int, write, kernels) -> None:
    """Merge `item` chunk by chunk; write(r0, rows) stores each. Reads take no lock: the
    workers read (and cast, and check) their chunks in parallel, as a multi-pass method
    reads every input two to four times (one thread copying 1-2 GB/s out of the page
    cache had made reading most of a 7B sce or DELLA merge's wall time)."""
    from evomerge.common.heap import release_free_memory
    from evomerge.merge.chunked import merge_chunked

    n = len(item.sources)
    dtype = _input_dtype(item, readers)

    def read(r0: int, r1: int):
        release_free_memory()  # the heap's free pages, past a limit (common/heap.py)
        stacked = arena.get(
            "models", (n + (item.base is not None), r1 - r0, *item.shape[1:]), dtype
        )
        for i, (k, name) in enumerate(item.sources):
            readers[k].read_rows_into(name, r0, stacked[i])
        if item.base is not None:
            readers[item.base[0]].read_rows_into(item.base[1], r0, stacked[n])
        return stacked[:n], (stacked[n] if item.base is not None else None)

    merge_chunked(item.stage, item.name, item.shape, item.t, read, write, arena, step, kernels)


def _workers(device: torch.device) -> int:
    """Tensors merged at once: one per intra-op thread torch would use, at most 4 (each
    holds its tensor's inputs), one on an accelerator."""
    import torch

    return min(4, torch.get_num_threads()) if device.type == "cpu" else 1


def _open_all(stage, stages, allow_pickle, trust_remote_code) -> dict[str, CheckpointReader]:
    from evomerge.recipe.schema import stage_models

    readers: dict[str, CheckpointReader] = {}
    try:
        for ref in stage_models(stage):
            readers[str(ref)] = open_checkpoint(
                ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, stages=stages
            )
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    return readers


def merge_stage(
    stage: MergeStage,
    target: Path,
    *,
    stages: Mapping[str, Path],
    device: torch.device,
    allow_pickle: bool,
    trust_remote_code: bool,
    max_shard_bytes: int,
    progress: bool,
    extra_files: Mapping[str, str] | None = None,
    label: str = "merge",
) -> Path:
    """Merge one stage into `target` (written atomically)."""
    import torch
    from tqdm.auto import tqdm

    from evomerge.common.device import torch_threads
    from evomerge.merge.buffers import Arena
    from evomerge.merge.chunked import disk_kernels
    from evomerge.merge.pipeline import slot_map
    from evomerge.recipe.check import validate_layer_ranges

    readers = _open_all(stage, stages, allow_pickle, trust_remote_code)
    try:
        keys = list(readers)
        base_key = str(stage.base_model) if stage.base_model is not None else keys[0]
        check_compatible(readers, by_pattern=stage.slices is not None)
        validate_layer_ranges(stage, {k: num_layers(r.config) or 0 for k, r in readers.items()})
        vocab_names = [n for n in readers[base_key].keys() if is_vocab_tensor(n)]
        dirs = {k: r.path for k, r in readers.items()}
        rows = {k: r.shape(vocab_names[0])[0] for k, r in readers.items()} if vocab_names else {}
        vocab = plan_vocab(stage, dirs, rows, base_key) if vocab_names else None
        if vocab is None:
            for n in vocab_names:
                check_vocab_rows(n, {k: r.shape(n) for k, r in readers.items() if n in r.keys()})
        planner = plan_slices if stage.slices is not None else plan_models
        items, layer_map = planner(stage, readers, base_key)
        if vocab is not None and not vocab.identity:
            for it in items:
                if is_vocab_tensor(it.name):
                    it.shape = (vocab.vocab_size, *it.shape[1:])
        dtype = _out_dtype(stage, readers[base_key])
        config = output_config(readers[base_key].config, readers, layer_map, vocab, dtype)
        tok_src, tok_files = tokenizer_files(stage, vocab, dirs, base_key)
        workers = _workers(device)
        slots = [(Buffers(device), Buffers(device)) for _ in range(workers)]  # reads, methods
        arenas = [Arena() for _ in range(workers)]  # row chunks (CPU only)
        lock = threading.Lock()
        out: list[CheckpointWriter] = []
        steps = {it.name: _chunk_rows(it, readers, vocab) if device.type == "cpu" else None
                 for it in items}  # fmt: skip
        streamed = sum(math.prod(it.shape) for it in items if steps[it.name] is not None)
        kernels = disk_kernels(stage.merge_method, streamed)

        def merge(it: OutTensor, slot: int) -> tuple[OutTensor, torch.Tensor | None]:
            step = steps[it.name]
            if step is not None:  # written chunk by chunk from this thread
                write = lambda r0, t: out[0].write_rows(it.name, r0, t)  # noqa: E731
                _merge_in_chunks(it, readers, arenas[slot], step, write, kernels)
                return it, None
            bufs, scratch = slots[slot]
            return it, _merge_one(it, readers, bufs, scratch, vocab, dtype, lock)

        with (
            CheckpointWriter(target, max_shard_bytes=max_shard_bytes, dtype=dtype) as writer,
            torch_threads(1 if device.type == "cpu" else torch.get_num_threads()),
        ):
            writer.plan([(it.name, it.shape) for it in items])
            out.append(writer)
            # largest first: the last tensors to finish are small ones, not lm_head alone
            by_size = sorted(items, key=lambda it: -math.prod(it.shape))
            merged_items = slot_map(merge, by_size, workers)
            for it, merged in tqdm(merged_items, total=len(items), desc=label, unit="tensor",
                                   disable=not progress):  # fmt: skip
                if merged is not None:
                    writer.add(it.name, merged.to(dtype))
            files = {**tok_files, **(extra_files or {})}
            return writer.finish(config, copy_from=tok_src, files=files)
    finally:
        for r in readers.values():
            r.close()


def _out_dtype(stage: MergeStage, base: CheckpointReader) -> torch.dtype:
    if stage.out_dtype or stage.dtype:
        return torch_dtype(stage.out_dtype or stage.dtype)  # type: ignore[arg-type]
    for n in base.keys():
        dt = base.dtype(n)
        if dt.is_floating_point:
            return dt
    return torch_dtype("float32")


def _device(device: str) -> torch.device:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but torch.cuda.is_available() is False")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda, but got '{device}'")
    return torch.device(device)


def with_seeds(recipe: Recipe, seed: int | None) -> Recipe:
    """A copy whose stages carry the random_seed used: --seed overrides; a random method with
    no seed gets a fresh one, recorded so the merge can be reproduced from the saved recipe."""
    from evomerge.merge.table import get_method

    recipe = copy.deepcopy(recipe)
    for st in recipe.stages:
        if seed is not None:
            st.random_seed = seed
        elif st.random_seed is None and get_method(st.merge_method).random:
            st.random_seed = secrets.randbelow(2**31)
    return recipe


def model_card(recipe: Recipe) -> str:
    from evomerge.recipe.schema import stage_models

    final = recipe.final
    models = "\n".join(f"- {m}" for m in stage_models(final))
    return (
        "---\ntags:\n- merge\n- evomerge\n---\n\n# Merged model\n\n"
        f"Merged with [evomerge](https://github.com/) using **{final.merge_method}**"
        f"{f' over {len(recipe.stages)} stages' if len(recipe.stages) > 1 else ''}.\n\n"
        f"## Models\n\n{models}\n\n## Recipe\n\n"
        "Reproduce with `evomerge merge recipe.yaml OUT_DIR` "
        "(the recipe is mergekit-compatible YAML):\n\n```yaml\n"
    )


def merge_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Merge a recipe to disk; returns out_dir. Named intermediate stages live in a temporary
    folder beside the output and are removed at the end (success or failure)."""
    from evomerge.recipe.yaml_io import dump_recipe

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    dev = _device(device)
    recipe = with_seeds(recipe, seed)
    text = dump_recipe(recipe)
    extra = {"recipe.yaml": text, "README.md": model_card(recipe) + text + "```\n"}
    # the pid in the name: the writer's recover_out_dir() removes it only once this process is gone
    work = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}-stages")
    stages: dict[str, Path] = {}
    n = len(recipe.stages)
    try:
        for i, stage in enumerate(recipe.stages):
            final = i == n - 1
            name = stage.name or f"stage-{i}"
            # the folder is named by index: a stage name is a label, never a path
            target = out_dir if final else work / f"stage-{i}"
            merge_stage(
                stage, target, stages=stages, device=dev, allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code, max_shard_bytes=max_shard_bytes,
                progress=progress, extra_files=extra if final else None,
                label=f"merge {name}" if n > 1 else "merge",
            )  # fmt: skip
            if stage.name:
                stages[stage.name] = target
    except OSError as exc:  # disk full, permissions: the writer already removed its temp folder
        raise MergeError(f"{out_dir}: cannot write the merge: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def cli_merge(args: argparse.Namespace) -> int:
    from evomerge.recipe.yaml_io import load_recipe

    recipe = load_recipe(args.recipe)
    out = merge_recipe(
        recipe, args.out_dir, device=args.device, seed=args.seed, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, max_shard_bytes=parse_size(args.shard_size),
        progress=not args.no_progress,
    )  # fmt: skip
    print(out)
    return 0
