"""Per-rank shards for a tensor-parallel engine: learn which part of each checkpoint tensor a
rank's weight loaders read, then hand each rank only that part.

vLLM's loaders take full checkpoint tensors and cut their rank's part themselves with
`narrow(dim, start, length)` (column-parallel and fused q/k/v, gate/up: rows; row-parallel:
columns; vocabulary-parallel embeddings and heads: rows of the padded vocabulary). Rather than
re-implementing those rules per architecture, a rank records, while it loads full tensors once,
every use its loaders make of each tensor (`ReadRecorder`). A tensor whose only uses are
identical narrows gets a slice; any other use (a copy of the whole, a view, a transpose, use as
a second argument) leaves it whole. Later pushes give the loader a tensor of the full shape
holding only that slice (`embed_slice`); the loader narrows it and reads exactly the part that
was sent. Nothing here imports vLLM.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Slice = tuple[int, int, int]  # (dim, start, length) of a checkpoint tensor that one rank reads

# uses that read no tensor data: shape queries and non-tensor properties
_METADATA = frozenset(
    "shape dtype device ndim layout is_cuda is_cpu is_meta is_sparse is_quantized "
    "requires_grad size dim numel nelement stride is_contiguous element_size".split()
)


def _use_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: its descriptor names it (`shape`, `data`, `T`, ...)
        return "." + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
    return str(name)


class ReadRecorder(TorchFunctionMode):
    """Within `with`: how torch functions use the tensors registered with `track`."""

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[int, str] = {}
        self.uses: dict[str, list[Slice | None]] = {}  # None: a use that may read anything

    def track(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self._names[id(tensor)] = name
        # forget the id when the tensor dies: a later object may get the same id
        weakref.finalize(tensor, self._names.pop, id(tensor), None)
        self.uses.setdefault(name, [])
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for pos, arg in enumerate([*args, *kwargs.values()]):
            name = self._names.get(id(arg))
            if name is None:
                continue
            use = _use_name(func)
            if pos == 0 and use == "narrow":
                self.uses[name].append(_narrow_args(args, kwargs))
            elif not (pos == 0 and use.lstrip(".") in _METADATA):
                self.uses[name].append(None)
        return func(*args, **kwargs)

    def layout(self) -> dict[str, Slice]:
        """The tensors this rank read only one slice of (the others must travel whole)."""
        out = {}
        for name, uses in self.uses.items():
            if uses and None not in uses and len(set(uses)) == 1:
                out[name] = uses[0]  # type: ignore[assignment]
        return out


def _narrow_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Slice | None:
    given = list(args[1:4])
    for key in ("dim", "start", "length")[len(given) :]:
        if key not in kwargs:
            return None
        given.append(kwargs[key])
    try:
        dim, start, length = (int(x) for x in given)
    except (TypeError, ValueError):  # a tensor start, for example: not a plain slice
        return None
    return dim, start, length


def cut(tensor: torch.Tensor, where: Slice | None) -> torch.Tensor:
    """The part of a full checkpoint tensor that one rank reads (all of it for None)."""
    return tensor if where is None else tensor.narrow(*where)


def embed_slice(
    part: torch.Tensor, shape: tuple[int, ...], where: Slice, fill: float | None
) -> torch.Tensor:
    """A tensor of the checkpoint's full shape holding `part` at `where`; the rest is `fill`
    (NaN makes a loader that reads outside its slice poison the scores instead of reading
    stale memory) or left uninitialized (None: nothing but the slice is written)."""
    full = torch.empty(shape, dtype=part.dtype, device=part.device)
    if fill is not None and full.is_floating_point():
        full.fill_(fill)
    full.narrow(*where).copy_(part)
    return full
