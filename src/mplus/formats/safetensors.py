"""One .safetensors file: its header read and validated as hostile input, its tensors read and written.

Format: an 8-byte little-endian header length n, n bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}, then the data; offsets count from the end of the header.

Every number of the header is checked before it is used: the header length against the file size before the
header is read, every byte range against the file size before a tensor is allocated, shapes against byte lengths.
A malformed file raises WeightsError naming the file and the problem, never echoing its bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {t: name for name, t in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the 8B checkpoints' headers are ~30 kB; Rust safetensors refuses above 100 MB


class WeightsError(ValueError):
    """A checkpoint file that is malformed or does not fit the model."""


def short(name: Any, limit: int = 80) -> str:
    """A name from a file for an error message: quoted and cut to `limit` characters."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + "...'"


def parse_json(raw: bytes, what: str) -> Any:
    """JSON text read from a file, as hostile input: only WeightsError escapes (not UTF-8, not JSON, nested too
    deep for the parser, a key given twice, an integer of thousands of digits)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise WeightsError(f"{what} is not UTF-8 text (is this the right file?)") from None
    except RecursionError:
        raise WeightsError(f"{what} nests JSON deeper than can be parsed; the file is damaged or hostile") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{what} is not valid JSON ({e.msg} at byte {e.pos})") from None
    except ValueError as e:
        raise WeightsError(f"{what} is not valid JSON ({e})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return out


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a .safetensors file and the byte offset where its data starts; validated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise WeightsError(f"{path} is not a safetensors file, or is truncated: the header length its first "
                                   f"8 bytes declare does not fit the file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror})") from None
    header = parse_json(raw, f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: the safetensors '__metadata__' must map strings to strings")
    data_start, spans = 8 + n, []
    for name, info in header.items():
        spans.append((*_check_entry(path, name, info, size - data_start), name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise WeightsError(f"{path}: tensors {short(a)} and {short(b)} overlap in the file; it is damaged")
    return header, data_start


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> tuple[int, int]:
    what = f"{path}: tensor {short(name)}"
    if not isinstance(info, dict):
        raise WeightsError(f"{what}: its header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WeightsError(f"{what} has dtype {short(dtype, 20)}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise WeightsError(f"{what}: its shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise WeightsError(f"{what}: its data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise WeightsError(f"{what}: its bytes {begin}..{end} lie outside the file's {data_bytes} data bytes "
                           "(truncated download?)")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise WeightsError(f"{what}: shape {shape} of {dtype} does not match its {end - begin} bytes")
    return begin, end


def read_tensor(f, info: dict, data_start: int, dest: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor (of a header validated by read_header) from an open file: straight into `dest` when its
    dtype and layout allow, else into a fresh buffer (then copied and cast into `dest` if given)."""
    dtype = DTYPES[info["dtype"]]
    direct = dest is not None and dest.dtype == dtype and dest.is_contiguous()
    t = dest if direct else torch.empty(info["shape"], dtype=dtype)
    if t.numel():
        f.seek(data_start + info["data_offsets"][0])
        view = t.view(-1).view(torch.uint8).numpy()
        if f.readinto(view) != view.nbytes:
            raise WeightsError(f"{f.name}: unexpected end of file (it changed while being read?)")
    if dest is not None and not direct:
        dest.copy_(t)
        return dest
    return t


def write_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], sha256: bool = False) -> str:
    """Write `tensors` as one safetensors file; return the sha256 of its bytes if asked (costs ~1 s per GB).

    Tensors are laid out widest dtype first (as the safetensors library does), so each starts aligned to its
    dtype; each is made contiguous only while it is written, so a packed model is never copied whole.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise WeightsError(f"cannot save tensor {short(name)}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256() if sha256 else None
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            if digest is not None:
                digest.update(chunk)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                data = t.cpu().contiguous().view(-1).view(torch.uint8).numpy()  # [nbytes]
                f.write(data)
                if digest is not None:
                    digest.update(data)
    return digest.hexdigest() if digest is not None else ""
