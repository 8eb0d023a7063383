"""mplus.formats.gguf: synthetic files from the hand-written writer in conftest.py, malformed files, and the real GGUF
against the `gguf` package's dequantiser."""
from __future__ import annotations

import importlib
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import gguf_bytes
from mplus.formats.gguf import GGUFError, GGUFFile

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


def f16(x: float) -> float:
    return float(np.float16(x))


# --- block encoders and element-by-element expected values, straight from ggml's block formulas ---

def _nibble_bytes(q: list[int]) -> bytes:
    # Element j is the low nibble of byte j, element j + 16 its high nibble.
    return bytes(q[j] | (q[j + 16] << 4) for j in range(16))


def q4_0_block(d: float, q: list[int]) -> tuple[bytes, list[np.float32]]:
    return (np.float16(d).tobytes() + _nibble_bytes(q),
            [np.float32(f16(d)) * np.float32(x - 8) for x in q])


def q4_1_block(d: float, m: float, q: list[int]) -> tuple[bytes, list[np.float32]]:
    return (np.float16(d).tobytes() + np.float16(m).tobytes() + _nibble_bytes(q),
            [np.float32(f16(d)) * np.float32(x) + np.float32(f16(m)) for x in q])


def q8_0_block(d: float, q: list[int]) -> tuple[bytes, list[np.float32]]:
    return (np.float16(d).tobytes() + bytes(x & 0xFF for x in q),
            [np.float32(f16(d)) * np.float32(x) for x in q])


def quantised(encode, n_blocks: int, rng: np.random.Generator, q_range: tuple[int, int],
              with_min: bool = False) -> tuple[bytes, np.ndarray]:
    """n_blocks random blocks: their bytes and the float32 values they stand for."""
    data, values = b"", []
    for _ in range(n_blocks):
        scales = [rng.uniform(-2, 2)] + ([rng.uniform(-1, 1)] if with_min else [])
        block, vals = encode(*scales, [int(x) for x in rng.integers(*q_range, size=32)])
        data, values = data + block, values + vals
    return data, np.array(values, dtype=np.float32)


def read(tmp_path: Path, data: bytes) -> GGUFFile:
    path = tmp_path / "t.gguf"
    path.write_bytes(data)
    return GGUFFile(path)


METADATA = {
    "general.architecture": (8, "llama"),
    "u8": (0, 200), "i8": (1, -5), "u16": (2, 60000), "i16": (3, -30000), "u32": (4, 4_000_000_000),
    "i32": (5, -2_000_000_000), "f32": (6, 1e-5), "yes": (7, True), "no": (7, False), "str": (8, "héllo 🙂"),
    "u64": (10, 2**63 + 5), "i64": (11, -2**62), "f64": (12, 0.1), "empty": (8, ""),
    "ints": (9, (5, [1, -2, 3])), "bools": (9, (7, [True, False])), "strs": (9, (8, ["a", "", "日本"])),
    "nested": (9, (9, [(5, [1, 2]), (8, ["x"]), (9, [(0, [7])]), (12, [])])),
}
EXPECTED_METADATA = {
    "general.architecture": "llama",
    "u8": 200, "i8": -5, "u16": 60000, "i16": -30000, "u32": 4_000_000_000, "i32": -2_000_000_000,
    "f32": float(np.float32(1e-5)), "yes": True, "no": False, "str": "héllo 🙂", "u64": 2**63 + 5, "i64": -2**62,
    "f64": 0.1, "empty": "", "ints": [1, -2, 3], "bools": [True, False], "strs": ["a", "", "日本"],
    "nested": [[1, 2], ["x"], [[7]], []],
}


def test_metadata_all_value_types(tmp_path):
    g = read(tmp_path, gguf_bytes(METADATA, []))
    assert g.version == 3 and g.tensors == {}
    assert g.metadata == EXPECTED_METADATA
    assert all(type(g.metadata[k]) is type(v) for k, v in EXPECTED_METADATA.items())


@pytest.mark.parametrize("alignment", [32, 64, 8])
def test_tensors_dequantise_exactly(tmp_path, alignment):
    rng = np.random.default_rng(alignment)
    q4_0, q4_0_ref = quantised(q4_0_block, 6, rng, (0, 16))
    q4_1, q4_1_ref = quantised(q4_1_block, 4, rng, (0, 16), with_min=True)
    q8_0, q8_0_ref = quantised(q8_0_block, 3, rng, (-128, 128))
    f32 = rng.standard_normal((2, 3, 5)).astype(np.float32)
    f16v = rng.standard_normal(7).astype(np.float16)
    bf16_bits = np.array([0x3F80, 0xC000, 0x0001, 0x7F80, 0x4049], dtype="<u2")  # 1, -2, tiny, inf, 3.140625
    tensors = [("q4_0", [64, 3], Q4_0, q4_0), ("q4_1", [32, 2, 2], Q4_1, q4_1), ("q8_0", [96], Q8_0, q8_0),
               ("f32", [5, 3, 2], F32, f32.tobytes()), ("f16", [7], F16, f16v.tobytes()),
               ("bf16", [5], BF16, bf16_bits.tobytes())]
    md = {"general.alignment": (4, alignment)} if alignment != 32 else {}
    g = read(tmp_path, gguf_bytes(md, tensors, alignment=alignment))
    assert list(g.tensors) == [t[0] for t in tensors]
    assert all(info.offset % alignment == 0 for info in g.tensors.values())
    expected = {"q4_0": q4_0_ref.reshape(3, 64), "q4_1": q4_1_ref.reshape(2, 2, 32), "q8_0": q8_0_ref,
                "f32": f32, "f16": f16v.astype(np.float32),
                "bf16": np.array([1.0, -2.0, 2.0**-133, np.inf, 3.140625], dtype=np.float32)}
    for name, ref in expected.items():
        out = g.tensor(name)
        assert out.dtype == np.float32 and out.shape == ref.shape, name
        np.testing.assert_array_equal(out, ref, err_msg=name)
    assert g.tensors["q4_1"].type_name == "Q4_1" and g.tensors["q4_1"].nbytes == 4 * 20
    assert g.tensor("f32").flags.writeable  # a fresh array, not a view of the mapped file


def test_version_2_is_read(tmp_path):
    g = read(tmp_path, gguf_bytes({"a": (8, "b")}, [("x", [2], F32, b"\0" * 8)], version=2))
    assert g.version == 2 and g.metadata == {"a": "b"} and g.tensor("x").tolist() == [0.0, 0.0]


def _valid() -> bytes:
    rng = np.random.default_rng(1)
    q4_1, _ = quantised(q4_1_block, 2, rng, (0, 16), with_min=True)
    return gguf_bytes({"s": (8, "ab"), "arr": (9, (8, ["x", "yz"])), "n": (9, (9, [(4, [1])]))},
                      [("a", [32, 2], Q4_1, q4_1), ("b", [3], F32, b"\1" * 12)])


VALID = _valid()
HEADER = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)  # one metadata entry follows


def _with_tensor(ne, ggml_type=F32, offset=0) -> bytes:
    """One tensor info written by hand (the writer only writes valid ones) and 256 bytes of data."""
    info = (struct.pack("<Q", 1) + b"t" + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", ggml_type, offset))
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info
    return head + b"\0" * (-len(head) % 32) + b"\0" * 256


MALFORMED = {
    "empty": (b"", "only 0 bytes"),
    "bad magic": (b"GGML" + VALID[4:], "magic b'GGML'"),
    "version 1": (VALID[:4] + struct.pack("<I", 1) + VALID[8:], "unsupported GGUF version 1"),
    "big-endian": (VALID[:4] + struct.pack(">I", 3) + VALID[8:], "big-endian"),
    "truncated metadata": (HEADER + struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 5) + b"ab",
                           "truncated file: 'k' needs 5 bytes, only 2 left"),
    "string past EOF": (HEADER + struct.pack("<Q", 10**12) + b"key" + b"\0" * 16, "needs 1000000000000 bytes"),
    "unknown value type": (HEADER + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 13) + b"\0" * 16,
                           "unknown metadata value type 13"),
    "unknown element type": (HEADER + struct.pack("<Q", 1) + b"k" + struct.pack("<II", 9, 77) + b"\0" * 16,
                             "unknown element type 77"),
    "array count": (HEADER + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**40) + b"\0" * 16,
                    "cannot fit"),
    "tensor count": (b"GGUF" + struct.pack("<IQQ", 3, 2**50, 0) + b"\0" * 64, "tensors count"),
    "bad UTF-8 key": (HEADER + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 0) + b"\0", "UTF-8"),
    "deep nesting": (HEADER + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
                     + struct.pack("<IQ", 9, 1) * 9 + struct.pack("<IQ", 0, 0), "nested deeper"),
    "unknown ggml type": (_with_tensor([32], ggml_type=12), "ggml type 12"),
    "partial block": (_with_tensor([33, 2], ggml_type=Q4_0), "not a multiple of the Q4_0 block size 32"),
    "too many dims": (_with_tensor([1, 1, 1, 1, 1]), "5 dimensions"),
    "data past EOF": (_with_tensor([1000]), "runs past the end of the file"),
    "misaligned offset": (_with_tensor([4], offset=4), "not a multiple of 32"),
    "duplicate key": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + (struct.pack("<Q", 1) + b"a" + struct.pack("<IB", 0, 1)) * 2
                      + b"\0" * 16, "duplicate metadata key 'a'"),
    "bad alignment": (gguf_bytes({"general.alignment": (4, 24)}, []), "power of two"),
    "alignment type": (gguf_bytes({"general.alignment": (8, "32")}, []), "power of two"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_clear_errors(tmp_path, case):
    data, message = MALFORMED[case]
    with pytest.raises(GGUFError, match=str(tmp_path / "t.gguf")) as err:
        read(tmp_path, data)
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


def test_duplicate_tensor_and_unknown_name(tmp_path):
    t = ("w", [2], F32, b"\0" * 8)
    with pytest.raises(GGUFError, match="duplicate tensor name 'w'"):
        read(tmp_path, gguf_bytes({}, [t, t]))
    with pytest.raises(KeyError, match="no tensor named 'v'"):
        read(tmp_path, gguf_bytes({}, [t])).tensor("v")


def _open_and_read_all(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.gguf"
        path.write_bytes(data)
        g = GGUFFile(path)
        for name in g.tensors:
            g.tensor(name)


@pytest.fixture(scope="module")
def valid_data_end(tmp_path_factory) -> int:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    path.write_bytes(VALID)
    return max(info.offset + info.nbytes for info in GGUFFile(path).tensors.values())


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(VALID) - 1))
def test_truncation_raises_only_gguf_error(valid_data_end, cut):
    try:
        _open_and_read_all(VALID[:cut])
    except GGUFError:
        return
    assert cut >= valid_data_end, "a file cut before its last tensor's data must not open"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corruption_raises_only_gguf_error(changes):
    data = bytearray(VALID)
    for pos, byte in changes:
        data[pos] = byte
    try:
        _open_and_read_all(bytes(data))
    except GGUFError:
        pass


# --- the real SmolLM2 GGUF ---

@pytest.mark.real
def test_real_gguf_matches_the_gguf_package(artifacts):
    oracle = importlib.import_module("gguf")  # test extra; a missing oracle must fail, not skip
    from gguf.quants import dequantize

    g = GGUFFile(artifacts.smollm2_gguf)
    ref = oracle.GGUFReader(artifacts.smollm2_gguf)
    assert g.version == 3 and len(g.tensors) == 272 and len(g.metadata) == 33
    assert {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")} == g.metadata
    assert Counter(t.type_name for t in g.tensors.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert [t.name for t in ref.tensors] == list(g.tensors)
    for t in ref.tensors:
        expected = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        out = g.tensor(t.name)
        assert out.shape == expected.shape, t.name
        assert np.array_equal(out.view(np.uint32), expected.view(np.uint32)), t.name  # bit for bit


@pytest.mark.real
def test_real_gguf_metadata(artifacts):
    md = GGUFFile(artifacts.smollm2_gguf).metadata
    assert md["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.attention.head_count"],
            md["llama.attention.head_count_kv"], md["llama.rope.freq_base"]) == (30, 576, 9, 3, 100000.0)
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and len(md["tokenizer.ggml.merges"]) == 48900
    assert md["tokenizer.ggml.token_type"].count(3) == 17 and "general.alignment" not in md
