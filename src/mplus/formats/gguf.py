"""A numpy-only GGUF reader: header, metadata, tensor infos, and dequantisation to float32.

Format (all integers little-endian): b"GGUF", uint32 version (2 or 3), uint64 tensor count, uint64 metadata count;
then the metadata (key string, uint32 value type, value), then the tensor infos (name, uint32 n_dims, n_dims ×
uint64 `ne` fastest dimension first, uint32 ggml type, uint64 offset); tensor data starts at the end of the infos
rounded up to `general.alignment` (default 32). (The format: ggml's docs/gguf.md.)

Every length read from the file is checked against the file size, so a truncated or corrupt file raises
GGUFError naming the problem, never a struct/numpy error or a huge allocation.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

MAX_ARRAY_NESTING = 8
# GGUF metadata value types: id -> numpy dtype for the scalars; 8 is a string, 9 an array.
_SCALARS = {0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
            5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
            12: np.dtype("<f8")}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file this reader can read (malformed, truncated, or unsupported)."""


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_elems: int
    block_bytes: int
    decode: Callable[[np.ndarray], np.ndarray]  # uint8 [n_blocks * block_bytes] -> float32 [n_blocks * block_elems]


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return raw.reshape(-1, block_bytes)  # [n_blocks, block_bytes]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # Element j < 16 is the low nibble of byte j, element j + 16 its high nibble.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n_blocks, 32] uint8


def _decode_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)
    d = _f16(b[:, :2].copy())  # [n_blocks, 1]
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return (d * q).reshape(-1)


def _decode_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)
    d, m = _f16(b[:, 0:2].copy()), _f16(b[:, 2:4].copy())  # [n_blocks, 1] each
    return (d * _nibbles(b[:, 4:]) + m).reshape(-1)  # two float32 roundings, as the gguf package does


def _decode_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)
    d = _f16(b[:, :2].copy())  # [n_blocks, 1]
    return (d * b[:, 2:].view(np.int8)).reshape(-1)


def _decode_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the upper half of a float32.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4, lambda raw: raw.view("<f4").astype(np.float32)),
    1: GGMLType("F16", 1, 2, _f16),
    2: GGMLType("Q4_0", 32, 18, _decode_q4_0),
    3: GGMLType("Q4_1", 32, 20, _decode_q4_1),
    8: GGMLType("Q8_0", 32, 34, _decode_q8_0),
    30: GGMLType("BF16", 1, 2, _decode_bf16),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # row-major (numpy/torch) order: GGUF's `ne` reversed
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name


class _Cursor:
    """Bounds-checked little-endian reads over a read-only buffer."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"truncated file: {what} needs {n} bytes, only {len(self.buf) - self.pos} left")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        # Each item needs at least min_item_bytes, so a corrupt count fails here instead of looping for ever.
        n = self.u64(f"count of {what}")
        if n * min_item_bytes > len(self.buf) - self.pos:
            raise self.fail(f"{what} count {n} cannot fit in the rest of the file (truncated or corrupt)")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """A metadata value: a Python scalar, str, or (nested) list."""
        if vtype in _SCALARS:
            return np.frombuffer(self.take(_SCALARS[vtype].itemsize, what), _SCALARS[vtype])[0].item()
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"unknown metadata value type {vtype} for {what}")
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_NESTING} in {what}")
        etype = self.u32(f"element type of {what}")
        if etype in _SCALARS:  # packed scalars: one bounded read
            dtype = _SCALARS[etype]
            n = self.count(what, dtype.itemsize)
            return np.frombuffer(self.take(n * dtype.itemsize, what), dtype).tolist()
        if etype not in (_STRING, _ARRAY):
            raise self.fail(f"unknown element type {etype} in array {what}")
        n = self.count(what, 8 if etype == _STRING else 12)  # a string or array header is 8 or 12 bytes
        item = f"element of {what}"
        return [self.value(etype, item, depth + 1) for _ in range(n)]


class GGUFFile:
    """A GGUF file opened read-only: `metadata`, `tensors` (name -> TensorInfo, file order) and `tensor(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from None
        if size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes, the header alone is 24)")
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")  # [file bytes]
        except (OSError, ValueError) as e:  # a folder, no permission, a file that shrank since the stat
            raise GGUFError(f"{self.path}: cannot map the file ({getattr(e, 'strerror', None) or e})") from None
        cur = _Cursor(memoryview(self._data), self.path)
        self.version, tensor_count, kv_count = self._header(cur)
        self.metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(cur.u32(f"value type of {key!r}"), repr(key))
        infos = [self._tensor_info(cur, i) for i in range(tensor_count)]
        alignment = self._alignment()
        base = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, shape, offset, nbytes in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            if offset % alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} offset {offset} is not a multiple of {alignment}")
            if base + offset + nbytes > size:
                raise GGUFError(f"{self.path}: tensor {name!r} data ({nbytes} bytes at {base + offset}) runs past "
                                f"the end of the file ({size} bytes); the file is truncated")
            self.tensors[name] = TensorInfo(name, ggml_type, shape, base + offset, nbytes)

    def _header(self, cur: _Cursor) -> tuple[int, int, int]:
        magic = bytes(cur.take(4, "magic"))
        if magic != MAGIC:
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise cur.fail(f"unsupported GGUF version {version}{hint}; supported: {SUPPORTED_VERSIONS}")
        tensor_count = cur.count("tensors", 24)  # name length, n_dims, type, offset: at least 24 bytes each
        kv_count = cur.count("metadata entries", 13)  # key length, value type, at least 1 value byte
        return version, tensor_count, kv_count

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int, int]:
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.u64(f"shape of {name!r}") for _ in range(n_dims)]
        ggml_type = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        if ggml_type not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r} has ggml type {ggml_type}, which this reader does not support "
                           f"(supported: {', '.join(f'{t.name}={k}' for k, t in GGML_TYPES.items())})")
        t = GGML_TYPES[ggml_type]
        if ne[0] % t.block_elems:
            raise cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the {t.name} block "
                           f"size {t.block_elems}")
        n_elems = math.prod(ne)
        return name, ggml_type, tuple(reversed(ne)), offset, n_elems // t.block_elems * t.block_bytes

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a positive power of two, got {alignment!r}")
        return alignment

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        info = self._info(name)
        return self._data[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantised to a new float32 array of its row-major shape."""
        info = self._info(name)
        return GGML_TYPES[info.ggml_type].decode(np.asarray(self.raw(name))).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
