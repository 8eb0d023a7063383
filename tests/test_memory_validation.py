"""A memory is checked for what it holds, not only for its checksum: hostile state files and checkpoints with
impossible memories are refused with StateError, a keyed signature (HMAC) tells the writer's files from re-hashed
ones, and a state written by other weights of the same shape is refused by the weights fingerprint."""
from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mplus.memory.state_file as state_io
from conftest import OFFICIAL_TINY
from mplus import MPlus
from mplus.memory.fingerprint import weights_fingerprint
from mplus.memory.state import MemoryState, StateError
from test_state_io import STEP, assert_same, make_state, rewrite

KEY = bytes(range(32))  # a fixed 32-byte key: tests are deterministic
FIXTURE = OFFICIAL_TINY / "checkpoint"


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "state.safetensors"
    make_state().save(p)
    return p


def with_metadata(path, raw: str) -> None:
    """Replace the state's JSON document by `raw`, keeping the tensors: a valid safetensors file."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={state_io.META_KEY: raw})


# --------------------------------------------------------------------------------------------- the header JSON

@pytest.mark.parametrize("raw, message", [
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "not an mplus memory-state description"),  # RecursionError before
    ('{"format": "mplus-state", "version": ' + "9" * 5000 + "}", "not an mplus memory-state description"),
    ('{"format": "mplus-state", "version": 1, "kind": ' + "[" * 900 + "]" * 900 + "}", "nests deeper"),
    ('{"format": "mplus-state", "version": 2, "owner": "x"}', "unknown fields owner"),
    ('{"format": "mplus-state", "version": 2, "kind": "' + "x" * (1 << 20) + '"}', "more than a memory state's"),
])
def test_hostile_header_json(path, raw, message):
    with_metadata(path, raw)
    with pytest.raises(StateError, match=message):
        MemoryState.load(path)


def test_memoryllm_state_without_key_dim(tmp_path):
    """A MemoryLLM header may leave out the M+ fields; comparing with the model's spec raised KeyError before."""
    state, path = make_state("memoryllm"), tmp_path / "s.safetensors"
    state.save(path)
    rewrite(path, edit_meta=lambda m: [m.pop(k) for k in ("key_dim", "key_dtype", "ltm_sizes", "cache_sizes")],
            rehash=True)
    assert_same(MemoryState.load(path, {"kind": "memoryllm", "key_dim": None, "num_layers": 3}), state)


# --------------------------------------------------------------------------------- values behind a valid hash

def put(name, index, value):
    return lambda t: t[name].__setitem__(index, value)


@pytest.mark.parametrize("edit, edit_meta, message", [
    (put("stm", (1, 2, 3), float("nan")), None, "stm holds NaN or infinite"),
    (put("ltm.2", 4, float("inf")), None, r"ltm\.2 holds NaN or infinite"),
    (put("cache_keys.1", (0, 0), -float("inf")), None, r"cache_keys\.1 holds NaN or infinite"),
    (put("ltm_ages.0", 1, -256), None, r"ltm_ages\.0 holds ages outside"),
    (put("stm_ages", (0, 0), -1), None, "stm_ages holds ages outside"),
    (put("cache_ages.2", 0, 2**60), None, r"cache_ages\.2 holds ages outside"),
    (put("ltm_rf.2", 0, -1.0), None, r"ltm_rf\.2 holds recall frequencies"),
    (put("ltm_rf.0", 3, float("nan")), None, r"ltm_rf\.0 holds recall frequencies"),
    (None, lambda m: m.update(update_step=2**70), r"update_step must be an integer in \[0, 2\^53\]"),
    (None, lambda m: m.update(update_step=STEP + 1), "the dropped-row cache must hold"),
    (put("generator_state", slice(None), 0), None, "invalid generator state"),
])
def test_resigned_state_with_impossible_values(path, edit, edit_meta, message):
    rewrite(path, edit_meta=edit_meta, edit_tensors=edit, rehash=True)  # the checksum is right: anyone can compute it
    with pytest.raises(StateError, match=message):
        MemoryState.load(path)


def test_saving_an_impossible_state_fails_at_once(tmp_path):
    state = make_state()
    state.ltm[0].rows[0, 0] = float("nan")
    with pytest.raises(StateError, match=r"cannot save .*ltm\.0 holds NaN"):
        state.save(tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


# ------------------------------------------------------------------------------------------- keyed signature

def test_signed_state_round_trip(tmp_path):
    state, path = make_state(), tmp_path / "s.safetensors"
    state.save(path, key=KEY)
    assert_same(MemoryState.load(path, key=KEY), state)
    assert_same(MemoryState.load(path), state)  # without a key the signature is not checked, the checksum is


def test_signature_refuses_other_writers(tmp_path):
    path = tmp_path / "s.safetensors"
    make_state().save(path)
    with pytest.raises(StateError, match="not signed"):
        MemoryState.load(path, key=KEY)
    make_state().save(path, key=bytes(32))  # another application's key
    with pytest.raises(StateError, match="signature does not match the key"):
        MemoryState.load(path, key=KEY)
    make_state().save(path, key=KEY)  # edited and re-hashed: the signature of the old sha256 no longer fits
    rewrite(path, edit_meta=lambda m: m.update(hmac="é" * 64), rehash=True)  # not even hex (compare_digest: ASCII)
    with pytest.raises(StateError, match="signature does not match the key"):
        MemoryState.load(path, key=KEY)
    make_state().save(path, key=KEY)
    rewrite(path, edit_tensors=put("ltm.0", (0, 0), 0.5), rehash=True)
    MemoryState.load(path)  # integrity alone cannot tell
    with pytest.raises(StateError, match="signature does not match the key"):
        MemoryState.load(path, key=KEY)


def test_signing_key_must_be_real_bytes(tmp_path):
    with pytest.raises(TypeError, match="must be bytes"):
        make_state().save(tmp_path / "s.safetensors", key="password")
    with pytest.raises(ValueError, match="at least 16"):
        make_state().save(tmp_path / "s.safetensors", key=b"short")
    assert not (tmp_path / "s.safetensors").exists()


def test_version_1_files_still_load(tmp_path):
    """Version 1 had no fingerprint and no signature; its checksum is computed the same way."""
    state, path = make_state(), tmp_path / "s.safetensors"
    state.save(path)
    rewrite(path, edit_meta=lambda m: (m.update(version=1), m.pop("weights")), rehash=True)
    assert_same(MemoryState.load(path, {"weights": "0" * 64}), state)  # no fingerprint to compare
    with pytest.raises(StateError, match="not signed"):
        MemoryState.load(path, key=KEY)


# ------------------------------------------------------------------------------------------ weights fingerprint

def test_fingerprint_follows_the_weights():
    a, b = MPlus.from_pretrained(FIXTURE), MPlus.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    fp = weights_fingerprint(a)
    assert len(fp) == 64 and fp == weights_fingerprint(b)  # the fixture's values are float32; bf16 rounds them
    with torch.inference_mode():  # parameters without a version counter
        assert weights_fingerprint(MPlus.from_pretrained(FIXTURE)) == fp
    with torch.no_grad():
        a.model.layers[1].mlp.up_proj.lora_B["default"].weight[0, 0] += 0.25  # one value of one adapter
    assert weights_fingerprint(a) not in (fp, weights_fingerprint(b))  # the cache saw the in-place change


def test_state_of_other_weights_of_the_same_shape_is_refused(tmp_path):
    model, other = MPlus.from_pretrained(FIXTURE), MPlus.from_pretrained(FIXTURE)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)  # a "fine-tune": same shapes, other values
    state = model.initial_state()
    model.inject(state, torch.arange(3, 23))
    state.save(tmp_path / "s.safetensors")
    assert_same(MemoryState.load(tmp_path / "s.safetensors", expect=model.state_spec()), state)
    with pytest.raises(StateError, match="written by other weights"):
        MemoryState.load(tmp_path / "s.safetensors", expect=other.state_spec())


# ------------------------------------------------------------------------- the memory stored with a checkpoint

def as_int32(name):
    return lambda t: t.update({name: t[name].view(torch.int32)})  # float bytes declared as integers


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"ltm_recall_frequencies.1": t["ltm_recall_frequencies.1"][:12]}),
     r"'ltm_recall_frequencies\.1' has shape \[12\], but layer 1 has 20 LTM rows"),
    (lambda t: t.update({"ltm_ages.2": t["ltm_ages.2"][:-1]}), r"'ltm_ages\.2' has shape \[19\]"),
    (lambda t: t.update({"ltm_keys.0": t["ltm_keys.0"][:, :8].clone()}), r"'ltm_keys\.0' has shape \[20, 8\]"),
    (as_int32("ltm_ages.0"), r"'ltm_ages\.0' has dtype torch.int32.*floating point"),
    (as_int32("ltm_recall_frequencies.0"), r"'ltm_recall_frequencies\.0' has dtype torch.int32"),
    (lambda t: t["ltm.2"].__setitem__((3, 5), float("nan")), r"'ltm\.2' or 'ltm_keys\.2' holds NaN"),
    (lambda t: t["memory"].__setitem__((0, 0, 0), float("inf")), "'memory' holds NaN or infinite"),
    (lambda t: t["ltm_ages.1"].__setitem__(0, -256.0), r"'ltm_ages\.1' holds ages that are not whole"),
    (lambda t: t["ltm_ages.1"].__setitem__(0, 12.5), r"'ltm_ages\.1' holds ages that are not whole"),
    (lambda t: t["ltm_recall_frequencies.2"].__setitem__(0, float("inf")),
     r"'ltm_recall_frequencies\.2' holds values that are negative"),
])
def test_checkpoint_with_an_impossible_memory(tmp_path, edit, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(StateError, match="the memory stored with this checkpoint is unusable: " + message):
        MPlus.from_pretrained(folder)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)


FIELDS = ("format", "version", "kind", "num_layers", "stm_shape", "dtype", "key_dim", "key_dtype", "ltm_sizes",
          "cache_sizes", "update_step", "generator_device", "weights", "hmac")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["mplus", "memoryllm"]), edits=st.dictionaries(
    st.sampled_from(FIELDS), st.none() | JSON, min_size=1, max_size=3))
def test_any_re_hashed_header_loads_or_is_a_state_error(tmp_path, kind, edits):
    """Any field replaced by any JSON value (None: removed), the checksum recomputed: StateError or a valid state."""
    path = tmp_path / f"{kind}.safetensors"
    make_state(kind).save(path)
    edit = lambda m: [m.pop(k, None) if v is None else m.update({k: v}) for k, v in edits.items()]  # noqa: E731
    rewrite(path, edit_meta=edit, rehash=True)
    spec = {"kind": kind, "num_layers": 3, "num_stm_rows": 6, "hidden_size": 8, "dtype": torch.float32,
            "key_dim": 4 if kind == "mplus" else None, "weights": "0" * 64}
    try:
        MemoryState.load(path, spec)
    except StateError:
        pass
