"""Reading GGUF files: a bounded, validating parser of the header and a memory map of the data.

GGUF layout (llama.cpp's docs/gguf.md and gguf-py's constants), all little-endian:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, ne u64 x n_dims, type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data, each tensor at data_start + offset
    string = length u64 + UTF-8 bytes;  array = item_type u32 + count u64 + items

Why not `gguf.GGUFReader`: it trusts counts from the file (a 49-byte file claiming 2**62 array
items makes it hang), and it builds a numpy view per array item, so opening the SmolLM2 file
(49k tokens, 49k merges) takes about 5 seconds. This reader checks every count and size against
the bytes that remain before it reads, and turns string arrays into plain lists in one pass.
The type constants and block sizes still come from `gguf`, the format's reference.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays are legal GGUF; deeper nesting is refused
MAX_NAME_BYTES = 1 << 16

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_TENSOR_TYPES = {int(t): t for t in GGMLQuantizationType}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader can trust; the message says what is wrong."""


def describe(value: Any) -> str:
    """A metadata value for an error message: scalars as they are, arrays and long strings
    by their size (a vocabulary in the wrong key must not make a 49k-item message)."""
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return repr(value)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length (ne0), then rows, ...
    offset: int  # absolute byte offset of the first byte in the file
    n_bytes: int

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.shape[0] // block_size * type_size


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read past its end."""

    def __init__(self, buf: memoryview, what: str):
        self.buf = buf
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n_bytes: int, item: str) -> None:
        if n_bytes < 0 or n_bytes > self.remaining():
            raise GGUFError(
                f"{self.what}: {item} needs {n_bytes} bytes at offset {self.pos} "
                f"but the file has {self.remaining()} left (truncated or corrupt)"
            )

    def scalar(self, fmt: str, item: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, item)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, item: str) -> int:
        return self.scalar("<I", item)

    def u64(self, item: str) -> int:
        return self.scalar("<Q", item)

    def string(self, item: str, errors: str = "strict") -> str:
        length = self.u64(f"{item} length")
        self.need(length, item)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.what}: {item} is not valid UTF-8") from exc


def _value_type(code: int, item: str, what: str) -> GGUFValueType:
    if code not in _VALUE_TYPES:
        raise GGUFError(f"{what}: {item} has unknown value type {code}")
    return _VALUE_TYPES[code]


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str, depth: int = 0) -> Any:
    if vtype == GGUFValueType.STRING:
        # Vocabulary strings may hold invalid UTF-8 in real files; keep them readable.
        return cur.string(f"value of {key}", errors="replace")
    if vtype in _SCALAR_FORMATS:
        return cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key}")
    # ARRAY
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(f"{cur.what}: {key} nests arrays deeper than {MAX_ARRAY_DEPTH}")
    item_type = _value_type(cur.u32(f"{key} item type"), f"{key} items", cur.what)
    count = cur.u64(f"{key} item count")
    if item_type in _NUMPY_DTYPES:
        dtype = _NUMPY_DTYPES[item_type]
        cur.need(count * dtype.itemsize, f"{key} ({count} items)")
        values = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
        cur.pos += count * dtype.itemsize
        return values
    # Strings and nested arrays take at least 8 bytes each: check the count before looping.
    cur.need(count * 8, f"{key} ({count} items)")
    return [_read_value(cur, item_type, key, depth + 1) for _ in range(count)]


def tensor_nbytes(ttype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> int:
    """Bytes of a tensor of this type and GGUF shape; GGUFError when rows do not split into blocks."""
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    if shape[0] % block_size:
        raise GGUFError(
            f"{name}: row length {shape[0]} is not a multiple of the {ttype.name} block size {block_size}"
        )
    n_blocks = shape[0] // block_size
    for dim in shape[1:]:
        n_blocks *= dim
    return n_blocks * type_size


# (name, type, shape, offset in the data section) of one tensor info, before its size is checked
_TensorEntry = tuple[str, GGMLQuantizationType, tuple[int, ...], int]


class GGUFFile:
    """A parsed GGUF header plus read-only numpy views of tensor data, memory-mapped.

    `metadata` holds key/values as Python scalars and strings, string arrays as lists of
    str, and numeric arrays as 1-D numpy arrays.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as exc:
            raise GGUFError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise GGUFError(f"{self.path}: not a regular file")
            self.file_size = info.st_size
            if self.file_size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file ({self.file_size} bytes, too short)")
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._buf = memoryview(self._map)
        self.metadata: dict[str, Any] = {}
        # key -> (value type, item type for arrays else None): what a writer needs to copy a
        # key with its exact GGUF type (caravan quantize).
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        """Header, key/values, tensor infos, then each tensor's place in the data section, every
        count and size checked against the file before it is trusted."""
        cur = _Cursor(self._buf, str(self.path))
        n_tensors, n_kv = self._read_header(cur)
        self._read_metadata(cur, n_kv)
        self.alignment = self._read_alignment()
        infos = self._read_tensor_infos(cur, n_tensors)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._place_tensors(infos)

    def _read_header(self, cur: _Cursor) -> tuple[int, int]:
        """Magic and version; (tensor count, key/value count), each possible for the file's size."""
        what = cur.what
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{what}: not a GGUF file (magic {bytes(self._buf[:4])!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{what}: GGUF version {self.version} is not supported (supported: 2, 3)"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("key/value count")
        # Each key/value takes at least 8 + 1 + 4 + 1 bytes and each tensor info 8 + 1 + 4 + 8 + 4 + 8.
        if n_kv * 14 > cur.remaining():
            raise GGUFError(f"{what}: key/value count {n_kv} is impossible for a {self.file_size}-byte file")
        if n_tensors * 33 > cur.remaining():
            raise GGUFError(f"{what}: tensor count {n_tensors} is impossible for a {self.file_size}-byte file")
        return n_tensors, n_kv

    def _read_metadata(self, cur: _Cursor, n_kv: int) -> None:
        """n_kv key/values into self.metadata, with their GGUF types into self.value_types."""
        what = cur.what
        for index in range(n_kv):
            key = cur.string(f"key #{index}")
            if not key:
                raise GGUFError(f"{what}: key #{index} is empty")
            if key in self.metadata:
                raise GGUFError(f"{what}: key {key!r} appears twice")
            vtype = _value_type(cur.u32(f"{key} value type"), key, what)
            item_type = None
            if vtype == GGUFValueType.ARRAY and cur.remaining() >= 4:
                item_type = _VALUE_TYPES.get(struct.unpack_from("<I", cur.buf, cur.pos)[0])
            self.metadata[key] = _read_value(cur, vtype, key)
            self.value_types[key] = (vtype, item_type)

    def _read_alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {describe(alignment)} is not a positive power of two")
        return alignment

    def _read_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[_TensorEntry]:
        """n_tensors (name, type, shape, offset in the data section), each name reserved in self.tensors."""
        what = cur.what
        infos = []
        for index in range(n_tensors):
            name = cur.string(f"tensor #{index} name")
            if not name or len(name) > MAX_NAME_BYTES:
                raise GGUFError(f"{what}: tensor #{index} has an empty or oversized name")
            if name in self.tensors:
                raise GGUFError(f"{what}: tensor {name} appears twice")
            n_dims = cur.u32(f"{name} dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{what}: tensor {name} has {n_dims} dimensions (allowed: 1 to {MAX_DIMS})")
            shape = tuple(cur.u64(f"{name} dimension") for _ in range(n_dims))
            if any(d == 0 or d >= 1 << 62 for d in shape):
                raise GGUFError(f"{what}: tensor {name} has an invalid shape {list(shape)}")
            code = cur.u32(f"{name} type")
            if code not in _TENSOR_TYPES:
                raise GGUFError(f"{what}: tensor {name} has unknown type {code}")
            offset = cur.u64(f"{name} offset")
            if offset % self.alignment:
                raise GGUFError(f"{what}: tensor {name} offset {offset} is not aligned to {self.alignment}")
            infos.append((name, _TENSOR_TYPES[code], shape, offset))
            self.tensors[name] = None  # type: ignore[assignment]  # reserve the name
        return infos

    def _place_tensors(self, infos: list[_TensorEntry]) -> None:
        """self.tensors from the infos, each tensor checked to end inside the file."""
        data_size = self.file_size - self.data_offset
        for name, ttype, shape, offset in infos:
            n_bytes = tensor_nbytes(ttype, shape, f"{self.path}: tensor {name}")
            if offset + n_bytes > data_size:
                raise GGUFError(
                    f"{self.path}: tensor {name} ({n_bytes} bytes at data offset {offset}) runs past the end "
                    f"of the file (truncated?)"
                )
            self.tensors[name] = TensorInfo(name, ttype, shape, self.data_offset + offset, n_bytes)

    def tensor_type(self, name: str) -> GGMLQuantizationType | None:
        info = self.tensors.get(name)
        return None if info is None else info.type

    def tensor_data(self, name: str) -> np.ndarray:
        return tensor_view(self._buf, self.tensors[name])

    def tensor_bytes(self, name: str) -> memoryview:
        """The tensor's bytes exactly as stored, for sending to a node."""
        info = self.tensors[name]
        return self._buf[info.offset : info.offset + info.n_bytes]

    def release(self, name: str) -> None:
        """Drop the pages of a tensor from this process's memory, as llama.cpp's unmap_weight
        does after quantizing it; a later read maps them in again from the file."""
        release_pages(self._map, self.tensors[name])

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"


def release_pages(mapped: mmap.mmap, info: TensorInfo) -> None:
    """Drop the pages holding a tensor from a file mapping (MADV_DONTNEED): a later read maps
    them in again from the file."""
    start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(-(-(info.offset + info.n_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mapped))
    if hasattr(mmap, "MADV_DONTNEED") and end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def tensor_view(buffer, info: TensorInfo) -> np.ndarray:
    """A read-only view of a tensor at info.offset in buffer: (rows, row_length) float for
    F32/F16, (rows, row_bytes) uint8 for block formats; 1-D tensors come back 1-D."""
    if info.type == GGMLQuantizationType.F32:
        dtype, width = np.dtype("<f4"), info.shape[0]
    elif info.type == GGMLQuantizationType.F16:
        dtype, width = np.dtype("<f2"), info.shape[0]
    else:
        dtype, width = np.dtype(np.uint8), info.row_bytes
    flat = np.frombuffer(buffer, dtype=dtype, count=info.n_bytes // dtype.itemsize, offset=info.offset)
    if len(info.shape) == 1:
        return flat
    return flat.reshape(info.n_rows, width)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    return GGUFFile(path)
