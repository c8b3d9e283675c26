"""Checkpoint reading: a lazy reader, one tensor at a time (the writer is in writer.py).

Safetensors are parsed (stfile.py) rather than memory-mapped: reading a tensor's bytes
straight into a reused buffer costs no allocation, and pages of the source files never count
in this process's resident memory (a mmap'd model would, for every file touched).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.stfile import ST_DTYPES, StFile

if TYPE_CHECKING:
    import torch

    from evomerge.recipe.schema import ModelRef

MARKER = ".evomerge-output"  # written into every output folder: safe to overwrite later
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def torch_dtype(name: str) -> torch.dtype:
    """`bfloat16` / `bf16` / `float32`... -> torch dtype; ConfigError for an unknown name."""
    import torch

    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}  # fmt: skip
    key = aliases.get(name, name.removeprefix("torch."))
    dt = getattr(torch, key, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"dtype must be e.g. float32, bfloat16 or float16, but got '{name}'")
    return dt


class CheckpointReader:
    """A checkpoint folder read lazily, one tensor at a time.

    `get_tensor` returns a fresh tensor; `read_into` copies into a caller's (reused) buffer,
    converting dtype on the way, which is what the streaming merge uses.
    """

    def __init__(self, path: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.path = Path(path)
        self.trust_remote_code = trust_remote_code
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"expected a model folder with config.json, but {self.path} has none")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except ValueError as exc:
            raise ConfigError(f"{cfg_file}: not valid JSON ({exc})") from None
        self._files: dict[str, StFile] = {}
        self._pickles: dict[str, dict[str, torch.Tensor]] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._raw: torch.Tensor | None = None  # whole-tensor reads (callers serialize them)
        self._staging = threading.local()  # row-chunk reads: one staging buffer per thread
        self._open_lock = threading.Lock()
        self._rows_checked: dict[str, int] = {}  # tensor -> rows 0.. already checked finite
        self._index_weights(allow_pickle)

    # ---- discovery -------------------------------------------------------------------------
    def _index_weights(self, allow_pickle: bool) -> None:
        p = self.path
        if (p / INDEX).is_file():
            self._where = dict(json.loads((p / INDEX).read_text())["weight_map"])
        elif (p / "model.safetensors").is_file():
            self._where = dict.fromkeys(
                self._open("model.safetensors").entries, "model.safetensors"
            )
        elif any(p.glob("*.safetensors")):
            for f in sorted(p.glob("*.safetensors")):
                self._where.update(dict.fromkeys(self._open(f.name).entries, f.name))
        elif (p / "pytorch_model.bin.index.json").is_file() or (p / "pytorch_model.bin").is_file():
            if not allow_pickle:
                raise ConfigError(
                    f"{p} holds only .bin pickle weights, which can run code when loaded; "
                    "pass --allow-pickle to load them (with torch.load(weights_only=True))"
                )
            idx = p / "pytorch_model.bin.index.json"
            if idx.is_file():
                self._where = dict(json.loads(idx.read_text())["weight_map"])
            else:
                self._where = dict.fromkeys(
                    self._load_pickle("pytorch_model.bin"), "pytorch_model.bin"
                )
        else:
            raise ConfigError(f"expected safetensors weights in {p}, but found none")

    def _open(self, fname: str) -> StFile:
        with self._open_lock:  # worker threads open files as their tensors need them
            f = self._files.get(fname)
            if f is None:
                if not (self.path / fname).is_file():
                    raise MergeError(
                        f"{self.path}: weight file '{fname}' named in the index is missing"
                    )
                f = self._files[fname] = StFile(self.path / fname)
            return f

    def _load_pickle(self, fname: str) -> dict[str, torch.Tensor]:
        import torch

        if fname not in self._pickles:
            try:
                sd = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise MergeError(f"{self.path / fname}: cannot be loaded ({exc})") from None
            self._pickles = {fname: sd}  # keep one pickle file at a time
        return self._pickles[fname]

    # ---- API -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def _entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        fname = self._where.get(name)
        if fname is None:
            raise MergeError(f"{self.path}: has no tensor '{name}'")
        if fname.endswith(".safetensors"):
            code, shape, _, _ = self._open(fname).entries[name]
            return ST_DTYPES[code], shape
        t = self._load_pickle(fname)[name]
        return str(t.dtype).removeprefix("torch."), tuple(t.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype_name(self, name: str) -> str:
        """The tensor's dtype as torch names it ("bfloat16"), from the header: no torch import
        (`evomerge plan` reads a 7B model's headers in well under a second)."""
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        import torch

        return getattr(torch, self._entry(name)[0])

    def _typed(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype; for safetensors a view of a reused byte buffer."""
        import torch

        fname = self._where.get(name)
        if fname is None:
            raise MergeError(f"{self.path}: has no tensor '{name}'")
        if not fname.endswith(".safetensors"):
            return self._load_pickle(fname)[name]
        f = self._open(fname)
        _, _, begin, end = f.entries[name]
        if self._raw is None or self._raw.numel() < end - begin:
            self._raw = torch.empty(end - begin, dtype=torch.uint8)
        return f.read_raw(name, self._raw)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` into `out` (any dtype/device, same shape); checks it is finite.

        A contiguous CPU `out` of the stored dtype is read into directly (no extra copy)."""
        import torch

        shape = self.shape(name)
        if tuple(shape) != tuple(out.shape):
            raise MergeError(
                f"{self.path}: tensor '{name}' has shape {tuple(shape)}, "
                f"expected {tuple(out.shape)}"
            )
        fname = self._where.get(name, "")
        direct = (
            fname.endswith(".safetensors")
            and out.device.type == "cpu"
            and out.is_contiguous()
            and self.dtype(name) == out.dtype
        )
        if direct:
            self._open(fname).read_raw(name, out.view(-1).view(torch.uint8))
        else:
            out.copy_(self._typed(name))
        self._check_finite(name, out)
        return out

    def streams_rows(self, name: str) -> bool:
        """Whether read_rows_into can read part of `name` (a safetensors tensor)."""
        return self._where.get(name, "").endswith(".safetensors")

    def read_rows_into(self, name: str, r0: int, out: torch.Tensor) -> torch.Tensor:
        """Copy rows r0 .. r0 + len(out) of safetensors tensor `name` into `out` (a row
        chunk: one contiguous byte range of the file); checks it is finite. Threads may
        call it at once for different tensors (a disk merge's workers read in parallel)."""
        import torch

        shape = self.shape(name)
        if tuple(shape[1:]) != tuple(out.shape[1:]) or r0 + out.shape[0] > shape[0]:
            raise MergeError(
                f"{self.path}: tensor '{name}' has shape {tuple(shape)}, cannot read rows "
                f"{r0}..{r0 + out.shape[0]} of shape {tuple(out.shape)}"
            )
        f = self._open(self._where[name])
        code, _, begin, _ = f.entries[name]
        dtype = getattr(torch, ST_DTYPES[code])
        row_bytes = out[0].numel() * dtype.itemsize if out.shape[0] else 0
        nbytes = row_bytes * out.shape[0]
        direct = out.dtype == dtype and out.is_contiguous()
        if direct:
            raw = out.reshape(-1).view(torch.uint8)
        else:  # a staging buffer per thread
            staged = getattr(self._staging, "raw", None)
            if staged is None or staged.numel() < nbytes:
                staged = self._staging.raw = torch.empty(nbytes, dtype=torch.uint8)
            raw = staged[:nbytes]
        got = f.pread_into(f.data_start + begin + r0 * row_bytes, memoryview(raw.numpy()))
        if got != nbytes:
            raise MergeError(f"{f.path}: tensor '{name}' is truncated ({got} of {nbytes} bytes)")
        if not direct:
            out.copy_(raw.view(dtype).view(out.shape))
        # multi-pass merges read each chunk two to four times: the first read checks it
        checked = self._rows_checked.get(name, 0)
        if r0 + out.shape[0] > checked:
            self._check_finite(name, out)
            if r0 <= checked:
                self._rows_checked[name] = r0 + out.shape[0]
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self._typed(name).clone()
        self._check_finite(name, t)
        return t

    def _check_finite(self, name: str, t: torch.Tensor) -> None:
        import torch

        if not t.is_floating_point() or t.numel() == 0:
            return
        # min/max stream at memory speed in the tensor's own dtype (7x faster than a float32
        # sum on bf16 here, which was a third of a TIES merge), allocate nothing, and NaN or
        # inf anywhere shows in them
        lo, hi = torch.aminmax(t.reshape(-1))
        if torch.isfinite(lo) and torch.isfinite(hi):
            return
        raise MergeError(f"{self.path / self._where[name]}: tensor '{name}' contains NaN or inf")

    def close(self) -> None:
        for f in self._files.values():
            f.fh.close()
        self._files.clear()
        self._pickles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hub_folder(repo: str, revision: str | None, text: str, what: str) -> Path:
    """A hub id's snapshot folder from the local Hugging Face cache, never the network."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        rev = f" at revision '{revision}'" if revision else ""
        raise ConfigError(
            f"{what} '{text}': expected a local folder or a hub id in the local Hugging Face "
            f"cache, but '{repo}'{rev} is not in the cache at {constants.HF_HUB_CACHE} (set "
            "HF_HUB_CACHE / HF_HOME to the cache that has it); evomerge uses no network: "
            "download it first (hf download)"
        ) from None


def _folder(path: str, revision: str | None, text: str, what: str) -> Path:
    """A local folder, else a hub id (`org/name`) resolved in the local HF cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ConfigError(f"{what} '{text}': expected a folder, but {local} does not exist")
    return _hub_folder(path, revision, text, what)


def _parse_ref(ref: str | os.PathLike | ModelRef) -> ModelRef:
    from evomerge.recipe.schema import ModelRef

    if isinstance(ref, ModelRef):
        return ref
    text = str(ref)
    if Path(text).expanduser().is_dir():  # a folder whose name holds '@' or '+'
        return ModelRef(text)
    return ModelRef.parse(text)


def resolve_model_path(
    ref: str | os.PathLike | ModelRef, stages: Mapping[str, Path] | None = None
) -> Path:
    """A model reference -> a local folder: an earlier stage, a local folder, or the HF cache
    (`org/name[@revision]`). For `BASE+ADAPTER`, the base's folder (config, tokenizer)."""
    model = _parse_ref(ref)
    if stages and model.path in stages:
        return Path(stages[model.path])
    return _folder(model.path, model.revision, str(ref), "model")


def resolve_adapter_path(ref: str | ModelRef) -> Path | None:
    """The LoRA adapter folder of a `BASE+ADAPTER` reference (None without an adapter)."""
    lora = _parse_ref(ref).lora
    if lora is None:
        return None
    return _folder(lora.path, lora.revision, str(lora), "LoRA adapter")


def open_checkpoint(
    ref: str | ModelRef,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    stages: Mapping[str, Path] | None = None,
) -> CheckpointReader:
    """Open a model for lazy reading (see resolve_model_path for how references resolve);
    `BASE+ADAPTER` reads the base through the adapter (merge.lora.LoraReader)."""
    path = resolve_model_path(ref, stages)
    adapter = resolve_adapter_path(ref)
    reader = CheckpointReader(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if adapter is None:
        return reader
    from evomerge.merge.lora import LoraReader

    return LoraReader(reader, adapter)  # type: ignore[return-value]  # same reading interface
