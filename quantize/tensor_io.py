"""Safetensors read by row ranges and written by row ranges, so no tensor is ever whole in memory.

mx.load reads a whole tensor when any slice of it is evaluated, and mx.save_safetensors needs a
whole shard in memory; Qwen3-4B's embedding alone is 778 MB in bf16 and a default shard is 5 GB,
so both would break the converter's memory bound. The format is simple enough to stream by hand:
an 8-byte little-endian header length, a JSON header of {name: dtype, shape, data_offsets}, then
the raw little-endian tensor bytes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen3_mlx.errors import CheckpointError
from qwen3_mlx.quantize.errors import ConversionError
from qwen3_mlx.safetensors_check import read_header

# Safetensors dtype names -> how we read them. FP8 is read as raw bytes for qwen3_mlx.fp8; like
# the loader, we also take U8 bytes with a weight_scale_inv as FP8 (mx.save_safetensors writes U8).
READ_DTYPES = {
    "BF16": mx.bfloat16,
    "F16": mx.float16,
    "F32": mx.float32,
    "F8_E4M3": mx.uint8,
    "U8": mx.uint8,
}
FP8_DTYPES = ("F8_E4M3", "U8")
WRITE_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
ITEM_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1, "U32": 4}


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes live in a source safetensors file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (everything after the first axis)."""
        return ITEM_SIZES[self.dtype] * math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return ITEM_SIZES[self.dtype] * math.prod(self.shape)


def source_tensors(path: Path) -> list[SourceTensor]:
    """Every tensor of one safetensors file, in file order, after checking the file is whole."""
    header = read_header(path)
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in READ_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype}; expected one of {', '.join(READ_DTYPES)}"
            )
        shape = tuple(int(d) for d in info.get("shape", ()))
        start, stop = (int(o) for o in info["data_offsets"])
        tensor = SourceTensor(name, path, dtype, shape, 8 + header_len + start)
        if stop - start != tensor.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name} holds {stop - start} bytes, its shape needs {tensor.nbytes}"
            )
        tensors.append(tensor)
    return sorted(tensors, key=lambda t: t.offset)


class SourceReader:
    """Reads row ranges of source tensors, keeping one open file per shard."""

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}

    def rows(self, tensor: SourceTensor, start: int, stop: int) -> mx.array:
        """Rows [start, stop) of a tensor as an mx.array in its stored dtype."""
        fd = self._files.get(tensor.path)
        if fd is None:
            try:
                fd = self._files[tensor.path] = os.open(tensor.path, os.O_RDONLY)
            except OSError as error:
                raise CheckpointError(f"{tensor.path}: cannot be read ({error.strerror})") from None
        size = (stop - start) * tensor.row_bytes
        try:
            data = os.pread(fd, size, tensor.offset + start * tensor.row_bytes)
        except OSError as error:
            raise CheckpointError(
                f"{tensor.path}: reading {tensor.name} failed ({error.strerror})"
            ) from None
        if len(data) != size:
            raise CheckpointError(f"{tensor.path}: truncated inside tensor {tensor.name}")
        raw = mx.array(np.frombuffer(data, dtype=np.uint8))
        return raw.view(READ_DTYPES[tensor.dtype]).reshape((stop - start,) + tensor.shape[1:])

    def close(self) -> None:
        """Close every open source file."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return ITEM_SIZES[self.dtype] * math.prod(self.shape)


def write_failure(path: Path, error: OSError) -> ConversionError:
    """A one-line error for a failed write; a full disk says so."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConversionError(f"{path.parent}: no space left on device (writing {path.name})")
    return ConversionError(f"{path}: cannot be written ({error.strerror or error})")


class ShardWriter:
    """One output safetensors file: the header first, then tensor rows written in place."""

    def __init__(self, path: Path, tensors: list[OutputTensor]):
        self.path = path
        self.tensors = {t.name: t for t in tensors}
        header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {
                "dtype": tensor.dtype,
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            self.offsets[tensor.name] = offset
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header so data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            raise write_failure(path, error) from None
        self._write_at(struct.pack("<Q", len(raw)) + raw, 0)
        try:
            os.ftruncate(self.fd, self.size)  # sparse until written; lets rows land in any order
        except OSError as error:
            raise write_failure(path, error) from None

    def write_rows(self, name: str, start: int, values: mx.array) -> None:
        """Write evaluated rows [start, start + len(values)) of tensor `name`."""
        tensor = self.tensors[name]
        if (
            WRITE_DTYPES.get(values.dtype) != tensor.dtype
            or tuple(values.shape[1:]) != tensor.shape[1:]
        ):
            raise ConversionError(
                f"{name}: computed {values.dtype} {tuple(values.shape)}, planned {tensor.dtype} {tensor.shape}"
            )
        row_bytes = tensor.nbytes // tensor.shape[0]
        self._write_at(
            memoryview(values).cast("B"), self.data_start + self.offsets[name] + start * row_bytes
        )

    def _write_at(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as error:
            raise write_failure(self.path, error) from None

    def close(self) -> None:
        """Close the file (its size was fixed when it was opened)."""
        os.close(self.fd)
