"""The safetensors file format: a dtype table and one file read by byte ranges.

A file's JSON header is parsed once; tensors (or row ranges of them) are read with
positional reads into the caller's buffers, so threads may read one file at once.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from evomerge.errors import MergeError

if TYPE_CHECKING:
    import torch

ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def st_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (MergeError if it has none)."""
    name = str(dtype).removeprefix("torch.")
    for code, tname in ST_DTYPES.items():
        if tname == name:
            return code
    raise MergeError(f"dtype {dtype} cannot be stored in safetensors")


class StFile:
    """One safetensors file: header parsed once, tensors read on demand (row chunks by
    positional reads, which threads may issue at once)."""

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
            if self.data_start + end > size or e["dtype"] not in ST_DTYPES:
                self.fh.close()
                raise MergeError(
                    f"{path}: tensor '{name}' is corrupt or truncated (needs bytes up to "
                    f"{self.data_start + end}, file has {size}, dtype {e['dtype']})"
                )
            self.entries[name] = (e["dtype"], tuple(e["shape"]), begin, end)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """Read bytes at `offset` into buf (no shared file position: thread-safe); returns
        how many were read (fewer at the end of the file)."""
        fd, got = self.fh.fileno(), 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def read_raw(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Read the tensor's bytes into `raw` (uint8, large enough); return the typed view."""
        import torch

        code, shape, begin, end = self.entries[name]
        nbytes = end - begin
        view = raw[:nbytes]
        got = self.pread_into(self.data_start + begin, memoryview(view.numpy()))
        if got != nbytes:
            raise MergeError(f"{self.path}: tensor '{name}' is truncated ({got} of {nbytes} bytes)")
        return view.view(getattr(torch, ST_DTYPES[code])).view(shape)
