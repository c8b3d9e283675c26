"""In-place candidates for the search: inputs resident on the device, no disk per trial.

Every input model is loaded once and stacked per tensor  # (n_inputs, *shape), in its own
dtype when every source shares one that float32 holds exactly (bfloat16 sources stay
bfloat16: half the memory and half the bytes a trial reads; `fused` methods convert entry
by entry, others get a float32 copy per call). Magnitude orders, DARE/DELLA draws and
ranks (and, for methods outside the fused kernels, task vectors) are computed on first use
and kept, so a trial costs only the parameter-dependent arithmetic: for the fused methods
one compiled pass (see kernel.py) straight into the live parameters.

Results equal `resolve.merge_tensor` (the disk path) bit for bit: both run the same method
functions on the same values, compiled kernels give the eager bits, and the cache only
memoizes data-only values computed by the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from evomerge.errors import ConfigError, MergeError, did_you_mean
from evomerge.merge.arch import gradient_t
from evomerge.merge.registry import get_method
from evomerge.merge.resolve import base_index, input_refs, inputs_for_rows

if TYPE_CHECKING:
    import torch

    from evomerge.recipe import MergeStage


class TensorSource(Protocol):
    def keys(self): ...

    def get_tensor(self, name: str) -> torch.Tensor: ...


COMPILE_MIN_ENTRIES = 1 << 26  # below ~64M entries per input, eager chunks cost no more


def _writable(t: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """t when a method may write the merged tensor straight into it, else None."""
    import torch

    ok = (
        t is not None
        and t.dtype == torch.float32
        and t.device == device
        and t.is_contiguous()
        and tuple(t.shape) == tuple(shape)
    )
    return t if ok else None


class CandidateMerger:
    """Merge candidates of one stage's models/base into live parameters, many times over."""

    def __init__(
        self,
        stage: MergeStage,
        sources: Mapping[str, TensorSource],
        *,
        num_layers: int,
        device: str = "cpu",
        tensor_names: Sequence[str] | None = None,
        compiled: bool | None = None,
        threads: int | None = None,
    ) -> None:
        """compiled: run the fused kernels compiled (None: when available here and the
        inputs are large enough to repay compiling, COMPILE_MIN_ENTRIES).
        threads: intra-op threads of the fused kernels (None: 1 on the CPU; on a busy
        machine one barrier per tensor waiting for a preempted worker made 2 threads up to
        40x slower than 1, while 2 threads gain at most the bandwidth of a second core)."""
        import torch

        from evomerge.merge.kernel import Kernels, compile_available
        from evomerge.merge.methods import Scratch
        from evomerge.merge.sparsify import SparsifyCache

        self._refs = input_refs(stage)
        self._keys = [str(r) for r in self._refs]
        for key in self._keys:
            if key not in sources:
                raise ConfigError(did_you_mean(key, sources, "model source"))
        bi = base_index(stage)
        first = sources[self._keys[0 if bi is None else bi]]
        names = list(first.keys()) if tensor_names is None else list(tensor_names)
        self.device = device
        self._rows = {name: self._load(name, sources) for name in names}  # (n, *shape) each
        self._t = {name: gradient_t(name, num_layers) for name in names}
        self._deltas: dict[str, torch.Tensor] = {}
        self.cache = SparsifyCache()
        self._scratch = Scratch()
        if compiled is None:
            entries = sum(r[0].numel() for r in self._rows.values())
            compiled = compile_available(device) and entries >= COMPILE_MIN_ENTRIES
        self.kernels = Kernels(compiled=compiled)
        self.threads = threads or (1 if str(device) == "cpu" else torch.get_num_threads())

    @property
    def tensor_names(self) -> list[str]:
        return list(self._rows)

    def _load(self, name: str, sources: Mapping[str, TensorSource]) -> torch.Tensor:
        import torch

        tensors = []
        for key in self._keys:
            try:
                tensors.append(sources[key].get_tensor(name))
            except KeyError:
                raise MergeError(f"model '{key}' has no tensor '{name}'") from None
        shapes = {tuple(x.shape) for x in tensors}
        if len(shapes) > 1:
            pairs = zip(self._keys, tensors, strict=True)
            got = ", ".join(f"{k}: {tuple(x.shape)}" for k, x in pairs)
            raise MergeError(f"tensor '{name}' has different shapes across models: {got}")
        dtypes = {x.dtype for x in tensors}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dtype = torch.float32
        rows = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=self.device)
        for i, x in enumerate(tensors):
            rows[i].copy_(x)  # one copy per input; the source may be mmapped
        return rows

    def _check(self, stage: MergeStage) -> None:
        refs = input_refs(stage)
        if refs != self._refs:
            raise ConfigError(
                "a candidate must merge the same models and base as the CandidateMerger was "
                f"built for: expected {self._keys}, but got {[str(r) for r in refs]}"
            )

    def merged(self, stage: MergeStage) -> Iterator[tuple[str, torch.Tensor]]:
        """Each output tensor (float32, possibly a reused buffer: consume it before the next)."""
        return self._merge(stage, {})

    def _merge(
        self, stage: MergeStage, target: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        from evomerge.merge.methods import task_vectors
        from evomerge.merge.pipeline import intra_op_threads

        self._check(stage)
        method = get_method(stage.merge_method)
        for name, rows in self._rows.items():
            if not method.fused and rows.dtype != torch.float32:
                rows = rows.to(torch.float32)
            inputs = inputs_for_rows(stage, name, rows, self._t[name])
            inputs.kernels = self.kernels
            if method.task_vectors and not method.fused and inputs.base is not None:
                deltas = self._deltas.get(name)
                if deltas is None:
                    deltas = self._deltas[name] = task_vectors(inputs)
                inputs.deltas = deltas
            inputs.cache = self.cache
            inputs.scratch = self._scratch
            inputs.out = _writable(target.get(name), rows.shape[1:], rows.device)
            with intra_op_threads(self.threads if method.fused else torch.get_num_threads()):
                merged = method.fn(inputs)
            yield name, merged

    def apply(self, stage: MergeStage, target: Mapping[str, torch.Tensor]) -> None:
        """Write every merged tensor into target[name] in place (copy_, dtype cast allowed).

        A float32 contiguous target on the inputs' device is written directly by methods
        that support it (linear, the task-arithmetic family): no intermediate copy.
        """
        import torch

        missing = [n for n in self._rows if n not in target]
        if missing:
            raise MergeError(
                f"the target model has no parameter for {len(missing)} merged tensor(s), "
                f"e.g. '{missing[0]}'"
            )
        with torch.no_grad():
            for name, tensor in self._merge(stage, target):
                if tensor is not target[name]:
                    target[name].copy_(tensor)

    def nbytes_per_entry(self) -> float:
        """Bytes of resident inputs per merged entry: what a fused candidate reads (mask
        statistics aside) for each float32 entry it writes."""
        rows = self._rows.values()
        return sum(r.numel() * r.element_size() for r in rows) / sum(r[0].numel() for r in rows)

    def nbytes(self) -> int:
        """Resident bytes: inputs, task vectors and cached mask statistics."""
        tensors = [*self._rows.values(), *self._deltas.values()]
        return sum(x.numel() * x.element_size() for x in tensors) + self.cache.nbytes()
