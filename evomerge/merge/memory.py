"""The memory figures of a disk merge, in one place: the engine, in-place candidates and
`evomerge plan` read them here, so a plan's estimate and the merge agree.

A disk merge reads each large tensor in ROW CHUNKS of at most `chunk_bytes()` of float32 per
input (32 MiB unless EVOMERGE_CHUNK_BYTES says otherwise), so its working set is a few chunks,
not a few whole tensors. Methods whose statistic spans the whole tensor (TIES / breadcrumbs
magnitude thresholds, DARE / DELLA rescale norms, the dot products of slerp, nuslerp,
multislerp, karcher and model_stock, sce's variance cut and norms) compute it in earlier
streaming passes over the same chunks (merge/chunked.py, twopass.py, sce.py). Every method
of the table streams.
Pure Python, no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from evomerge.errors import ConfigError

# float32 bytes per input per chunk: 8M entries, plenty to amortize a chunk's Python work;
# 64 MiB put a 7B DELLA merge (two workers, ~30 bytes per entry each) over 2 GB
DEFAULT_CHUNK_BYTES = 32 << 20
ENV_CHUNK_BYTES = "EVOMERGE_CHUNK_BYTES"

# extra bytes per entry beyond the inputs and the float32 output, per merged model row:
# GTA's |delta| (4) for magnitude cuts, 16-bit draws and the uint8 keep-mask (2 + 1) for
# DARE, draws + int32 ranks + the keep-mask (2 + 4 + 1) for DELLA (its |delta| is made a
# cache-sized block at a time)
_EXTRA_PER_ROW = {None: 0.0, "magnitude": 4.0, "breadcrumbs": 4.0, "random": 3.0, "della": 7.0}
# bytes per entry of a WHOLE tensor (not a chunk), per merged model row: DARE / DELLA keep
# their random masks as bits between the rescale pass and the last one (chunked.py)
_WHOLE_PER_ROW = {"random": 1 / 8, "della": 1 / 8}
# two-pass methods (twopass.py, sce.py): float32 task vectors or products per model row
# (4), plus sce's variance and its output buffer (4 + 4 per entry, not per row)
_TWO_PASS_EXTRA = {"sce": (4.0, 8.0)}
TWO_PASS = frozenset({"slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce"})
STREAMED = frozenset(  # methods whose disk merge streams every tensor of 2+ dims in row chunks
    {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
     "della", "della_linear", "linear", "nearswap", "passthrough", *TWO_PASS}
)  # fmt: skip


def chunk_bytes() -> int:
    """Float32 bytes per input per row chunk (EVOMERGE_CHUNK_BYTES overrides; tests set it
    tiny to force many chunks)."""
    raw = os.environ.get(ENV_CHUNK_BYTES)
    if raw is None:
        return DEFAULT_CHUNK_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 4:
        raise ConfigError(
            f"{ENV_CHUNK_BYTES} must be an integer number of bytes >= 4, but got {raw!r}"
        )
    return value


def rows_per_chunk(shape: tuple[int, ...], budget: int | None = None) -> int:
    """Rows of dim 0 per chunk so that one input's float32 chunk fits the budget (>= 1)."""
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, (budget or chunk_bytes()) // max(1, 4 * row))


@dataclass(frozen=True)
class MemoryFigures:
    """What one merge job holds per merged entry, and how many entries at once.

    chunk_entries: entries per input per chunk on the disk path (None: whole tensors);
    bytes_per_entry: inputs (input_bytes each) + float32 output + the method's extras;
    whole_bytes_per_entry: what the job holds per entry of its whole tensor (masks as bits).
    """

    method: str
    chunk_entries: int | None
    bytes_per_entry: float
    whole_bytes_per_entry: float = 0.0

    def peak_bytes(self, largest_entries: int, workers: int = 1) -> int:
        """Working set of `workers` jobs on tensors of at most `largest_entries` entries."""
        n = largest_entries if self.chunk_entries is None else self.chunk_entries
        per_job = min(n, largest_entries) * self.bytes_per_entry
        return int(workers * (per_job + largest_entries * self.whole_bytes_per_entry))


def memory_figures(method: str, n_inputs: int, input_bytes: float = 4.0) -> MemoryFigures:
    """The chunk size and per-entry bytes of `method` over n_inputs input rows."""
    from evomerge.merge.table import get_method

    m = get_method(method)
    kind = dict(m.options).get("kind") if m.options else None
    rows = max(1, n_inputs - (1 if m.needs_base else 0))
    extra = _EXTRA_PER_ROW.get(kind, 0.0) * rows
    if m.name in TWO_PASS:
        per_row, per_entry = _TWO_PASS_EXTRA.get(m.name, (4.0, 0.0))
        extra = per_row * rows + per_entry
    if m.name not in STREAMED:  # whole tensors in float32, plus a few temporaries of each
        return MemoryFigures(m.name, None, n_inputs * 4.0 + 4.0 + 3 * 4.0 * rows)
    held = input_bytes if m.fused else 4.0
    whole = _WHOLE_PER_ROW.get(kind, 0.0) * rows
    return MemoryFigures(m.name, chunk_bytes() // 4, n_inputs * held + 4.0 + extra, whole)
