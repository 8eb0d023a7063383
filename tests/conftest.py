"""Shared by the tests: the real artifacts (fetched once per session) and a tiny hand-written GGUF writer,
imported by test modules as `from conftest import gguf_bytes`."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CI runs the same examples every time (a red CI must be reproducible); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


# Outputs of the official M+ and MemoryLLM classes on tiny checkpoints (each folder's README says how they were made).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-mplus-tiny"
OFFICIAL_MEMORYLLM_TINY = FIXTURES / "official-memoryllm-tiny"


@pytest.fixture(scope="session")
def artifacts():
    """mplus.apps.fetch.fetch_all() under $MPLUS_CACHE: downloads on the first run, only verifies afterwards."""
    from mplus.apps.fetch import fetch_all

    return fetch_all(progress=False)


# --- GGUF writer, independent of mplus.formats.gguf: values are (GGUF value type, Python value) pairs ---

_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, v) -> bytes:
    if vtype == 8:
        return _string(v)
    if vtype == 9:  # v = (element type, [elements])
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, x) for x in items)
    return struct.pack(_PACK[vtype], v)


def gguf_bytes(metadata: dict, tensors: list[tuple[str, list[int], int, bytes]], alignment: int = 32,
               version: int = 3) -> bytes:
    """A GGUF file: metadata {key: (type, value)}, tensors [(name, ne fastest-first, ggml type, data bytes)]."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    out += [_string(k) + struct.pack("<I", t) + _value(t, v) for k, (t, v) in metadata.items()]
    offset, blobs = 0, []
    for name, ne, ggml_type, data in tensors:
        out.append(_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                   + struct.pack("<IQ", ggml_type, offset))
        pad = -len(data) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"".join(out)
    return head + b"\0" * (-len(head) % alignment) + b"".join(blobs)


@pytest.fixture(scope="module")
def one_thread():
    """The models are tiny: one thread is faster, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
