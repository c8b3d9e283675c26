"""The resident input rows of a CandidateMerger: what they are, where they live, and how a
candidate merges them in row chunks.

Placement "device": the rows live on the compute device. Placement "host": on the CPU
(pinned when the device is CUDA, so chunks copy asynchronously); every candidate streams
them. Either way a merge in row chunks runs the disk path's pipeline (chunked.merge_chunked)
with the candidate's rows as its reader: each chunk cast (and copied to the device) into one
reused buffer of memory.rows_per_chunk rows, its merged rows written into the destination.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, MergeError, did_you_mean
from evomerge.merge.buffers import Arena

if TYPE_CHECKING:
    import torch

    from evomerge.merge.kernel import Kernels
    from evomerge.recipe.schema import MergeStage

PLACEMENTS = ("device", "host")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ConfigError(did_you_mean(placement, PLACEMENTS, "inputs placement"))


def compute_device(device: Any) -> torch.device:
    """torch.device of `device`, with the index a CUDA tensor carries."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def tensor_meta(keys: list[str], sources: Mapping[str, Any], name: str) -> tuple[tuple, Any]:
    """(shape, resident dtype) of tensor `name`, the same in every model (else ConfigError)."""
    import torch

    shapes, dtypes = [], []
    for key in keys:
        src = sources[key]
        try:
            if hasattr(src, "shape") and hasattr(src, "dtype"):  # CheckpointReader: no read
                shape, dtype = tuple(src.shape(name)), src.dtype(name)
            else:
                t = src.get_tensor(name)
                shape, dtype = tuple(t.shape), t.dtype
        except (KeyError, MergeError):  # models that do not fit together: bad input
            raise ConfigError(f"model '{key}' has no tensor '{name}'") from None
        shapes.append(shape)
        dtypes.append(dtype)
    if len(set(shapes)) > 1:
        got = ", ".join(f"{k}: {s}" for k, s in zip(keys, shapes, strict=True))
        raise ConfigError(f"tensor '{name}' has different shapes across models: {got}")
    dtype = dtypes[0] if len(set(dtypes)) == 1 else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        dtype = torch.float32
    return shapes[0], dtype


def merge_rows(
    stage: MergeStage, name: str, rows: torch.Tensor, t: float, dst: torch.Tensor,
    arena: Arena, step: int, kernels: Kernels | None = None,
) -> None:  # fmt: skip
    """Merge tensor `name` from its input rows  # (len(input_refs(stage)), *shape), wherever
    they live, into dst (any float dtype, on the compute device) in chunks of `step` rows."""
    import torch

    from evomerge.merge import chunked
    from evomerge.merge.table import get_method

    shape = tuple(rows.shape[1:])
    dtype = rows.dtype if get_method(stage.merge_method).fused else torch.float32  # stack_rows
    n_listed = len(stage.models)

    def read(r0: int, r1: int):
        # an unlisted base is the row right after the models: stack_rows uses it in place
        buf = arena.get("models", (rows.shape[0], r1 - r0, *shape[1:]), dtype)
        for i in range(rows.shape[0]):  # contiguous per input: async from pinned rows
            buf[i].copy_(rows[i, r0:r1], non_blocking=True)
        return buf[:n_listed], (buf[n_listed] if rows.shape[0] > n_listed else None)

    def write(r0: int, merged: torch.Tensor) -> None:
        dst[r0 : r0 + merged.shape[0]].copy_(merged)

    chunked.merge_chunked(stage, name, shape, t, read, write, arena, step, kernels or chunked.EAGER)


def load_rows(
    keys: list[str], dense: list[str], sources: Mapping[str, Any], names: list[str],
    device: Any, pin: bool,
) -> tuple[dict, dict, dict]:  # fmt: skip
    """(flat, spans, rows): every tensor's stacked inputs (the `dense` ones: adapters of an
    input base stay low-rank), as views `rows` of one (n_dense, entries) buffer per dtype
    `flat`; `spans`: name -> (dtype, first column, end column). Consecutive tensors are
    consecutive columns, so an elementwise method merges a run of tensors with equal
    parameters as one flat tensor (CandidateMerger._runs)."""
    import torch

    metas = {name: tensor_meta(keys, sources, name) for name in names}  # checks, then loads
    totals: dict = {}
    spans = {}
    for name, (shape, dtype) in metas.items():
        a = totals.get(dtype, 0)
        totals[dtype] = b = a + math.prod(shape)
        spans[name] = (dtype, a, b)
    n = len(dense)
    flat = {
        dt: torch.empty((n, total), dtype=dt, device=device, pin_memory=pin)
        for dt, total in totals.items()
    }
    rows = {}
    for name, (dtype, a, b) in spans.items():
        r = rows[name] = flat[dtype][:, a:b].view(n, *metas[name][0])
        for i, key in enumerate(dense):
            src = sources[key]
            if hasattr(src, "read_into"):  # straight from the file into the row
                src.read_into(name, r[i])
            else:
                r[i].copy_(src.get_tensor(name))
    return flat, spans, rows
