"""In-place candidates for the search: inputs resident, no disk per trial.

Every input model is loaded once and stacked per tensor  # (n_inputs, *shape), in its own
dtype when every source shares one that float32 holds exactly (bfloat16 sources stay
bfloat16: half the memory and half the bytes a trial reads; `fused` methods convert entry
by entry). The inputs live on the compute device, or in host memory when they would not fit
beside the engine (placement "host", chosen by loop/memory.py; see resident.py).

With device placement, the fused methods' magnitude orders, DARE/DELLA draws and ranks are
computed on first use and kept, so a trial costs one compiled pass (see kernel.py) straight
into the live parameters. Every other merge -- methods outside the fused kernels, and every
method on host-placed inputs -- runs the disk path's row-chunk pipeline over the resident
rows (resident.merge_rows: memory.rows_per_chunk rows at a time), so the working set is
memory.memory_figures' chunk buffers, not float32 copies of whole tensors.

Results equal `resolve.merge_tensor` (the disk path) bit for bit: both run the same method
functions on the same values, compiled kernels give the eager bits, and the cache only
memoizes data-only values computed by the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from evomerge.errors import ConfigError, MergeError, did_you_mean
from evomerge.merge import resident
from evomerge.merge.arch import gradient_t
from evomerge.merge.buffers import Arena
from evomerge.merge.chunked import chunkable
from evomerge.merge.contract import MergeInputs, Method
from evomerge.merge.memory import rows_per_chunk
from evomerge.merge.resolve import inputs_for_rows
from evomerge.merge.table import get_method
from evomerge.merge.threads import ThreadChoice
from evomerge.recipe.schema import base_index, input_refs

if TYPE_CHECKING:
    import torch

    from evomerge.recipe.schema import MergeStage


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


def _scalar_params(stage: MergeStage) -> bool:
    """True when no parameter is a gradient or a filter list: every tensor resolves alike."""
    blocks = [stage.parameters, *(m.parameters for m in stage.models)]
    return not any(isinstance(v, list) for block in blocks for v in block.values())


def _param_key(inputs: MergeInputs) -> tuple:
    """Equal for tensors that resolved to the same parameters (NaN equals NaN)."""
    model = tuple((k, v.numpy().tobytes()) for k, v in sorted(inputs.model_params.items()))
    return tuple(sorted((k, repr(v)) for k, v in inputs.params.items())), model


def _lowrank(keys: list[str], sources: Mapping[str, TensorSource], names: list[str]):
    """LowRankInputs for the adapter inputs whose base is an input too; None without any."""
    from evomerge.merge.lowrank import LowRankInputs, plan_rows

    owners = plan_rows(keys, sources)
    if all(o is None for o in owners):
        return None
    return LowRankInputs(keys, sources, names, owners)


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
        placement: str = "device",
    ) -> None:
        """compiled: run the fused kernels compiled (None: when available here and the
        inputs are large enough to repay compiling, COMPILE_MIN_ENTRIES).
        threads: intra-op threads of the fused kernels (None: on the CPU, 1 or torch's
        count, whichever `apply` measures faster (see threads.py); elsewhere torch's).
        placement: "device" (inputs resident on `device`) or "host" (on the CPU, pinned
        when `device` is CUDA; every candidate streams them in row chunks)."""
        import torch

        from evomerge.merge.buffers import Buffers
        from evomerge.merge.kernel import Kernels, compile_available
        from evomerge.merge.sparsify import SparsifyCache

        self._refs = input_refs(stage)
        self._keys = [str(r) for r in self._refs]
        for key in self._keys:
            if key not in sources:
                raise ConfigError(did_you_mean(key, sources, "model source"))
        bi = base_index(stage)
        first = sources[self._keys[0 if bi is None else bi]]
        names = list(first.keys()) if tensor_names is None else list(tensor_names)
        resident.check_placement(placement)
        self.device = device
        self.placement = placement
        self._home = device if placement == "device" else "cpu"  # where the rows live
        self._arena = Arena(device)  # row-chunk buffers (chunked.merge_chunked)
        self._lowrank = _lowrank(self._keys, sources, names)  # adapters as factors, or None
        dense = [k for i, k in enumerate(self._keys) if self._is_dense(i)]
        pin = placement == "host" and str(device).startswith("cuda")  # async chunk copies
        # (n, *shape) each, views of one (n, entries) buffer per dtype in self._flat
        self._flat, self._spans, self._rows = resident.load_rows(
            self._keys, dense, sources, names, self._home, pin
        )
        self._t = {name: gradient_t(name, num_layers) for name in names}
        self.cache = SparsifyCache()
        self._scratch = Buffers()
        if compiled is None:
            entries = sum(r[0].numel() for r in self._rows.values())
            compiled = compile_available(device) and entries >= COMPILE_MIN_ENTRIES
        self.kernels = Kernels(compiled=compiled)
        most = torch.get_num_threads()
        self.threads = threads or (None if str(device) == "cpu" else most)
        self._choice = ThreadChoice(most)  # used when threads is None

    @property
    def tensor_names(self) -> list[str]:
        return list(self._rows)

    def source_tensors(self, ref: str) -> Iterator[tuple[str, torch.Tensor]]:
        """One input model's resident tensors as they were read (views, not copies): what
        puts a live model back to that input, e.g. the base after a candidate."""
        import torch

        if ref not in self._keys:
            raise ConfigError(did_you_mean(ref, self._keys, "model source"))
        i = self._keys.index(ref)
        for name, rows in self._rows.items():
            if self._lowrank is None:
                yield name, rows[i]
            else:  # a fresh tensor: an adapter input has no resident rows
                out = torch.empty(rows.shape[1:], dtype=rows.dtype, device=rows.device)
                self._lowrank.expand_row(i, name, rows, out)
                yield name, out

    def _is_dense(self, i: int) -> bool:
        return self._lowrank is None or i in self._lowrank.dense_index

    def _stacked(self, name: str) -> torch.Tensor:
        """Every input's rows of `name`: the resident ones, or (with adapter inputs) expanded
        into a scratch buffer that the next tensor's expansion reuses."""
        rows = self._rows[name]
        if self._lowrank is None:
            return rows
        shape = (self._lowrank.n, *rows.shape[1:])
        out = self._scratch.get("lowrank-rows", shape, rows.dtype, rows.device)
        return self._lowrank.expand(name, rows, out)

    def _check(self, stage: MergeStage) -> None:
        refs = input_refs(stage)
        if refs != self._refs:
            raise ConfigError(
                "a candidate must merge the same models and base as the CandidateMerger was "
                f"built for: expected {self._keys}, but got {[str(r) for r in refs]}"
            )

    def kernel_threads(self, method: str) -> int | None:
        """The fused kernels' thread count for `method`: the fixed one, or the one measured
        faster so far (None before `apply` has timed both)."""
        return self.threads or self._choice.chosen(method)

    def chunk_rows(self, method: str, name: str) -> int | None:
        """Rows per chunk of tensor `name` when `method` merges it through the row-chunk
        pipeline (memory.rows_per_chunk, as the disk path), None when it merges whole
        (a fused method on device-resident inputs, a 1-D or one-row tensor)."""
        shape = tuple(self._rows[name].shape[1:])
        m = get_method(method)
        if not chunkable(m.name, shape) or (m.fused and self.placement == "device"):
            return None
        return rows_per_chunk(shape)

    def merged(self, stage: MergeStage) -> Iterator[tuple[str, torch.Tensor]]:
        """Each output tensor (float32, possibly a reused buffer: consume it before the next)."""
        threads = self.kernel_threads(stage.merge_method) or 1
        for names, merged in self._merge(stage, {}, threads):
            yield names[0], merged

    def _merge(
        self, stage: MergeStage, target: Mapping[str, torch.Tensor], threads: int
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(names, merged) per merge call: one tensor, or a run of them written into target
        as one flat tensor (see _runs)."""
        import torch

        from evomerge.common.device import torch_threads

        self._check(stage)
        method = get_method(stage.merge_method)
        with torch_threads(threads if method.fused else torch.get_num_threads()):
            for names, inputs in self._runs(stage, method, target):
                if inputs is None:  # row chunks, written into target (or a whole buffer)
                    yield names, self._chunked(stage, names[0], target)
                    continue
                inputs.kernels = self.kernels
                inputs.cache = self.cache
                inputs.scratch = self._scratch
                yield names, method.fn(inputs)

    def _chunked(self, stage: MergeStage, name: str, target: Mapping) -> torch.Tensor:
        """Merge `name` through chunked.merge_chunked over the resident rows: each chunk cast
        (and copied to the device) into one reused buffer, its merged rows written into
        target[name] -- or, without a target, into a whole float32 buffer (merged())."""
        import torch

        method = get_method(stage.merge_method)
        step = self.chunk_rows(method.name, name)
        assert step is not None
        rows = self._stacked(name)  # home rows (adapter inputs: expanded)
        dst = target.get(name)
        if dst is None:
            shape = tuple(rows.shape[1:])
            dst = self._scratch.get("streamed-out", shape, torch.float32, self.device)
        resident.merge_rows(stage, name, rows, self._t[name], dst, self._arena, step, self.kernels)
        return dst

    def _device_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows on the compute device (host-placed rows of a tensor merged whole: copied)."""
        return rows if rows.device == resident.compute_device(self.device) else rows.to(self.device)

    def _runs(
        self, stage: MergeStage, method: Method, target: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[list[str], MergeInputs | None]]:
        """Each merge call's tensor names and inputs (None: merged in row chunks, see
        _chunked). For an elementwise fused method, consecutive tensors resolved to equal
        parameters whose targets are consecutive in one float32 buffer form one call on the
        flat columns: with scalar parameters and a packed target (LiveWorkbench packs the
        model), a whole model in one kernel call."""
        if self._lowrank is not None:  # no flat columns of every input: one tensor a call
            for name in self._rows:
                if self.chunk_rows(method.name, name) is not None:
                    yield [name], None
                    continue
                inputs = inputs_for_rows(stage, name, self._stacked(name), self._t[name])
                yield [name], self._joined([name], inputs, method, target)
            return
        batch = method.fused and method.elementwise and bool(target)
        uniform = batch and _scalar_params(stage)  # every tensor resolves the same
        run: list[str] = []
        key, resolved = None, None
        for name, rows in self._rows.items():
            if self.chunk_rows(method.name, name) is not None:
                if run:
                    yield run, self._joined(run, resolved, method, target)
                run, key, resolved = [], None, None
                yield [name], None
                continue
            if uniform and resolved is not None:
                inputs, k = resolved, key
            else:
                inputs = inputs_for_rows(stage, name, rows, self._t[name])
                k = _param_key(inputs) if batch else None
            if run and batch and k == key and self._follows(run[-1], name, target):
                run.append(name)
                continue
            if run:
                yield run, self._joined(run, resolved, method, target)
            run, key, resolved = [name], k, inputs
        if run:
            yield run, self._joined(run, resolved, method, target)

    def _follows(self, prev: str, name: str, target: Mapping[str, torch.Tensor]) -> bool:
        """Whether `name` continues `prev`: next columns of the same flat inputs, and next
        entries of the same float32 target storage."""
        (dt0, _, b0), (dt1, a1, _) = self._spans[prev], self._spans[name]
        if dt0 != dt1 or b0 != a1:
            return False
        t0 = _writable(target.get(prev), self._rows[prev].shape[1:], self._rows[prev].device)
        t1 = _writable(target.get(name), self._rows[name].shape[1:], self._rows[name].device)
        return (
            t0 is not None
            and t1 is not None
            and t0.untyped_storage().data_ptr() == t1.untyped_storage().data_ptr()
            and t1.storage_offset() == t0.storage_offset() + t0.numel()
        )

    def _joined(
        self, run: list[str], inputs: MergeInputs, method: Method, target: Mapping
    ) -> MergeInputs:
        """inputs over the run's rows: one tensor's own (float32 unless the method is
        fused), or the run's flat columns."""
        import torch

        first = run[0]
        if len(run) == 1:
            # the tensor's own rows (inputs may be a uniform run's, resolved for another)
            rows = self._rows[first] if self._lowrank is None else inputs.models
            rows = self._device_rows(rows)
            if not method.fused and rows.dtype != torch.float32:
                rows = rows.to(torch.float32)
            out = _writable(target.get(first), rows.shape[1:], rows.device)
        else:
            dtype, a, _ = self._spans[first]
            b = self._spans[run[-1]][2]
            rows = self._flat[dtype][:, a:b]
            out = torch.as_strided(target[first], (b - a,), (1,))
        bi = inputs.base_index
        base = None if bi is None else rows[bi]
        return replace(inputs, tensor_name=first, models=rows, base=base, out=out)

    def apply(self, stage: MergeStage, target: Mapping[str, torch.Tensor]) -> None:
        """Write every merged tensor into target[name] in place (copy_, dtype cast allowed).

        A float32 contiguous target on the inputs' device is written directly by methods
        that support it (linear, the task-arithmetic family): no intermediate copy; when
        the target's tensors are views of one buffer in this merger's tensor order (see
        packed_target, HFBackend.pack_live), runs of them are merged in one call.
        """
        import torch

        missing = [n for n in self._rows if n not in target]
        if missing:
            raise MergeError(
                f"the target model has no parameter for {len(missing)} merged tensor(s), "
                f"e.g. '{missing[0]}'"
            )
        with torch.no_grad():
            if self.threads:
                self._write(stage, target, self.threads)
            else:
                self._choice.run(stage.merge_method, lambda n: self._write(stage, target, n))

    def _write(self, stage: MergeStage, target: Mapping[str, torch.Tensor], threads: int) -> None:
        import torch

        for names, tensor in self._merge(stage, target, threads):
            dst = target[names[0]]
            if len(names) > 1:  # a run: its entries, which the method normally wrote itself
                dst = torch.as_strided(dst, (tensor.numel(),), (1,))
                if tensor.data_ptr() != dst.data_ptr():
                    dst.copy_(tensor.reshape(-1))
            elif tensor is not dst:
                dst.copy_(tensor)

    def packed_target(self) -> dict[str, torch.Tensor]:
        """Float32 tensors for every merged tensor (uninitialized), views of one buffer in
        this merger's order: the layout `apply` merges fastest into, the one
        HFBackend.pack_live gives the live model."""
        import torch

        sizes = {name: rows[0].numel() for name, rows in self._rows.items()}
        flat = torch.empty(sum(sizes.values()), device=self.device)
        out, a = {}, 0
        for name, size in sizes.items():
            out[name] = flat[a : a + size].view(self._rows[name].shape[1:])
            a += size
        return out

    def nbytes_per_entry(self) -> float:
        """Bytes of resident inputs per merged entry: what a fused candidate reads (mask
        statistics aside) for each float32 entry it writes."""
        rows = self._rows.values()
        return sum(r.numel() * r.element_size() for r in rows) / sum(r[0].numel() for r in rows)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident inputs: the dense rows, plus adapters' factors (and their
        modules_to_save copies) where an adapter input's base is an input too."""
        dense = sum(f.numel() * f.element_size() for f in self._flat.values())
        return dense + (0 if self._lowrank is None else self._lowrank.nbytes())

    def nbytes(self) -> int:
        """Resident bytes: inputs and cached mask statistics."""
        return self.resident_bytes + self.cache.nbytes()
