"""Safetensors without torch: a lazy reader and a streaming writer (numpy only).

File layout: u64 little-endian header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`,
then the data section; offsets are relative to the data section's start.

Reading:

    st = SafetensorsFile("model.safetensors")   # parses and checks the header only
    st.names(), st.dtype(name), st.shape(name)
    st.view(name)         # zero-copy np.memmap view (what the runtime wants)
    st.read(name, i)      # a private copy of tensor[i] (or of all of it), read with
                          # plain file reads so that converting a huge checkpoint
                          # does not grow the process's resident set
    read_safetensors(path) -> {name: (array, dtype_str)}   # all tensors as memmap views

bf16 has no numpy dtype: it comes back as uint16 holding the raw bits;
`bf16_to_f32` widens them losslessly. Dtype strings are safetensors' own
("BF16", "F16", "F32", ...).

Writing (`SafetensorsWriter`) takes tensors whose data is only read when the
file is written, one chunk at a time, so a backbone larger than RAM can be
copied from memmapped or lazily read sources.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

# safetensors dtype -> numpy dtype holding its bits (little-endian)
NP_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# the float dtypes a QMatrix can store as is (docs/format.md float kinds)
FLOAT_KIND = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

_COPY_CHUNK = 16 << 20  # bytes per read/write when streaming tensor data


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 raw bits (uint16) -> float32, exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor as read (bf16 as uint16 bits) -> float32."""
    if dtype == "BF16":
        return bf16_to_f32(array)
    return np.asarray(array, dtype=np.float32)


class SafetensorsFile:
    """One .safetensors file: header parsed and checked up front, data read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._damaged(f"is only {size} bytes long, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise self._damaged(f"is {size} bytes but declares a {n}-byte header")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise self._damaged(f"has an unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise self._damaged(f"has a header that is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._damaged("has a __metadata__ entry that is not an object")
        self.metadata: dict = metadata
        self.data_start = 8 + n
        self.file_bytes = size
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, t in header.items():
            dtype, shape, begin, end = self._entry(name, t)
            if dtype not in NP_DTYPES:
                raise CheckpointError(
                    f"tensor {name} in {self.path} has dtype {dtype}, which edgemoe "
                    f"cannot read (supported: {', '.join(NP_DTYPES)})"
                )
            want = math.prod(shape) * NP_DTYPES[dtype].itemsize
            if end - begin != want:
                raise self._damaged(
                    f"describes tensor {name} {list(shape)} {dtype} with {end - begin} bytes instead of {want}"
                )
            self._info[name] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise self._damaged(
                f"is {size} bytes but its header describes {self.data_start + end_max}: "
                f"the file is truncated (an interrupted download or copy?); "
                f"download or copy it again"
            )
        self._mmap: np.memmap | None = None

    def _entry(self, name: str, t: object) -> tuple[str, tuple[int, ...], int, int]:
        """One header entry's (dtype, shape, begin, end), its types and ranges checked."""

        def is_count(v: object) -> bool:
            return type(v) is int and v >= 0

        if not isinstance(t, dict):
            raise self._damaged(f"describes tensor {name!r} with a {type(t).__name__}, not an object")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str):
            raise self._damaged(f"gives tensor {name!r} no dtype string")
        if not isinstance(shape, list) or not all(map(is_count, shape)):
            raise self._damaged(f"gives tensor {name!r} a shape {shape!r} that is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(map(is_count, offsets))
            or offsets[0] > offsets[1]
        ):
            raise self._damaged(f"gives tensor {name!r} data_offsets {offsets!r}, not [begin, end] with begin <= end")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} {what}: it is not a valid safetensors file; download or copy it again")

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def names(self) -> list[str]:
        return list(self._info)

    def dtype(self, name: str) -> str:
        return self._info[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._info[name]
        return end - begin

    def byte_range(self, name: str) -> tuple[int, int]:
        """[begin, end) of the tensor's data, as absolute file offsets."""
        _, _, begin, end = self._info[name]
        return self.data_start + begin, self.data_start + end

    def view(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of the tensor (bf16 as uint16 bits), backed by a memmap."""
        dtype, shape, begin, end = self._info[name]
        if self._mmap is None:
            if self.file_bytes == self.data_start:  # no data at all: mmap of length 0 fails
                return np.zeros(shape, NP_DTYPES[dtype])
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self.data_start + begin : self.data_start + end]
        return raw.view(NP_DTYPES[dtype]).reshape(shape)

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """A private copy of tensor (or of tensor[index] along the first axis), read from the file."""
        dtype, shape, begin, end = self._info[name]
        npdt = NP_DTYPES[dtype]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"index {index} out of range for {name} {list(shape)}")
            shape = shape[1:]
            step = int(np.prod(shape, dtype=np.int64)) * npdt.itemsize
            begin += index * step
            end = begin + step
        out = np.empty(end - begin, dtype=np.uint8)
        self._read_into(out, self.data_start + begin)
        return out.view(npdt).reshape(shape)

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        mv = out.data  # memoryview(out); numpy's stubs declare the buffer protocol for Python >= 3.12 only
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < out.nbytes:
                n = f.readinto(mv[got:])
                if not n:
                    raise CheckpointError(
                        f"{self.path} ended early while reading at byte {offset + got}: "
                        f"the file is truncated; download or copy it again"
                    )
                got += n

    def iter_chunks(self, name: str, chunk: int = _COPY_CHUNK):
        """The tensor's raw bytes in chunks (uint8 arrays), read with plain file reads."""
        begin, end = self.byte_range(name)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(begin)
            pos = begin
            while pos < end:
                buf = f.read(min(chunk, end - pos))
                if not buf:
                    raise CheckpointError(
                        f"{self.path} ended early while reading {name}: "
                        f"the file is truncated; download or copy it again"
                    )
                pos += len(buf)
                yield np.frombuffer(buf, dtype=np.uint8)


class TensorRows:
    """Rows of a 2-D tensor read from its file when asked for: `rows[ids]` is like
    `array[ids]` for a 1-D array of row indices. For an embedding table, of which a token
    needs one row: the table stays on disk (its pages in the OS page cache, which the
    kernel may reclaim) instead of in the process's memory. Thread-safe (positional reads)."""

    def __init__(self, st: SafetensorsFile, name: str):
        dtype, shape, _, _ = st._info[name]
        if len(shape) != 2:
            raise ValueError(f"{name} is {list(shape)}: rows are read from 2-D tensors only")
        self.path, self.name, self.shape = st.path, name, shape
        self.dtype = NP_DTYPES[dtype]
        self.offset = st.byte_range(name)[0]
        self.row_bytes = shape[1] * self.dtype.itemsize
        self._fd = os.open(st.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}) for {self.name}")
        out = np.empty((len(ids), self.shape[1]), self.dtype)
        mv = out.reshape(-1).view(np.uint8).data  # memoryview of its bytes (see _read_into)
        rb = self.row_bytes
        for i, r in enumerate(ids.tolist()):
            if os.preadv(self._fd, [mv[i * rb : (i + 1) * rb]], self.offset + r * rb) != rb:
                raise CheckpointError(
                    f"{self.path} ended early while reading row {r} of {self.name}: "
                    f"the file is truncated; convert or copy it again"
                )
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def read_safetensors(path) -> dict[str, tuple[np.ndarray, str]]:
    """All tensors of a safetensors file as {name: (memmap view, dtype string)}.

    Nothing is read until an array is touched. bf16 tensors are uint16 bit patterns.
    """
    st = SafetensorsFile(path)
    return {name: (st.view(name), st.dtype(name)) for name in st.names()}


def _bytes_source(array: np.ndarray) -> Callable[[], object]:
    def chunks():
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        for i in range(0, flat.size, _COPY_CHUNK):
            yield flat[i : i + _COPY_CHUNK]

    return chunks


class SafetensorsWriter:
    """Collects tensors, then writes one safetensors file in a single pass.

        w = SafetensorsWriter()
        w.add("tok_embeddings", array, "BF16")                 # array: bits as read
        w.add_lazy("output", "BF16", shape, lambda: chunks)     # data produced at write time
        w.write(path)

    Tensors are laid out by decreasing item size (then in insertion order) so
    each starts at a multiple of its item size: a memmap view is always aligned.
    """

    def __init__(self, metadata: dict[str, str] | None = None):
        self.metadata = dict(metadata or {})
        self._tensors: list[tuple[str, str, tuple[int, ...], Callable]] = []
        self._names: set[str] = set()

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        array = np.asarray(array)
        if array.dtype.itemsize != NP_DTYPES[dtype].itemsize:
            raise ValueError(f"{name}: array of {array.dtype} cannot hold {dtype}")
        self.add_lazy(name, dtype, array.shape, _bytes_source(array))

    def add_lazy(self, name: str, dtype: str, shape, chunks: Callable) -> None:
        """`chunks()` must yield the tensor's raw little-endian bytes as uint8 arrays."""
        if name in self._names:
            raise ValueError(f"tensor {name} added twice")
        if dtype not in NP_DTYPES:
            raise ValueError(f"unknown safetensors dtype {dtype}")
        self._names.add(name)
        self._tensors.append((name, dtype, tuple(int(s) for s in shape), chunks))

    def _layout(self):
        order = sorted(range(len(self._tensors)), key=lambda i: -NP_DTYPES[self._tensors[i][1]].itemsize)
        header: dict[str, Any] = {}
        pos, plan = 0, []
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        for i in order:
            name, dtype, shape, chunks = self._tensors[i]
            nbytes = int(np.prod(shape, dtype=np.int64)) * NP_DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            plan.append((name, nbytes, chunks))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        return raw, plan, pos

    def write(self, path) -> int:
        """Write the file; returns its size in bytes. The caller fsyncs if it wants to."""
        raw, plan, data_bytes = self._layout()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, nbytes, chunks in plan:
                written = 0
                for c in chunks():
                    c = np.ascontiguousarray(c).reshape(-1).view(np.uint8)
                    f.write(c.data)
                    written += c.nbytes
                if written != nbytes:
                    raise ValueError(f"tensor {name}: wrote {written} bytes, expected {nbytes}")
            f.flush()
            size = f.tell()
        assert size == 8 + len(raw) + data_bytes
        return size


def write_safetensors(path, tensors: dict[str, tuple[np.ndarray, str]], metadata=None) -> int:
    """Write {name: (array, dtype string)} to a safetensors file; returns its size."""
    w = SafetensorsWriter(metadata)
    for name, (array, dtype) in tensors.items():
        w.add(name, array, dtype)
    return w.write(path)


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
