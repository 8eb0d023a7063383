"""Hostile weight files: malformed safetensors headers and indexes, paths and links out of the model folder, and
GGUF files that cannot be read all end in the project's own error, with a message that echoes no file bytes."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mplus import WeightsError
from mplus.formats.gguf import GGUFError, GGUFFile
from mplus.formats.hf_folder import checkpoint_index, read_tensors

W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # a valid entry: two float32 values
DATA = struct.pack("<2f", 1.5, -2.0)


def st_bytes(header: dict | bytes, data: bytes = DATA) -> bytes:
    """A safetensors file written by hand: 8-byte little-endian header length, the header JSON, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def read_all(folder):
    """Every tensor of a checkpoint folder, through the same path the model loaders take."""
    return read_tensors(folder, list(checkpoint_index(folder)))


def test_a_hand_written_file_reads(tmp_path):  # the reference for the broken variants below
    (tmp_path / "model.safetensors").write_bytes(st_bytes({"w": W}))
    assert torch.equal(read_all(tmp_path)["w"], torch.tensor([1.5, -2.0]))


DEEP = 100_000
BAD_HEADERS = {
    "JSON nested 10^5 deep": b'{"w": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "string offsets": {"w": {**W, "data_offsets": ["0", "8"]}},
    "float shape": {"w": {**W, "shape": [2.0]}},
    "bool shape": {"w": {**W, "shape": [True, 2], "data_offsets": [0, 8]}},
    "1e400 in a shape": b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}',
    "an integer of 5000 digits": b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
    "__metadata__ not a string map": {"__metadata__": {"format": 5}, "w": W},
    "overlapping tensors": {"w": W, "v": {**W, "shape": [1], "data_offsets": [4, 8]}},
    "a tensor named twice": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_malformed_header_is_a_weights_error(tmp_path, case):
    (tmp_path / "model.safetensors").write_bytes(st_bytes(BAD_HEADERS[case]))
    with pytest.raises(WeightsError, match="model.safetensors"):
        read_all(tmp_path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.floats() | st.integers(-2, 40) | st.text(max_size=4),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=JSON_VALUES, data=st.binary(max_size=40))
def test_any_header_value_reads_or_is_a_weights_error(tmp_path, field, value, data):
    (tmp_path / "model.safetensors").write_bytes(st_bytes({"w": {**W, field: value}}, data))
    try:
        t = read_all(tmp_path)["w"]
    except WeightsError:
        return
    assert t.numel() * t.element_size() <= len(data)  # what did read came from the file's data


def test_a_non_safetensors_file_is_refused_without_echoing_its_bytes(tmp_path):
    text = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    (tmp_path / "model.safetensors").write_bytes(text)
    with pytest.raises(WeightsError, match="not a safetensors file") as err:
        read_all(tmp_path)
    assert str(struct.unpack("<Q", text[:8])[0]) not in str(err.value) and "root:x" not in str(err.value)


# --------------------------------------------------------------------------------------- indexes

def write_index(folder, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["w"]}, "weight_map"),
    ({"weight_map": {"w": 5}}, "weight_map"),
    (b'{"weight_map": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nests JSON deeper"),
    (b'{"weight_map": {"w": "\xff.safetensors"}}', "not UTF-8"),
    ({"weight_map": {"w": "absent.safetensors"}}, "'absent.safetensors', which is not in the folder"),
])
def test_malformed_index_is_a_weights_error(tmp_path, index, message):
    (tmp_path / "a.safetensors").write_bytes(st_bytes({"w": W}))
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    (tmp_path / "model.safetensors.index.json").write_bytes(raw)
    with pytest.raises(WeightsError, match=message):
        read_all(tmp_path)


# --------------------------------------------------------------------------------------- paths stay inside

@pytest.fixture
def outside(tmp_path):
    """A valid shard in a folder beside the model folder, and the (empty) model folder."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "shard.safetensors").write_bytes(st_bytes({"w": W}))
    (tmp_path / "model").mkdir()
    return tmp_path / "outside" / "shard.safetensors", tmp_path / "model"


@pytest.mark.parametrize("name", ["../outside/shard.safetensors", "ABSOLUTE", "/etc/passwd", "sub/shard.safetensors"])
def test_index_names_outside_the_folder_are_refused(outside, name):
    shard, folder = outside
    (folder / "sub").mkdir()
    (folder / "sub" / "shard.safetensors").write_bytes(shard.read_bytes())
    write_index(folder, {"w": str(shard) if name == "ABSOLUTE" else name})
    with pytest.raises(WeightsError, match="not a plain file name") as err:
        read_all(folder)
    assert "root:x" not in str(err.value)


@pytest.mark.parametrize("file", ["model.safetensors", "shard.safetensors"])
def test_links_out_of_the_folder_are_refused(outside, file):
    shard, folder = outside
    os.symlink(shard, folder / file)
    if file != "model.safetensors":
        write_index(folder, {"w": file})
    with pytest.raises(WeightsError, match="outside the model folder"):
        read_all(folder)


def test_a_link_inside_the_folder_is_fine(outside):
    shard, folder = outside
    (folder / "real.safetensors").write_bytes(shard.read_bytes())
    os.symlink("real.safetensors", folder / "model.safetensors")
    assert torch.equal(read_all(folder)["w"], torch.tensor([1.5, -2.0]))


# --------------------------------------------------------------------------------------- GGUF

def test_gguf_path_that_is_a_folder_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot map the file"):
        GGUFFile(tmp_path)
