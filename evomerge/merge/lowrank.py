"""LoRA inputs of a CandidateMerger kept as their low-rank factors, not as dense model copies.

An input `BASE+ADAPTER` whose BASE is itself one of the stage's inputs needs no rows of its own:
a tensor the adapter does not touch is the base's row, and a touched one is the base's row plus
scale * B @ A. Only the factors (float32, on the CPU) and modules_to_save copies stay resident;
`expand` writes one tensor's full input rows into a scratch buffer per candidate, with the same
operations in the same order as lora.LoraReader.read_into, so the values equal the disk path's
bit for bit (the delta is computed on the CPU, as the reader computes it, then moved).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Factors:
    """scale * B @ A (transposed when `transpose`); a lora_bias entry has `a` None."""

    a: torch.Tensor | None
    b: torch.Tensor
    scale: float
    transpose: bool

    def delta(self) -> torch.Tensor:
        """As LoraAdapter.delta computes it (float32, CPU)."""
        if self.a is None:
            return self.b * self.scale
        out = self.b @ self.a
        return (out.T if self.transpose else out) * self.scale


def _folder(src: Any) -> Path | None:
    path = getattr(src, "path", None)
    return None if path is None else Path(path).resolve()


def plan_rows(keys: list[str], sources: Mapping[str, Any]) -> list[int | None]:
    """For each input: None when it is read densely, else the index of the input whose rows are
    its base (a plain input read from the adapter's base folder)."""
    plain = {}
    for i, key in enumerate(keys):
        src = sources[key]
        if getattr(src, "adapter", None) is None and _folder(src) is not None:
            plain.setdefault(_folder(src), i)
    owners: list[int | None] = []
    for key in keys:
        src = sources[key]
        adapter = getattr(src, "adapter", None)
        owners.append(None if adapter is None else plain.get(_folder(src.base)))
    return owners


class LowRankInputs:
    """The adapter inputs of one merger: per input, its base row's index and its factors."""

    def __init__(
        self, keys: list[str], sources: Mapping[str, Any], names: list[str], owners: list
    ) -> None:
        self.n = len(keys)
        dense = [i for i, o in enumerate(owners) if o is None]
        self.dense_index = {i: k for k, i in enumerate(dense)}  # input -> row of the dense stack
        self.owner = {i: self.dense_index[o] for i, o in enumerate(owners) if o is not None}
        self.factors: dict[int, dict[str, Factors]] = {}
        self.replaced: dict[int, dict[str, torch.Tensor]] = {}
        wanted = set(names)
        for i in self.owner:
            adapter = sources[keys[i]].adapter
            self.factors[i] = {
                name: _read(adapter, f) for name, f in adapter.factors.items() if name in wanted
            }
            self.replaced[i] = {  # modules_to_save: a full tensor, as the reader gives it
                name: adapter.replacement(name).float()
                for name in adapter.replaced
                if name in wanted
            }

    def nbytes(self) -> int:
        tensors = [t for rep in self.replaced.values() for t in rep.values()]
        for per in self.factors.values():
            for f in per.values():
                tensors += [f.b] if f.a is None else [f.a, f.b]
        return sum(t.numel() * t.element_size() for t in tensors)

    def expand_row(self, i: int, name: str, dense: torch.Tensor, out: torch.Tensor) -> None:
        """Input i's tensor `name` into `out` (the resident dtype); dense: (n_dense, *shape)."""
        import torch

        if i not in self.owner:
            out.copy_(dense[self.dense_index[i]])
            return
        base = dense[self.owner[i]]
        if name in self.replaced[i]:
            out.copy_(self.replaced[i][name])
            return
        f = self.factors[i].get(name)
        if f is None:
            out.copy_(base)
        elif out.dtype == torch.float32:
            out.copy_(base)
            out.add_(f.delta().to(out.device))
        else:
            out.copy_(base.float() + f.delta().to(base.device))

    def expand(self, name: str, dense: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Every input's rows of `name` into out  # (n, *shape)"""
        for i in range(self.n):
            self.expand_row(i, name, dense, out[i])
        return out


def _read(adapter: Any, f: Any) -> Factors:
    b = adapter._file.get_tensor(f.b_key).float()
    if f.bias:
        return Factors(None, b, f.scale, False)
    return Factors(adapter._file.get_tensor(f.a_key).float(), b, f.scale, f.transpose)
