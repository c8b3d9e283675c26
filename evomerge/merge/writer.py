"""Checkpoint writing: an atomic, sharded safetensors writer, and the output-folder rules.

A merge is written to OUT_DIR.tmp-<random> and moved into place only when complete, with
config.json last, so a killed merge never leaves a folder that looks like a checkpoint.
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
from evomerge.merge.io import INDEX, MARKER, TOKENIZER_FILES, _st_code

if TYPE_CHECKING:
    import torch


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
