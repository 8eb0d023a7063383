"""Hypothesis strategies that damage valid files: byte-level mutations, and structure-aware JSON mutations that
swap a value for a hostile one (wrong type, huge, negative, non-finite, nested 10^5 deep) or reshape the document.

Imported by tests/test_fuzz.py and tests/fuzz_survey.py as `from fuzz_mutations import ...`.
"""
from __future__ import annotations

import copy
import json
import re
import struct

from hypothesis import strategies as st

# A string value "\0RAW:text" is written into the JSON document as the bare text: numbers Python's json never
# writes (1e400, -0, 1e-400), broken tokens, or nesting too deep for any recursive parser.
RAW = "\0RAW:"
DEEP = 100_000


def raw(text: str) -> str:
    return RAW + text


def dumps(doc) -> str:
    """json.dumps, with RAW strings replaced by their bare text."""
    return re.sub(r'"\\u0000RAW:((?:[^"\\]|\\.)*)"', lambda m: json.loads(f'"{m.group(1)}"'), json.dumps(doc))


HOSTILE = [
    None, True, False, 0, -1, -(2**63), 2**63, 2**64, 10**30, 0.5, -1.5, 1e308, "", "x", "12", "../../etc/passwd",
    "/etc/passwd", "\ud800", "\x00", [], [1, 2], [[[]]], {}, {"a": 1}, [None], ["F32"], {"dtype": "F32"},
    float("nan"), float("inf"), -float("inf"),
    raw("1e400"), raw("-1e400"), raw("1e-400"), raw("-0"), raw("123456789012345678901234567890"),
    raw("[" * DEEP + "]" * DEEP), raw('{"a":' * DEEP + "1" + "}" * DEEP),
]


def hostile_values(allow_raw: bool = True) -> st.SearchStrategy:
    """One value of a wrong kind, or a random number or text."""
    fixed = [v for v in HOSTILE if allow_raw or not (isinstance(v, str) and v.startswith(RAW))]
    return st.one_of(st.sampled_from(fixed), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))


@st.composite
def mutated_json(draw, doc, allow_raw: bool = True, max_depth: int = 12, log: list | None = None):
    """A deep copy of `doc` with 1-3 mutations, each at a node reached by a random walk from the root (so shallow
    nodes, where the structure lives, are hit more often than the leaves of a long list). Each mutation is
    described in `log` if given."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        doc = _mutate_once(draw, doc, allow_raw, max_depth, [] if log is None else log)
    return doc


def _mutate_once(draw, doc, allow_raw: bool, max_depth: int, log: list):
    parent, key, node, path = None, None, doc, []
    for _ in range(max_depth):
        children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not children or draw(st.booleans()) and draw(st.booleans()):  # stop with probability 1/4 per level
            break
        pick = draw(st.sampled_from(children[:50]) if len(children) <= 50 or draw(st.booleans())
                    else st.sampled_from(children))
        parent, key, node = node, pick, node[pick]
        path.append(pick)
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "insert", "wrap"]))
    value = copy.deepcopy(draw(hostile_values(allow_raw)))  # a later mutation may edit it in place
    shown = repr(value)
    log.append(f"{action} {path}" + (f" with {shown[:60]}{'...' if len(shown) > 60 else ''}"
                                     if action in ("replace", "insert") else ""))
    if parent is None:  # the root itself
        return value if action in ("replace", "delete") else [doc] if action == "wrap" else _insert(draw, doc, value)
    if action == "delete":
        del parent[key]
    elif action == "insert":
        parent[key] = _insert(draw, node, value)
    elif action == "wrap":
        parent[key] = [node]
    else:
        parent[key] = value
    return doc


def _insert(draw, node, value):
    if isinstance(node, dict):
        node[draw(st.sampled_from(["", "__metadata__", "x", "weight_map", "0"]))] = value
    elif isinstance(node, list):
        node.insert(draw(st.integers(0, len(node))), value)
    else:
        return value
    return node


@st.composite
def mutated_bytes(draw, data: bytes, log: list | None = None) -> bytes:
    """`data` truncated, with bits flipped, a range overwritten, bytes inserted, or a little-endian integer field
    overwritten by an extreme value (counts, lengths and offsets of binary formats)."""
    buf = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "integer", "empty"]))
    if log is not None:
        log.append(f"bytes: {kind}")
    if kind == "empty" or not buf:
        return b""
    if kind == "truncate":
        return bytes(buf[:draw(st.integers(0, len(buf) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "overwrite":
        i = draw(st.integers(0, len(buf) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[i:i + len(chunk)] = chunk
        return bytes(buf)
    if kind == "insert":
        i = draw(st.integers(0, len(buf)))
        return bytes(buf[:i] + draw(st.binary(min_size=1, max_size=16)) + buf[i:])
    # an aligned 4- or 8-byte field near the start (where the headers are) set to an extreme value
    width = draw(st.sampled_from([4, 8]))
    head = min(len(buf), 4096) - width
    if head < 0:
        return bytes(buf)
    i = draw(st.integers(0, head // width)) * width
    value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, len(buf), len(buf) + 1]))
    buf[i:i + width] = struct.pack("<I" if width == 4 else "<Q", value % 2 ** (8 * width))
    return bytes(buf)


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    """(header document, body) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_file(header_text: str | bytes, body: bytes) -> bytes:
    head = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(head)) + head + body


@st.composite
def mutated_safetensors(draw, data: bytes, log: list | None = None) -> bytes:
    """A safetensors file damaged at the byte level, in its header document, or with a non-UTF-8 or mis-sized
    header."""
    header, body = safetensors_parts(data)
    kind = draw(st.sampled_from(["bytes", "header", "header", "header", "not-utf8", "length"]))
    log = [] if log is None else log
    if kind == "bytes":
        return draw(mutated_bytes(data, log))
    if kind == "header":
        log.append("header:")
        return safetensors_file(dumps(draw(mutated_json(header, log=log))), body)
    log.append(f"header {kind}")
    if kind == "not-utf8":
        text = json.dumps(header).encode()
        i = draw(st.integers(0, len(text) - 1))
        return safetensors_file(text[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + text[i:], body)
    text = json.dumps(header).encode()
    n = draw(st.sampled_from([0, 1, len(text) - 1, len(text) + 1, len(text) + len(body), 2**63, 2**64 - 1]))
    return struct.pack("<Q", n % 2**64) + text + body
