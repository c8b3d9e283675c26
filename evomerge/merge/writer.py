"""Checkpoint writing: an atomic, sharded safetensors writer, and the output-folder rules.

Every file of a merge (shards, index, tokenizer, card, generation_config.json, config.json
last) is written into OUT_DIR.tmp-<pid>-<random>; the complete folder then replaces OUT_DIR in
one atomic step (Linux: renameat2 RENAME_EXCHANGE swaps the two folders). Where the system cannot
swap, the old output is moved to OUT_DIR.old-<pid>-<random> first, and the next run into OUT_DIR
restores it if a kill came between the two renames. Leftovers of dead processes are removed by
the next run, so at any moment OUT_DIR is the complete old output or the complete new one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from evomerge.common.killpoint import kill_point
from evomerge.errors import ConfigError, MergeError
from evomerge.merge.io import INDEX, MARKER, TOKENIZER_FILES
from evomerge.merge.stfile import st_code

if TYPE_CHECKING:
    import torch


# The writer's steps, in order, numbered in this one place. Test hook: with
# EVOMERGE_WRITER_KILL_AT=k the process SIGKILLs itself on reaching STEPS[k-1], so the crash tests
# can kill a merge at every step. "old-moved-aside" is reached only where folders cannot be swapped.
STEPS = (
    "shard-started", "shards-named", "index-written", "tokenizer-copied",
    "generation-config-written", "files-written", "marker-written", "config-written",
    "old-moved-aside", "swapped", "old-removed",
)  # fmt: skip
KILL_AT_ENV = "EVOMERGE_WRITER_KILL_AT"
NO_EXCHANGE_ENV = "EVOMERGE_WRITER_NO_EXCHANGE"  # test hook: take the two-rename path


def _reached(step: str) -> None:
    kill_point(KILL_AT_ENV, STEPS, step)


def _write(path: Path, data: str | bytes) -> None:
    # through the module's `open`, like the shards: one place where disk-full surfaces
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders a and b in one atomic step; False where the system or filesystem cannot."""
    if sys.platform != "linux" or os.environ.get(NO_EXCHANGE_ENV):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_complete(folder: Path) -> bool:
    """An evomerge output whose writer finished: config.json is written last, after the marker."""
    return (folder / "config.json").is_file() and (folder / MARKER).is_file()


def recover_out_dir(out_dir: Path) -> None:
    """Undo what a killed writer left next to out_dir: restore OUT_DIR.old-* when OUT_DIR is
    missing (killed between the two renames), then remove the .old-*/.tmp-* folders of dead
    processes. A live writer's folders (its pid is in the name) are left alone."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    dead: list[Path] = []
    for p in sorted(out_dir.parent.iterdir()):
        for kind in (".old-", ".tmp-"):
            prefix = f"{out_dir.name}{kind}"
            pid = p.name[len(prefix) :].split("-")[0]
            if p.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
                dead.append(p)
    if not out_dir.exists():
        for p in dead:
            if ".old-" in p.name[len(out_dir.name) :] and is_complete(p):
                os.replace(p, out_dir)
                dead.remove(p)
                break
    for p in dead:
        shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, out_dir: Path, old: Path) -> None:
    """Put the complete folder tmp at out_dir, replacing an existing out_dir in one atomic swap
    where the system can. Otherwise with two renames: a kill between them leaves out_dir missing
    and the complete previous folder at `old`, which recover_out_dir() puts back."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        _reached("swapped")
        return
    if _exchange(tmp, out_dir):  # tmp now holds the previous folder
        _reached("swapped")
        shutil.rmtree(tmp, ignore_errors=True)
        _reached("old-removed")
        return
    os.replace(out_dir, old)
    _reached("old-moved-aside")
    os.replace(tmp, out_dir)
    _reached("swapped")
    shutil.rmtree(old, ignore_errors=True)
    _reached("old-removed")


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
        recover_out_dir(self.out_dir)
        check_out_dir(self.out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.tmp = self.out_dir.with_name(self._sibling_name("tmp"))
        self.tmp.mkdir(parents=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[tuple[str, tuple[int, ...]]]] = []  # finished or planned
        self._planned: dict[str, tuple[int, int]] | None = None  # name -> (shard, offset)
        self._handles: dict[int, BinaryIO] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()  # add() and write_rows() from merge threads share files

    def _sibling_name(self, kind: str) -> str:
        # the pid tells recover_out_dir() whether the folder's writer is still alive
        return f"{self.out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"

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
            _reached("shard-started")
            for name, off in offsets.items():
                self._planned[name] = (k, len(header) + off)

    def _header(self, items: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
        head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offsets, pos = {}, 0
        code = st_code(self.dtype)
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
            with self._lock:
                fh = self._handles[k]
                fh.seek(off)
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            return
        nb = t.numel() * t.element_size()
        if self._buffer and self._buffered + nb > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t.clone() if t.data_ptr() == tensor.data_ptr() else t
        self._buffered += nb

    def write_rows(self, name: str, row: int, tensor: torch.Tensor) -> None:
        """Write rows row.. of planned tensor `name` (a row chunk; any thread). The tensor
        counts as written from its first chunk on; the caller writes every row once."""
        import torch

        if self._planned is None or name not in self._planned:
            raise MergeError(f"output tensor '{name}' was not planned")
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        k, off = self._planned[name]
        row_bytes = t[0].numel() * t.element_size() if t.dim() else 0
        with self._lock:
            self._written.add(name)
            fh = self._handles[k]
            fh.seek(off + row * row_bytes)
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def _flush(self) -> None:
        import torch

        items = [(n, tuple(t.shape)) for n, t in self._buffer.items()]
        header, _ = self._header(items)
        with open(self.tmp / f"part-{len(self._shards)}", "wb") as fh:
            fh.write(header)
            for t in self._buffer.values():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        _reached("shard-started")
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
        _reached("shards-named")
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write(self.tmp / INDEX, json.dumps(index, indent=2) + "\n")
        _reached("index-written")

    def finish(
        self,
        config: dict[str, Any],
        *,
        copy_from: Path | None = None,
        files: Mapping[str, str | bytes] | None = None,
    ) -> Path:
        """Write shards, index, tokenizer files copied from `copy_from`, generation_config.json,
        `files` (name -> content; overrides copies), the marker and config.json into the
        temporary folder, then put the complete folder in place."""
        self._close_shards()
        if copy_from is not None:
            for name in (*TOKENIZER_FILES, "generation_config.json"):
                if (Path(copy_from) / name).is_file():
                    _copy(Path(copy_from) / name, self.tmp / name)
        _reached("tokenizer-copied")
        if not (self.tmp / "generation_config.json").exists():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if config.get(k) is not None}  # fmt: skip
            _write(self.tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        _reached("generation-config-written")
        for name, content in (files or {}).items():
            # file names only: never a path out of the folder
            _write(self.tmp / Path(name).name, content)
        _reached("files-written")
        _write(self.tmp / MARKER, "written by evomerge; safe to overwrite with a new merge\n")
        _reached("marker-written")
        # config.json last: only a temporary folder that is complete has one
        _write(self.tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _reached("config-written")
        self._move_into_place()
        return self.out_dir

    def _move_into_place(self) -> None:
        if self.out_dir.exists():
            check_out_dir(self.out_dir)  # still ours? (it may have changed during the merge)
        replace_dir(self.tmp, self.out_dir, self.out_dir.with_name(self._sibling_name("old")))

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
