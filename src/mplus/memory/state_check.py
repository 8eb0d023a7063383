"""What a memory must hold before it is used: shapes that agree, and values an update could have produced.

A checksum, or a keyed signature, proves that a file is the one that was written, not that its writer was right.
These checks run on every load, of a state file (mplus.memory.state_file) and of the memory stored with an official
checkpoint (mplus.memory.checkpoint), so a bad memory is refused at once instead of failing, or silently steering
retrieval, many injections later. What a written memory always satisfies (arXiv 2502.00592, section 3; the update
rule is in mplus.memory.mplus.write):
- every row and key is finite: one NaN or inf row poisons every attention or retrieval score it enters;
- ages are whole numbers in [0, MAX_AGE]: each update adds K to them;
- recall frequencies (the time-to-live) are finite and >= 0: rows enter with a positive value, and a merge
  evicts rows whose value falls to 0.01 or undoes the decay;
- the dropped-row cache holds exactly the rows of the updates since the last merge: update_step rows per layer.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class StateError(ValueError):
    """A memory-state file that is missing, damaged, unsigned or made for a different model, or a state that
    cannot be saved. Every memory loader raises it (state files and the memory stored in a checkpoint)."""


MAX_AGE = 2**53  # beyond it float64, in which the official merge keeps ages, no longer counts exactly
CHUNK = 1 << 22  # elements checked at once, so a check never allocates more than a few MB beside the tensor
FLOAT_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
ROWS = ("stm", "ltm", "ltm_keys", "cache_rows", "cache_keys")  # the tensors in the model's dtype
AGES = ("stm_ages", "ltm_ages", "cache_ages")


def need(ok: bool, problem: str) -> None:
    if not ok:
        raise StateError(problem)


def check_layout(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Raise StateError(problem) unless the header and the tensors describe one well-formed state."""
    def ints(x, n: int, lo: int) -> bool:  # a JSON list of n integers >= lo
        return isinstance(x, list) and len(x) == n and all(type(v) is int and v >= lo for v in x)

    need(meta.get("kind") in ("mplus", "memoryllm"), f"unknown kind {meta.get('kind')!r}")
    need(ints(meta.get("stm_shape"), 3, 1), f"the STM must be [L, N, d] with L, N, d >= 1, got {meta.get('stm_shape')}")
    L, N, d = meta["stm_shape"]
    need(meta.get("num_layers") == L, f"num_layers {meta.get('num_layers')!r} disagrees with the STM's {L} layers")
    step = meta.get("update_step")
    need(ints([step], 1, 0) and step <= MAX_AGE, f"update_step must be an integer in [0, 2^53], got {step!r}")
    need(type(meta.get("initialized", True)) is bool and (meta.get("initialized", True) or meta["kind"] == "memoryllm"),
         f"initialized must be true or false (false only for MemoryLLM), got {meta.get('initialized')!r}")
    need(type(meta.get("generator_device")) is str and len(meta["generator_device"]) <= 32,
         "the random generator's device is not recorded")
    for field in ("weights", "hmac"):  # the fingerprint and the signature
        need(meta.get(field) is None or _hex(meta[field]), f"the {field} field is not a sha256 hex digest")
    need(_name(meta.get("dtype")) in FLOAT_DTYPES, f"the STM dtype must be floating point, got {meta.get('dtype')!r}")
    dtype = FLOAT_DTYPES[meta["dtype"]]
    expected = {"stm": (dtype, [L, N, d]), "stm_ages": (torch.int64, [L, N]), "generator_state": (torch.uint8, None)}
    if meta["kind"] == "mplus":
        d_s, S, c = meta.get("key_dim"), meta.get("ltm_sizes"), meta.get("cache_sizes")
        need(ints([d_s], 1, 1), f"key_dim must be an integer >= 1, got {d_s!r}")
        need(_name(meta.get("key_dtype")) in FLOAT_DTYPES, f"key dtype must be floating point, got {meta.get('key_dtype')!r}")
        need(ints(S, L, 0) and ints(c, L, 0), f"ltm_sizes and cache_sizes must list {L} row counts, got {S}, {c}")
        need(all(n == step for n in c), f"the dropped-row cache must hold the update_step = {step} rows written "
             f"since the last merge in every layer, but holds {c}")
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


def check_values(tensors: dict[str, torch.Tensor]) -> None:
    """Raise StateError naming the first tensor (of a state whose layout is checked) with an impossible value."""
    for name in sorted(tensors):
        field, t = name.split(".")[0], tensors[name]
        if field in ROWS:
            need(_all(t, torch.isfinite), f"tensor {name} holds NaN or infinite values; a memory row must be finite")
        elif field in AGES:
            need(_all(t, lambda x: (x >= 0) & (x <= MAX_AGE)), f"tensor {name} holds ages outside [0, 2^53]")
        elif field == "ltm_rf":
            need(_all(t, lambda x: torch.isfinite(x) & (x >= 0)),
                 f"tensor {name} holds recall frequencies that are negative, NaN or infinite")


def check_stored(t: dict[str, torch.Tensor], kind: str, shape: tuple[int, int, int], key_dim: int) -> None:
    """The memory stored with an official checkpoint: `memory` [L, N, d] and, for M+, per layer l `ltm.{l}` [S_l, d],
    `ltm_keys.{l}` [S_l, d_s], `ltm_ages.{l}` [S_l] and `ltm_recall_frequencies.{l}` [S_l], all floating point
    (the official MPlus keeps them in float ParameterLists). Raises StateError(problem)."""
    L, N, d = shape
    memory = t["memory"]
    need(memory.dtype.is_floating_point, f"'memory' has dtype {memory.dtype}; it must be floating point")
    need(tuple(memory.shape) == shape, f"'memory' has shape {tuple(memory.shape)}, the config implies {shape}")
    need(_all(memory, torch.isfinite), "'memory' holds NaN or infinite values; a memory row must be finite")
    if kind != "mplus":
        return
    for l in range(L):
        rows, keys = t[f"ltm.{l}"], t[f"ltm_keys.{l}"]
        ages, rf = t[f"ltm_ages.{l}"], t[f"ltm_recall_frequencies.{l}"]
        for name, x in ((f"ltm.{l}", rows), (f"ltm_keys.{l}", keys), (f"ltm_recall_frequencies.{l}", rf)):
            need(x.dtype.is_floating_point, f"'{name}' has dtype {x.dtype}; it must be floating point")
        need(ages.dtype.is_floating_point, f"'ltm_ages.{l}' has dtype {ages.dtype}, but the official checkpoint stores "
             "ages as floating point (float bytes read as integers would be ages of about 10^9); save it again")
        S = rows.shape[0] if rows.ndim == 2 else -1
        need(rows.ndim == 2 and rows.shape[1] == d, f"'ltm.{l}' has shape {list(rows.shape)}, expected [S, {d}]")
        for name, x, want in ((f"ltm_keys.{l}", keys, [S, key_dim]), (f"ltm_ages.{l}", ages, [S]),
                              (f"ltm_recall_frequencies.{l}", rf, [S])):
            need(list(x.shape) == want, f"'{name}' has shape {list(x.shape)}, but layer {l} has {S} LTM rows, so "
                 f"it must be {want}")
        need(_all(rows, torch.isfinite) and _all(keys, torch.isfinite),
             f"'ltm.{l}' or 'ltm_keys.{l}' holds NaN or infinite values; a memory row must be finite")
        need(_all(ages, lambda x: (x >= 0) & (x <= MAX_AGE) & (x == x.floor())),
             f"'ltm_ages.{l}' holds ages that are not whole numbers in [0, 2^53]")
        need(_all(rf, lambda x: torch.isfinite(x) & (x >= 0)),
             f"'ltm_recall_frequencies.{l}' holds values that are negative, NaN or infinite")


def _all(t: torch.Tensor, ok: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ok(x) (elementwise) holds everywhere in t, checked a chunk at a time."""
    flat = t.reshape(-1)
    return all(bool(ok(flat[i:i + CHUNK]).all()) for i in range(0, flat.numel(), CHUNK))


def _name(x) -> str | None:  # a JSON string, else None: a list or object cannot be looked up in a dict
    return x if type(x) is str else None


def _hex(x) -> bool:
    return type(x) is str and len(x) == 64 and all(c in "0123456789abcdef" for c in x)
