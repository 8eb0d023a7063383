"""Saving and loading a MemoryState as one safetensors file, and a text summary of it for `mplus inspect`.

Tensors: `stm` [L, N, d], `stm_ages` [L, N], `generator_state` (uint8) and, for M+ only, per layer l:
`ltm.{l}` [S_l, d], `ltm_keys.{l}` [S_l, d_s], `ltm_ages.{l}` [S_l], `ltm_rf.{l}` [S_l], `cache_rows.{l}` [c_l, d],
`cache_keys.{l}` [c_l, d_s], `cache_ages.{l}` [c_l]. The safetensors metadata holds one JSON document under
"mplus_state": format, version, kind, sizes, dtypes, update_step, initialized (false only for a MemoryLLM pool
never written), the fingerprint of the weights that wrote the memory (mplus.memory.fingerprint), a sha256 over that document and every tensor (name, dtype, shape, bytes), so an
edited byte anywhere in the file is detected, and, when saved with a key, an HMAC-SHA256 of that sha256, so only
a holder of the key can write a file that loads with it. docs/memory-files.md describes the format for users.

Loading checks everything before it builds a new state (mplus.memory.state_check: layout, then values), so a failed
load leaves the caller's state as it was and a loaded state holds only what an update could have written.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mplus.formats.atomic import atomic_path
from mplus.formats.safetensors import write_file
from mplus.memory.ltm import LayerLTM
from mplus.memory.state_check import ROWS, StateError, check_layout, check_values

__all__ = ["StateError", "describe_state", "load_state", "save_state"]

FORMAT, VERSION, META_KEY = "mplus-state", 2, "mplus_state"
READS = (1, 2)  # version 2 added the weights fingerprint and the keyed signature; a version-1 file has neither
MAX_HEADER = 1 << 20  # bytes of the JSON document; a real one is a few hundred
META_FIELDS = {"format", "version", "kind", "num_layers", "stm_shape", "dtype", "key_dim", "key_dtype", "ltm_sizes",
               "cache_sizes", "update_step", "generator_device", "initialized", "weights", "sha256", "hmac"}
EXPECT_FIELDS = ("kind", "num_layers", "num_stm_rows", "hidden_size", "key_dim", "dtype")  # "weights" is optional
MIN_KEY = 16  # bytes; secrets.token_bytes(32) is the way to make one


def save_state(state: MemoryState, path: str | os.PathLike, key: bytes | None = None) -> None:
    """Write `state` (without the derived stm_kv) to `path` atomically: a crash mid-write keeps the old file.
    With `key` (bytes, >= 16), the file is signed: load_state(path, key=key) then accepts only this writer's files."""
    _check_key(key)
    tensors = _tensors(state)
    keys = tensors.get("ltm_keys.0")  # d_s is the same in every layer; check_layout verifies
    meta = {
        "format": FORMAT, "version": VERSION, "kind": "mplus" if state.has_ltm else "memoryllm",
        "num_layers": len(state.stm), "stm_shape": list(state.stm.shape),
        "dtype": str(state.stm.dtype).removeprefix("torch."),
        "key_dim": keys.shape[-1] if keys is not None and keys.ndim else None,
        "key_dtype": str(keys.dtype).removeprefix("torch.") if keys is not None else None,
        "ltm_sizes": [len(m) for m in state.ltm] if state.has_ltm else None,
        "cache_sizes": [len(m.cache) for m in state.ltm] if state.has_ltm else None,
        "update_step": int(state.update_step), "generator_device": str(state.generator.device),
        "weights": state.weights,
        "initialized": bool(state.initialized),
    }
    try:  # a malformed state fails now, with its cause, rather than at the next load
        check_layout(tensors, meta)
        check_values(tensors)
    except StateError as e:
        raise StateError(f"cannot save the memory state to {path}: {e}") from None
    meta["sha256"] = _digest(meta, tensors)
    if key is not None:
        meta["hmac"] = _sign(key, meta["sha256"])
    with atomic_path(path) as tmp:
        write_file(tmp, tensors, {META_KEY: json.dumps(meta, sort_keys=True)})  # no temp file of its own


def load_state(path: str | os.PathLike, expect: Mapping | object | None = None,
               key: bytes | None = None, *, build: Callable[..., MemoryState]) -> MemoryState:
    """Read a state saved by save_state and `build` it (MemoryState.load passes its class). `expect` ({"kind", "num_layers", "num_stm_rows", "hidden_size",
    "key_dim", "dtype", "weights"}, any subset, None = not checked; model.state_spec() gives all) describes the
    model: a file for another model is an error, except for dtype, to which the float tensors (STM, LTM and cache
    rows and keys) are converted. A file without a weights fingerprint (version 1) passes the "weights" check.
    With `key`, a file that is not signed with that key is refused; without, a signature is not checked."""
    _check_key(key)
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no memory-state file there; check the path, or save a state there first")
    raw = _read(path, lambda f: (f.metadata() or {}).get(META_KEY))
    if raw is None:
        raise StateError(f"{path}: no '{META_KEY}' metadata, so this is not a memory state saved by mplus "
                         "(a weights file?); pass a file written by MemoryState.save")
    meta = _parse(path, raw)
    tensors = _read(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})
    if meta.get("sha256") != _digest(meta, tensors):
        raise _damaged(path, "the checksum does not match: the file was modified or corrupted after it was saved")
    if key is not None and not (type(meta.get("hmac")) is str
                                and hmac.compare_digest(meta["hmac"].encode(), _sign(key, meta["sha256"]).encode())):
        raise StateError(f"{path}: {'the signature does not match the key' if 'hmac' in meta else 'not signed'}: "
                         "this file was not saved with this key (or was changed and re-hashed since); refuse it, "
                         "or save the state again with MemoryState.save(path, key=...)")
    try:  # a matching checksum proves integrity, not that the writer was right
        check_layout(tensors, meta)
        check_values(tensors)
    except StateError as e:
        raise _damaged(path, str(e)) from None
    dtype = _check_expect(path, meta, expect)
    if dtype is not None:  # rows and keys follow the model's dtype; ages stay int64 and rf float64
        tensors = {k: t.to(dtype) if k.split(".")[0] in ROWS else t for k, t in tensors.items()}
    try:
        generator = torch.Generator(device=meta["generator_device"])
        generator.set_state(tensors["generator_state"])
    except RuntimeError as e:
        raise StateError(f"{path}: cannot restore the random generator on {meta['generator_device']!r} ({e}): the "
                         "file holds an invalid generator state, or one for a device this machine lacks") from None
    L, mplus = meta["num_layers"], meta["kind"] == "mplus"
    ltm = [LayerLTM.from_tensors(tensors, l) for l in range(L)] if mplus else None
    return build(stm=tensors["stm"], stm_ages=tensors["stm_ages"], ltm=ltm, update_step=meta["update_step"],
                 generator=generator, weights=meta.get("weights"), initialized=meta.get("initialized", True),
                 stm_kv=None)


def describe_state(state: MemoryState, bins: int = 8) -> str:
    """A few lines for a screen: sizes, dtypes, and per layer the row counts and age histograms."""
    L, N, d = state.stm.shape
    keys = f", retriever keys d_s={state.ltm[0].keys.shape[-1]}" if state.has_ltm else ""
    lines = [f"{'M+' if state.has_ltm else 'MemoryLLM'} memory state: {L} layers, STM {N} rows x d={d} "
             f"({str(state.stm.dtype).removeprefix('torch.')}){keys}, update_step {state.update_step}, "
             f"{state.placement}"]
    # One age range for all layers, so the bars of different layers line up and the range is printed once.
    stm_lo, stm_hi = _range([state.stm_ages])
    rows = [["layer", "STM", f"STM ages {stm_lo}..{stm_hi}"]]
    if state.has_ltm:
        ltm_lo, ltm_hi = _range([m.ages for m in state.ltm])
        rows[0] += ["LTM", f"LTM ages {ltm_lo}..{ltm_hi}", "rf min..max", "cache"]
    for l in range(L):
        row = [str(l), str(N), _bars(state.stm_ages[l], stm_lo, stm_hi, bins)]
        if state.has_ltm:
            m = state.ltm[l]
            rf_text = f"{m.rf.min().item():.3g}..{m.rf.max().item():.3g}" if len(m) else "-"
            row += [str(len(m)), _bars(m.ages, ltm_lo, ltm_hi, bins), rf_text, str(len(m.cache))]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = [i for i, title in enumerate(rows[0]) if "ages" in title]  # bars read from the left, numbers from the right
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    if state.has_ltm:
        lines.append(f"total: LTM {sum(map(len, state.ltm))} rows, cache {sum(len(m.cache) for m in state.ltm)} rows; "
                     f"bars: {bins} age bins per layer, height relative to the layer's fullest bin")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ helpers

def _tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    if state.stm.ndim != 3 or not (state.ltm is None or all(isinstance(m, LayerLTM) for m in state.ltm)):
        raise StateError("cannot save a memory state whose STM is not [L, N, d] or whose LTM is not one LayerLTM "
                         "per layer (or None, MemoryLLM)")
    out = {"stm": state.stm, "stm_ages": state.stm_ages, "generator_state": state.generator.get_state()}
    if state.has_ltm:
        for l, m in enumerate(state.ltm):
            out |= m.tensors(l)
    out = {k: v.detach().cpu().contiguous() for k, v in out.items()}
    # safetensors refuses tensors that share memory (e.g. one tensor listed for every layer): save copies of those
    ptrs = [v.untyped_storage().data_ptr() for v in out.values() if v.numel()]
    return {k: v.clone() if v.numel() and ptrs.count(v.untyped_storage().data_ptr()) > 1 else v for k, v in out.items()}


def _digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (without its own hash and signature) and every tensor's name, dtype, shape and
    bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k not in ("sha256", "hmac")},
                                  sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes without a copy; also works for bfloat16
    return h.hexdigest()


def _sign(key: bytes, sha256: str) -> str:
    """HMAC-SHA256 under `key` of the file's sha256, which already covers the header and every tensor byte."""
    return hmac.new(bytes(key), f"{FORMAT} signature\n{sha256}".encode(), hashlib.sha256).hexdigest()


def _check_key(key) -> None:
    if key is None:
        return
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"the signing key must be bytes (e.g. secrets.token_bytes(32)), got {type(key).__name__}")
    if len(key) < MIN_KEY:
        raise ValueError(f"the signing key has {len(key)} bytes; use at least {MIN_KEY} random bytes "
                         "(e.g. secrets.token_bytes(32)), kept out of the memory files' storage")


def _parse(path: Path, raw: str) -> dict:
    """The header's JSON document, refused (StateError) unless it is a small flat object of known fields."""
    if len(raw) > MAX_HEADER:
        raise _damaged(path, f"its metadata has {len(raw)} characters, more than a memory state's {MAX_HEADER}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # malformed, an integer of thousands of digits, or nested too deep
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or type(meta.get("version")) is not int:
        raise _damaged(path, "its metadata is not an mplus memory-state description")
    if meta["version"] not in READS:
        raise StateError(f"{path}: memory-state format version {meta['version']!r}, but this mplus reads versions "
                         f"{', '.join(map(str, READS))}; use the mplus version that wrote it, or save the state again")
    if unknown := sorted(meta.keys() - META_FIELDS):
        raise _damaged(path, f"its metadata has unknown fields {', '.join(unknown[:6])}")
    scalar = (str, int, float, bool, type(None))
    if not all(isinstance(v, scalar) or type(v) is list and all(isinstance(x, scalar) for x in v)
               for v in meta.values()):  # nothing deeper: checking and hashing it cannot recurse
        raise _damaged(path, "its metadata nests deeper than a memory state's (values or lists of values)")
    return meta


def _check_expect(path: Path, meta: dict, expect: Mapping | object | None) -> torch.dtype | None:
    """Raise StateError on the first field where the file differs from `expect`; return the dtype to convert to."""
    if expect is None:
        return None
    if isinstance(expect, Mapping):
        if unknown := sorted(set(expect) - {*EXPECT_FIELDS, "weights"}):
            raise TypeError(f"unknown expect fields {unknown}; known: {', '.join(EXPECT_FIELDS)}, weights")
    elif missing := [k for k in EXPECT_FIELDS if not hasattr(expect, k)]:  # all of them, so a typo is not silent
        raise TypeError(f"expect object lacks the attributes {missing}")
    else:
        expect = {k: getattr(expect, k, None) for k in (*EXPECT_FIELDS, "weights")}
    L, N, d = meta["stm_shape"]
    found = {"kind": meta["kind"], "num_layers": L, "num_stm_rows": N, "hidden_size": d,
             "key_dim": meta.get("key_dim")}
    for field, value in found.items():
        want = expect.get(field)
        if want is not None and want != value:
            raise StateError(f"{path}: a state from a different model: {field} is {value!r} in the file but "
                             f"{want!r} in this model; load a state saved with this model, or start from an empty one")
    want, have = expect.get("weights"), meta.get("weights")
    if want is not None and have is not None and want != have:
        raise StateError(f"{path}: a state written by other weights: the file's weights fingerprint is {have[:12]}..., "
                         f"this model's {str(want)[:12]}... (same shape, different checkpoint or fine-tune); load a "
                         "state saved with this model, or start from an empty one")
    dtype = expect.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"expect dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _read(path: Path, fn):
    """Apply fn to the open safetensors file, turning the library's errors into a StateError that names the file."""
    try:
        with safe_open(path, "pt") as f:
            return fn(f)
    except (SafetensorError, OSError) as e:
        raise _damaged(path, f"it is not a readable safetensors file ({e})") from None


def _damaged(path: Path, problem: str) -> StateError:
    return StateError(f"{path}: {problem}; use another copy of the file, or save the state again")


def _range(ages: list[torch.Tensor]) -> tuple[int, int]:
    nonempty = [a for a in ages if a.numel()] or [torch.zeros(1, dtype=torch.int64)]
    return min(int(a.min()) for a in nonempty), max(int(a.max()) for a in nonempty)


def _bars(ages: torch.Tensor, lo: int, hi: int, bins: int) -> str:
    """One character per age bin over [lo, hi]: ' ' for an empty bin, else ▁..█ scaled to the fullest bin."""
    if ages.numel() == 0:
        return "-"
    counts = torch.histc(ages.double(), bins=bins, min=lo, max=max(hi, lo + 1)).tolist()
    return "".join(" ▁▂▃▄▅▆▇█"[0 if c == 0 else max(1, round(8 * c / max(counts)))] for c in counts)
