"""Checkpoint I/O: a lazy reader (one tensor at a time) and an atomic, sharded writer.

Safetensors are parsed here rather than memory-mapped: reading a tensor's bytes with
`readinto` straight into a reused buffer costs no allocation, and pages of the source files
never count in this process's resident memory (a mmap'd model would, for every file touched).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from evomerge.errors import ConfigError, MergeError

if TYPE_CHECKING:
    import torch

    from evomerge.recipe import ModelRef

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
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


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


def _st_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, tname in _ST_DTYPES.items():
        if tname == name:
            return code
    raise MergeError(f"dtype {dtype} cannot be stored in safetensors")


class _StFile:
    """One safetensors file: header parsed once, tensors read on demand with readinto."""

    def __init__(self, path: Path):
        self.path = path
        self.fh: BinaryIO = open(path, "rb")
        size = os.fstat(self.fh.fileno()).st_size
        try:
            (n,) = struct.unpack("<Q", self.fh.read(8))
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(self.fh.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self.fh.close()
            raise MergeError(f"{path}: not a valid safetensors file (truncated?): {exc}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if self.data_start + end > size or e["dtype"] not in _ST_DTYPES:
                self.fh.close()
                raise MergeError(
                    f"{path}: tensor '{name}' is corrupt or truncated (needs bytes up to "
                    f"{self.data_start + end}, file has {size}, dtype {e['dtype']})"
                )
            self.entries[name] = (e["dtype"], tuple(e["shape"]), begin, end)

    def read_raw(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Read the tensor's bytes into `raw` (uint8, large enough); return the typed view."""
        import torch

        code, shape, begin, end = self.entries[name]
        nbytes = end - begin
        view = raw[:nbytes]
        self.fh.seek(self.data_start + begin)
        got = self.fh.readinto(memoryview(view.numpy()))
        if got != nbytes:
            raise MergeError(f"{self.path}: tensor '{name}' is truncated ({got} of {nbytes} bytes)")
        return view.view(getattr(torch, _ST_DTYPES[code])).view(shape)


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
        self._files: dict[str, _StFile] = {}
        self._pickles: dict[str, dict[str, torch.Tensor]] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._raw: torch.Tensor | None = None
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

    def _open(self, fname: str) -> _StFile:
        f = self._files.get(fname)
        if f is None:
            if not (self.path / fname).is_file():
                raise MergeError(
                    f"{self.path}: weight file '{fname}' named in the index is missing"
                )
            f = self._files[fname] = _StFile(self.path / fname)
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
            return _ST_DTYPES[code], shape
        t = self._load_pickle(fname)[name]
        return str(t.dtype).removeprefix("torch."), tuple(t.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

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

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self._typed(name).clone()
        self._check_finite(name, t)
        return t

    def _check_finite(self, name: str, t: torch.Tensor) -> None:
        import torch

        if not t.is_floating_point() or t.numel() == 0:
            return
        # a reduction streams at memory speed and allocates nothing; NaN/inf propagate through it
        if torch.isfinite(t.sum(dtype=torch.float32)) or torch.isfinite(t).all():
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


def resolve_model_path(ref: str | ModelRef, stages: Mapping[str, Path] | None = None) -> Path:
    """A model reference -> a local folder: an earlier stage, a local folder, or the HF cache."""
    text = str(ref)
    path, sep, rev = text.partition("@")
    revision = getattr(ref, "revision", None) or (rev if sep else None)
    path = getattr(ref, "path", path)
    if stages and path in stages:
        return Path(stages[path])
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ConfigError(f"model '{text}': expected a model folder, but {local} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ConfigError(
            f"model '{text}' is neither a local folder nor in the local Hugging Face cache "
            "(HF_HOME); evomerge uses no network: download it first (huggingface-cli download)"
        ) from None


def open_checkpoint(
    ref: str | ModelRef,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    stages: Mapping[str, Path] | None = None,
) -> CheckpointReader:
    """Open a model for lazy reading (see resolve_model_path for how references resolve)."""
    path = resolve_model_path(ref, stages)
    return CheckpointReader(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


# ---- writing ---------------------------------------------------------------------------------


def check_out_dir(out_dir: Path) -> None:
    """ConfigError if out_dir is a non-empty folder that evomerge did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} exists and is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise ConfigError(
            f"output folder {out_dir} is not empty and is not an earlier evomerge output; "
            "choose an empty or new folder"
        )


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000` -> bytes; ConfigError otherwise."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}  # fmt: skip
    for u, mult in units.items():
        if s.endswith(u):
            s, factor = s[: -len(u)], mult
            break
    else:
        factor = 1
    try:
        value = float(s) * factor
    except ValueError:
        raise ConfigError(f"--shard-size must be like 5GB or 500MB, but got '{text}'") from None
    if value < 1:
        raise ConfigError(f"--shard-size must be positive, but got '{text}'")
    return int(value)


def _shard_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


class CheckpointWriter:
    """Writes a checkpoint into OUT_DIR.tmp-<random>, moved to OUT_DIR only by finish().

    With `plan([(name, shape), ...])` called first, shards are laid out up front and each
    tensor's bytes go straight to disk (memory: one tensor); without it, tensors are buffered up
    to one shard. An exception inside the `with` block removes the temporary folder.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int, dtype: torch.dtype):
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.tmp = self.out_dir.with_name(f"{self.out_dir.name}.tmp-{secrets.token_hex(4)}")
        self.tmp.mkdir(parents=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[tuple[str, tuple[int, ...]]]] = []  # finished or planned
        self._planned: dict[str, tuple[int, int]] | None = None  # name -> (shard, offset)
        self._handles: dict[int, BinaryIO] = {}
        self._written: set[str] = set()

    def _nbytes(self, shape: Sequence[int]) -> int:
        import math

        return math.prod(shape) * self.dtype.itemsize

    def plan(self, specs: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Lay out every output tensor in shards now; add() then streams bytes to disk."""
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in specs:
            nb = self._nbytes(shape)
            if shards[-1] and size + nb > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape)))
            size += nb
        self._shards = shards
        self._planned = {}
        for k, items in enumerate(shards):
            header, offsets = self._header(items)
            fh = open(self.tmp / f"part-{k}", "wb")
            fh.write(header)
            self._handles[k] = fh
            for name, off in offsets.items():
                self._planned[name] = (k, len(header) + off)

    def _header(self, items: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
        head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offsets, pos = {}, 0
        code = _st_code(self.dtype)
        for name, shape in items:
            nb = self._nbytes(shape)
            head[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nb]}
            offsets[name] = pos
            pos += nb
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw, offsets

    def add(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if name in self._written:
            raise MergeError(f"output tensor '{name}' written twice")
        self._written.add(name)
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        if self._planned is not None:
            if name not in self._planned:
                raise MergeError(f"output tensor '{name}' was not planned")
            k, off = self._planned[name]
            fh = self._handles[k]
            fh.seek(off)
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            return
        nb = t.numel() * t.element_size()
        if self._buffer and self._buffered + nb > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t.clone() if t.data_ptr() == tensor.data_ptr() else t
        self._buffered += nb

    def _flush(self) -> None:
        import torch

        items = [(n, tuple(t.shape)) for n, t in self._buffer.items()]
        header, _ = self._header(items)
        with open(self.tmp / f"part-{len(self._shards)}", "wb") as fh:
            fh.write(header)
            for t in self._buffer.values():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._shards.append(items)
        self._buffer, self._buffered = {}, 0

    def _close_shards(self) -> None:
        if self._buffer:
            self._flush()
        if self._planned is not None and self._written != set(self._planned):
            missing = sorted(set(self._planned) - self._written)
            raise MergeError(f"output tensors never written: {', '.join(missing[:5])}")
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        n = len(self._shards)
        weight_map, total = {}, 0
        for k, items in enumerate(self._shards):
            fname = _shard_name(k, n)
            os.replace(self.tmp / f"part-{k}", self.tmp / fname)
            for name, shape in items:
                weight_map[name] = fname
                total += self._nbytes(shape)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def finish(
        self,
        config: dict[str, Any],
        *,
        copy_from: Path | None = None,
        files: Mapping[str, str | bytes] | None = None,
    ) -> Path:
        """Write shards, index, config.json, generation_config.json, tokenizer files copied from
        `copy_from`, then `files` (name -> content; overrides copies), then move into place."""
        self._close_shards()
        if copy_from is not None:
            for name in (*TOKENIZER_FILES, "generation_config.json"):
                if (Path(copy_from) / name).is_file():
                    shutil.copyfile(Path(copy_from) / name, self.tmp / name)
        if not (self.tmp / "generation_config.json").exists():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if config.get(k) is not None}  # fmt: skip
            (self.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, content in (files or {}).items():
            target = self.tmp / Path(name).name  # file names only: never a path out of the folder
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        (self.tmp / MARKER).write_text("written by evomerge; safe to overwrite with a new merge\n")
        self._move_into_place()
        # config.json last and atomically: a folder with one loads as a checkpoint, so a crash
        # at any moment leaves no folder (temporary or final) that looks complete but is not
        part = self.out_dir / "config.json.part"
        part.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(part, self.out_dir / "config.json")
        return self.out_dir

    def _move_into_place(self) -> None:
        old = None
        if self.out_dir.exists():
            check_out_dir(self.out_dir)  # still ours? (it may have changed during the merge)
            old = self.out_dir.with_name(f"{self.out_dir.name}.old-{secrets.token_hex(4)}")
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()
