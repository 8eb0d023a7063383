"""Saving and loading memory states: exact round trips, atomic writes, and clear errors for damaged files or a
state from a different model. States are built directly from small random tensors; no model is needed."""
from __future__ import annotations

import json
import os
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import mplus.memory.state_file as state_io
from mplus.memory.ltm import DroppedRows, LayerLTM
from mplus.memory.state import MemoryState
from mplus.memory.state_file import StateError, describe_state, save_state

L, N, D, D_S = 3, 6, 8, 4
STEP = 3  # update_step: memory tokens written since the last merge, so the cache holds STEP rows in every layer
LTM_SIZES, CACHE_SIZES = (5, 0, 7), (STEP,) * L  # a 0-row LTM layer
FILE_PROBLEMS = HealthCheck.function_scoped_fixture  # the tests only overwrite one file in tmp_path


def make_state(kind: str = "mplus", dtype: torch.dtype = torch.float32, seed: int = 0) -> MemoryState:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    torch.randperm(10, generator=g)  # a generator that has moved on from its seed
    rows = lambda n, width: torch.randn(n, width).to(dtype)  # noqa: E731
    ages = lambda n: torch.randint(0, 3000, (n,), dtype=torch.int64)  # noqa: E731
    stm, stm_ages = torch.randn(L, N, D).to(dtype), torch.randint(0, 256, (L, N), dtype=torch.int64)
    ltm = [(rows(s, D), rows(s, D_S), ages(s), torch.rand(s, dtype=torch.float64) * 10) for s in LTM_SIZES]
    cache = [DroppedRows(rows(c, D), rows(c, D_S), ages(c)) for c in CACHE_SIZES]
    state = MemoryState(stm=stm, stm_ages=stm_ages, ltm=[LayerLTM(*m, c) for m, c in zip(ltm, cache)],
                        update_step=STEP, generator=g)
    return state if kind == "mplus" else state.without_ltm()


def all_tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    out = {"stm": state.stm, "stm_ages": state.stm_ages}
    for l, m in enumerate(state.ltm or []):
        out |= m.tensors(l)
    return out


def assert_same(a: MemoryState, b: MemoryState) -> None:
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert (a.ltm is None) == (b.ltm is None) and a.update_step == b.update_step
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.fixture
def saved(tmp_path):
    """(state, path, file bytes) for a saved M+ state."""
    state, path = make_state(), tmp_path / "state.safetensors"
    save_state(state, path)
    return state, path, path.read_bytes()


def rewrite(path, edit_meta=None, edit_tensors=None, rehash=False) -> None:
    """Rewrite a saved file as valid safetensors with edited metadata or tensors (optionally with a fresh hash)."""
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[state_io.META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (edit_meta or (lambda m: None))(meta)
    (edit_tensors or (lambda t: None))(tensors)
    if rehash:
        meta["sha256"] = state_io._digest(meta, tensors)
    save_file(tensors, path, metadata={state_io.META_KEY: json.dumps(meta)})


# ------------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", ["mplus", "memoryllm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, kind, dtype):
    state = make_state(kind, dtype)
    state.stm_kv = types.SimpleNamespace(kv=[(torch.zeros(1), torch.zeros(1))])  # derived: must not be saved
    state.save(tmp_path / "s.safetensors")
    loaded = MemoryState.load(tmp_path / "s.safetensors")
    assert_same(state, loaded)
    assert loaded.stm_kv is None
    assert loaded.stm_ages.dtype == torch.int64
    if kind == "mplus":
        assert [m.rows.shape for m in loaded.ltm] == [(s, D) for s in LTM_SIZES]
        assert [m.keys.shape for m in loaded.ltm] == [(s, D_S) for s in LTM_SIZES]
        assert [m.cache.keys.shape for m in loaded.ltm] == [(c, D_S) for c in CACHE_SIZES]
        assert all(m.rf.dtype == torch.float64 for m in loaded.ltm)
    # The generator resumes where the original is: the next STM drops are the same.
    assert torch.equal(torch.randperm(32, generator=loaded.generator), torch.randperm(32, generator=state.generator))


def test_tensors_that_share_memory(tmp_path):
    """One tensor listed for every layer (as a fresh model state does), and views into a larger tensor."""
    state = make_state()
    rf = torch.full((max(LTM_SIZES),), 10.0, dtype=torch.float64)
    same, keys, ages = torch.randn(4, D), torch.randn(4, D_S), torch.arange(3 * L * 4).view(3, L, 4)[1]
    for l, m in enumerate(state.ltm):
        m.rf = rf[:len(m)]  # views of one tensor
        m.cache = DroppedRows(same, keys, ages[l])  # one tensor for every layer; rows of the middle of a bigger one
    state.update_step = 4  # the 4 cached rows
    state.save(tmp_path / "s.safetensors")
    assert_same(state, MemoryState.load(tmp_path / "s.safetensors"))


def test_metadata_describes_the_state(saved):
    _, path, _ = saved
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[state_io.META_KEY])
    assert meta["format"] == "mplus-state" and meta["version"] == 2 and meta["kind"] == "mplus"
    assert meta["stm_shape"] == [L, N, D] and meta["key_dim"] == D_S and meta["update_step"] == STEP
    assert meta["ltm_sizes"] == list(LTM_SIZES) and meta["cache_sizes"] == list(CACHE_SIZES)
    assert meta["dtype"] == "float32" and len(meta["sha256"]) == 64


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    make_state(seed=1).save(path)
    before = path.read_bytes()

    def crash(filename, tensors, metadata=None):
        open(filename, "wb").write(b"partial")  # half a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(state_io, "write_file", crash)
    with pytest.raises(OSError, match="disk full"):
        make_state(seed=2).save(path)
    assert path.read_bytes() == before  # the previous state is intact
    assert os.listdir(tmp_path) == ["s.safetensors"]  # and no temporary file is left


def test_save_rejects_a_malformed_state(tmp_path):
    state = make_state()
    state.ltm[0].ages = state.ltm[0].ages.double()
    with pytest.raises(StateError, match=r"cannot save .*ltm_ages\.0 has dtype torch.float64"):
        save_state(state, tmp_path / "s.safetensors")
    state = make_state()
    state.ltm[1] = None  # a layer without its record
    with pytest.raises(StateError, match="not one LayerLTM per layer"):
        save_state(state, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


# ------------------------------------------------------------------------------------------------ damaged files

@settings(max_examples=30, suppress_health_check=[FILE_PROBLEMS])
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_file(saved, fraction):
    _, path, data = saved
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(StateError, match="not a readable safetensors file"):
        MemoryState.load(path)


def test_flipped_data_byte(saved):
    _, path, data = saved
    flipped = bytearray(data)
    flipped[-100] ^= 0x01  # in the tensor data region, the file stays valid safetensors
    path.write_bytes(bytes(flipped))
    with pytest.raises(StateError, match="file was modified or corrupted"):
        MemoryState.load(path)


@settings(max_examples=60, suppress_health_check=[FILE_PROBLEMS])
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_flipped_byte_is_detected_or_harmless(saved, where, mask):
    state, path, data = saved
    flipped = bytearray(data)
    flipped[int(len(data) * where)] ^= mask
    path.write_bytes(bytes(flipped))
    try:
        loaded = MemoryState.load(path)
    except StateError:
        return
    assert_same(state, loaded)  # e.g. header padding turned into other whitespace


def test_edited_metadata(saved):
    _, path, _ = saved
    rewrite(path, edit_meta=lambda m: m.update(update_step=0))
    with pytest.raises(StateError, match="file was modified or corrupted"):
        MemoryState.load(path)


def test_edited_tensor_with_a_valid_file(saved):
    _, path, _ = saved
    rewrite(path, edit_tensors=lambda t: t["ltm_ages.2"].add_(1))
    with pytest.raises(StateError, match="file was modified or corrupted"):
        MemoryState.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("cache_keys.1"), "tensors missing: cache_keys.1"),
    (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensors: extra"),
    (lambda t: t.update({"ltm_rf.0": t["ltm_rf.0"].float()}), "ltm_rf.0 has dtype torch.float32"),
    (lambda t: t.update({"ltm_keys.2": torch.zeros(7, D_S + 1)}), r"ltm_keys.2 has shape \[7, 5\], expected \[7, 4\]"),
])
def test_inconsistent_file_with_a_valid_hash(saved, edit, message):
    _, path, _ = saved
    rewrite(path, edit_tensors=edit, rehash=True)  # integrity is fine; the content is not a valid state
    with pytest.raises(StateError, match=message):
        MemoryState.load(path)


def test_other_format_version(saved):
    _, path, _ = saved
    rewrite(path, edit_meta=lambda m: m.update(version=3), rehash=True)
    with pytest.raises(StateError, match="version 3.*reads versions 1, 2"):
        MemoryState.load(path)


def test_missing_path_and_other_files(tmp_path):
    with pytest.raises(StateError, match="no memory-state file there"):
        MemoryState.load(tmp_path / "nope.safetensors")
    with pytest.raises(StateError, match="no memory-state file there"):
        MemoryState.load(tmp_path)  # a folder
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(StateError, match="not a memory state saved by mplus"):
        MemoryState.load(tmp_path / "model.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(StateError, match=r"text.safetensors: it is not a readable safetensors file"):
        MemoryState.load(tmp_path / "text.safetensors")


def test_failed_load_leaves_the_current_state_untouched(saved, tmp_path):
    _, path, data = saved
    current = make_state(seed=7)
    backup = current.copy()
    path.write_bytes(data[:-10])
    with pytest.raises(StateError):
        current = MemoryState.load(path)
    assert_same(current, backup)


# --------------------------------------------------------------------------------------------------- expect

EXPECT = {"kind": "mplus", "num_layers": L, "num_stm_rows": N, "hidden_size": D, "key_dim": D_S,
          "dtype": torch.float32}


@pytest.mark.parametrize("field, value", [("num_layers", 32), ("num_stm_rows", 10240), ("hidden_size", 4096),
                                          ("key_dim", 256), ("kind", "memoryllm")])
def test_state_from_a_different_model(saved, field, value):
    _, path, _ = saved
    assert_same(MemoryState.load(path, EXPECT), saved[0])
    with pytest.raises(StateError, match=f"different model: {field} is {EXPECT[field]!r} in the file but {value!r}"):
        MemoryState.load(path, EXPECT | {field: value})


def test_memoryllm_state_for_an_mplus_model(tmp_path):
    make_state("memoryllm").save(tmp_path / "s.safetensors")
    with pytest.raises(StateError, match="kind is 'memoryllm' in the file but 'mplus'"):
        MemoryState.load(tmp_path / "s.safetensors", EXPECT)


def test_expect_converts_the_dtype(saved):
    state, path, _ = saved
    loaded = MemoryState.load(path, {"dtype": torch.bfloat16})
    for t in [loaded.stm, *(t for m in loaded.ltm for t in (m.rows, m.keys, m.cache.rows, m.cache.keys))]:
        assert t.dtype == torch.bfloat16
    assert torch.equal(loaded.stm, state.stm.bfloat16())
    assert all(m.rf.dtype == torch.float64 for m in loaded.ltm) and loaded.stm_ages.dtype == torch.int64


def test_expect_as_an_object_and_typos(saved):
    _, path, _ = saved
    MemoryState.load(path, types.SimpleNamespace(**EXPECT))
    with pytest.raises(TypeError, match="lacks the attributes"):
        MemoryState.load(path, types.SimpleNamespace(num_layers=L))
    with pytest.raises(TypeError, match="unknown expect fields"):
        MemoryState.load(path, {"layers": L})


# --------------------------------------------------------------------------------------------------- describe

def test_describe_shows_the_sizes():
    state = make_state()
    text = state.describe()
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith(f"M+ memory state: {L} layers, STM {N} rows x d={D} (float32), retriever keys d_s={D_S}")
    assert f"update_step {STEP}" in lines[0]
    for l in range(L):  # layer, STM rows, ..., LTM rows, ..., cache rows
        cells = lines[2 + l].split()
        assert cells[:2] == [str(l), str(N)] and cells[-1] == str(CACHE_SIZES[l]) and str(LTM_SIZES[l]) in cells
    assert f"LTM {sum(LTM_SIZES)} rows, cache {sum(CACHE_SIZES)} rows" in lines[-1]
    assert len(lines) == L + 3 and max(map(len, lines)) < 120
    short = describe_state(make_state("memoryllm"), bins=4)
    assert short.startswith("MemoryLLM memory state") and "LTM" not in short
