"""Saving and loading a MemoryState as one safetensors file, and a text summary of it for `mplus inspect`.

Tensors: `stm` [L, N, d], `stm_ages` [L, N], `generator_state` (uint8) and, for M+ only, per layer l:
`ltm.{l}` [S_l, d], `ltm_keys.{l}` [S_l, d_s], `ltm_ages.{l}` [S_l], `ltm_rf.{l}` [S_l], `cache_rows.{l}` [c_l, d],
`cache_keys.{l}` [c_l, d_s], `cache_ages.{l}` [c_l]. The safetensors metadata holds one JSON document under
"mplus_state": format, version, kind, sizes, dtypes, update_step, and a sha256 over that document and every tensor
(name, dtype, shape, bytes), so an edited byte anywhere in the file is detected.

Loading checks everything before it builds a new state, so a failed load leaves the caller's state as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .io import atomic_path
from .safetensors_file import write_file
from .state import MemoryState

FORMAT, VERSION, META_KEY = "mplus-state", 1, "mplus_state"
PER_LAYER = ("ltm", "ltm_keys", "ltm_ages", "ltm_rf", "cache_rows", "cache_keys", "cache_ages")  # M+-only fields
CAST = ("stm", "ltm", "ltm_keys", "cache_rows", "cache_keys")  # the tensors in the model's dtype
EXPECT_FIELDS = ("kind", "num_layers", "num_stm_rows", "hidden_size", "key_dim", "dtype")
FLOAT_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


class StateError(ValueError):
    """A memory-state file that is missing, damaged or made for a different model, or a state that cannot be saved."""


def save_state(state: MemoryState, path: str | os.PathLike) -> None:
    """Write `state` (without the derived stm_kv) to `path` atomically: a crash mid-write keeps the old file."""
    tensors = _tensors(state)
    keys = tensors.get("ltm_keys.0")  # d_s is the same in every layer; _check verifies
    meta = {
        "format": FORMAT, "version": VERSION, "kind": "mplus" if state.has_ltm else "memoryllm",
        "num_layers": len(state.stm), "stm_shape": list(state.stm.shape),
        "dtype": str(state.stm.dtype).removeprefix("torch."),
        "key_dim": keys.shape[-1] if keys is not None and keys.ndim else None,
        "key_dtype": str(keys.dtype).removeprefix("torch.") if keys is not None else None,
        "ltm_sizes": [len(x) for x in state.ltm] if state.has_ltm else None,
        "cache_sizes": [len(x) for x in state.cache_rows] if state.has_ltm else None,
        "update_step": int(state.update_step), "generator_device": str(state.generator.device),
    }
    try:  # a malformed state fails now, with its cause, rather than at the next load
        _check(tensors, meta)
    except StateError as e:
        raise StateError(f"cannot save the memory state to {path}: {e}") from None
    meta["sha256"] = _digest(meta, tensors)
    with atomic_path(path) as tmp:
        write_file(tmp, tensors, {META_KEY: json.dumps(meta, sort_keys=True)})  # no temp file of its own


def load_state(path: str | os.PathLike, expect: Mapping | object | None = None) -> MemoryState:
    """Read a state saved by save_state. `expect` ({"kind", "num_layers", "num_stm_rows", "hidden_size",
    "key_dim", "dtype"}, any subset, None = not checked) describes the model: a file for another model is an error,
    except for dtype, to which the float tensors (STM, LTM and cache rows and keys) are converted."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no memory-state file there; check the path, or save a state there first")
    raw = _read(path, lambda f: (f.metadata() or {}).get(META_KEY))
    if raw is None:
        raise StateError(f"{path}: no '{META_KEY}' metadata, so this is not a memory state saved by mplus "
                         "(a weights file?); pass a file written by MemoryState.save")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or type(meta.get("version")) is not int:
        raise _damaged(path, "its metadata is not an mplus memory-state description")
    if meta["version"] != VERSION:
        raise StateError(f"{path}: memory-state format version {meta['version']!r}, but this mplus reads "
                         f"version {VERSION}; use the mplus version that wrote it, or save the state again")
    tensors = _read(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})
    if meta.get("sha256") != _digest(meta, tensors):
        raise _damaged(path, "the checksum does not match: the file was modified or corrupted after it was saved")
    try:  # a matching checksum proves integrity, not that the writer was right
        _check(tensors, meta)
    except StateError as e:
        raise _damaged(path, str(e)) from None
    dtype = _check_expect(path, meta, expect)
    if dtype is not None:  # rows and keys follow the model's dtype; ages stay int64 and rf float64
        tensors = {k: t.to(dtype) if k.split(".")[0] in CAST else t for k, t in tensors.items()}
    try:
        generator = torch.Generator(device=meta["generator_device"])
        generator.set_state(tensors["generator_state"])
    except RuntimeError as e:
        raise StateError(f"{path}: cannot restore the random generator on {meta['generator_device']!r} ({e}); "
                         "load it on a machine with that device") from None
    L, mplus = meta["num_layers"], meta["kind"] == "mplus"
    per_layer = {f: [tensors[f"{f}.{l}"] for l in range(L)] if mplus else None for f in PER_LAYER}
    return MemoryState(stm=tensors["stm"], stm_ages=tensors["stm_ages"], **per_layer, update_step=meta["update_step"],
                       generator=generator, stm_kv=None)


def describe_state(state: MemoryState, bins: int = 8) -> str:
    """A few lines for a screen: sizes, dtypes, and per layer the row counts and age histograms."""
    L, N, d = state.stm.shape
    keys = f", retriever keys d_s={state.ltm_keys[0].shape[-1]}" if state.has_ltm else ""
    lines = [f"{'M+' if state.has_ltm else 'MemoryLLM'} memory state: {L} layers, STM {N} rows x d={d} "
             f"({str(state.stm.dtype).removeprefix('torch.')}){keys}, update_step {state.update_step}"]
    # One age range for all layers, so the bars of different layers line up and the range is printed once.
    stm_lo, stm_hi = _range([state.stm_ages])
    rows = [["layer", "STM", f"STM ages {stm_lo}..{stm_hi}"]]
    if state.has_ltm:
        ltm_lo, ltm_hi = _range(state.ltm_ages)
        rows[0] += ["LTM", f"LTM ages {ltm_lo}..{ltm_hi}", "rf min..max", "cache"]
    for l in range(L):
        row = [str(l), str(N), _bars(state.stm_ages[l], stm_lo, stm_hi, bins)]
        if state.has_ltm:
            rf = state.ltm_rf[l]
            rf_text = f"{rf.min().item():.3g}..{rf.max().item():.3g}" if len(rf) else "-"
            row += [str(len(state.ltm[l])), _bars(state.ltm_ages[l], ltm_lo, ltm_hi, bins), rf_text,
                    str(len(state.cache_rows[l]))]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = [i for i, title in enumerate(rows[0]) if "ages" in title]  # bars read from the left, numbers from the right
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    if state.has_ltm:
        lines.append(f"total: LTM {sum(map(len, state.ltm))} rows, cache {sum(map(len, state.cache_rows))} rows; "
                     f"bars: {bins} age bins per layer, height relative to the layer's fullest bin")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ helpers

def _tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    fields = [getattr(state, f) for f in PER_LAYER]
    if any(x is None for x in fields) != all(x is None for x in fields) or state.stm.ndim != 3:
        raise StateError("cannot save a memory state whose STM is not [L, N, d] or whose LTM/cache fields are "
                         "only partly set; build it with all seven per-layer lists or none (MemoryLLM)")
    out = {"stm": state.stm, "stm_ages": state.stm_ages, "generator_state": state.generator.get_state()}
    if state.has_ltm:
        out |= {f"{f}.{l}": x for f, xs in zip(PER_LAYER, fields) for l, x in enumerate(xs)}
    out = {k: v.detach().cpu().contiguous() for k, v in out.items()}
    # safetensors refuses tensors that share memory (e.g. one tensor listed for every layer): save copies of those
    ptrs = [v.untyped_storage().data_ptr() for v in out.values() if v.numel()]
    return {k: v.clone() if v.numel() and ptrs.count(v.untyped_storage().data_ptr()) > 1 else v for k, v in out.items()}


def _digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (without its own hash) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes without a copy; also works for bfloat16
    return h.hexdigest()


def _check(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Raise StateError(problem) unless the metadata and the tensors describe one well-formed state."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise StateError(problem)

    def ints(x, n: int, lo: int) -> bool:  # a JSON list of n integers >= lo
        return isinstance(x, list) and len(x) == n and all(type(v) is int and v >= lo for v in x)

    need(meta.get("kind") in ("mplus", "memoryllm"), f"unknown kind {meta.get('kind')!r}")
    need(ints(meta.get("stm_shape"), 3, 1), f"the STM must be [L, N, d] with L, N, d >= 1, got {meta.get('stm_shape')}")
    L, N, d = meta["stm_shape"]
    need(meta.get("num_layers") == L, f"num_layers {meta.get('num_layers')!r} disagrees with the STM's {L} layers")
    need(ints([meta.get("update_step")], 1, 0), f"update_step must be an integer >= 0, got {meta.get('update_step')!r}")
    need(isinstance(meta.get("generator_device"), str), "the random generator's device is not recorded")
    need(meta.get("dtype") in FLOAT_DTYPES, f"the STM dtype must be floating point, got {meta.get('dtype')!r}")
    dtype = FLOAT_DTYPES[meta["dtype"]]
    expected = {"stm": (dtype, [L, N, d]), "stm_ages": (torch.int64, [L, N]), "generator_state": (torch.uint8, None)}
    if meta["kind"] == "mplus":
        d_s, S, c = meta.get("key_dim"), meta.get("ltm_sizes"), meta.get("cache_sizes")
        need(ints([d_s], 1, 1), f"key_dim must be an integer >= 1, got {d_s!r}")
        need(meta.get("key_dtype") in FLOAT_DTYPES, f"key dtype must be floating point, got {meta.get('key_dtype')!r}")
        need(ints(S, L, 0) and ints(c, L, 0), f"ltm_sizes and cache_sizes must list {L} row counts, got {S}, {c}")
        kdtype = FLOAT_DTYPES[meta["key_dtype"]]
        for l in range(L):
            expected |= {f"ltm.{l}": (dtype, [S[l], d]), f"ltm_keys.{l}": (kdtype, [S[l], d_s]),
                         f"ltm_ages.{l}": (torch.int64, [S[l]]), f"ltm_rf.{l}": (torch.float64, [S[l]]),
                         f"cache_rows.{l}": (dtype, [c[l], d]), f"cache_keys.{l}": (kdtype, [c[l], d_s]),
                         f"cache_ages.{l}": (torch.int64, [c[l]])}
    else:
        stray = [k for k in ("key_dim", "key_dtype", "ltm_sizes", "cache_sizes") if meta.get(k) is not None]
        need(not stray, f"a MemoryLLM state has no LTM, but the metadata sets {', '.join(stray)}")
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    need(not missing, f"tensors missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    need(not extra, f"unexpected tensors: {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    for name, (want_dtype, shape) in expected.items():
        t = tensors[name]
        need(t.dtype == want_dtype, f"tensor {name} has dtype {t.dtype}, expected {want_dtype}")
        need(shape is None or list(t.shape) == shape, f"tensor {name} has shape {list(t.shape)}, expected {shape}")
    need(tensors["generator_state"].ndim == 1, "the random generator's state must be a 1-d byte tensor")


def _check_expect(path: Path, meta: dict, expect: Mapping | object | None) -> torch.dtype | None:
    """Raise StateError on the first field where the file differs from `expect`; return the dtype to convert to."""
    if expect is None:
        return None
    if isinstance(expect, Mapping):
        if unknown := sorted(set(expect) - set(EXPECT_FIELDS)):
            raise TypeError(f"unknown expect fields {unknown}; known: {', '.join(EXPECT_FIELDS)}")
    elif missing := [k for k in EXPECT_FIELDS if not hasattr(expect, k)]:  # all of them, so a typo is not silent
        raise TypeError(f"expect object lacks the attributes {missing}")
    else:
        expect = {k: getattr(expect, k) for k in EXPECT_FIELDS}
    L, N, d = meta["stm_shape"]
    found = {"kind": meta["kind"], "num_layers": L, "num_stm_rows": N, "hidden_size": d, "key_dim": meta["key_dim"]}
    for field, value in found.items():
        want = expect.get(field)
        if want is not None and want != value:
            raise StateError(f"{path}: a state from a different model: {field} is {value!r} in the file but "
                             f"{want!r} in this model; load a state saved with this model, or start from an empty one")
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
