"""The long-term memory (LTM) of M+, one record per layer: rows, retriever keys, ages, time-to-live, and the
dropped-row cache that waits for the next merge (arXiv 2502.00592, section 3.2.1).

Rows that leave the STM go first to the layer's cache (cache_dropped_rows), with their keys; every few updates
the cache is merged into the LTM (merge_into_ltm), where each row lives until its time-to-live (the official
"recall frequency") runs out. Retrieval (mplus.memory.retriever) scores the layer's pool [LTM rows; cached rows].

Notation: S LTM rows, c cached rows, d hidden size, d_s key size, K rows per update, K0 rows retrieved.
"""
from __future__ import annotations

import dataclasses

import torch

# The state file's tensor names of one layer's record (docs/memory-files.md), as (name, field of LayerLTM).
TENSOR_NAMES = (("ltm", "rows"), ("ltm_keys", "keys"), ("ltm_ages", "ages"), ("ltm_rf", "rf"),
                ("cache_rows", "cache.rows"), ("cache_keys", "cache.keys"), ("cache_ages", "cache.ages"))


@dataclasses.dataclass(repr=False)
class DroppedRows:
    """One layer's dropped-row cache: the rows that left the STM since the last merge, with keys and ages."""

    rows: torch.Tensor  # [c, d], model dtype
    keys: torch.Tensor  # [c, d_s], f_k of the rows, computed once when they were dropped
    ages: torch.Tensor  # [c] int64

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __repr__(self) -> str:
        return f"DroppedRows({len(self)} rows)"

    def copy(self) -> "DroppedRows":
        return DroppedRows(self.rows.clone(), self.keys.clone(), self.ages.clone())

    def to(self, host: torch.device, keys: torch.device) -> "DroppedRows":
        return DroppedRows(self.rows.to(host), self.keys.to(keys), self.ages.to(host))

    def cleared(self) -> "DroppedRows":
        return DroppedRows(self.rows[:0], self.keys[:0], self.ages[:0])


@dataclasses.dataclass(repr=False)
class LayerLTM:
    """One layer's long-term memory and its dropped-row cache.

    Ages are integers in memory-token units (one update adds K). The time-to-live is float64 because the
    official merge decrements it and compares with 0.01.
    """

    rows: torch.Tensor  # [S, d], model dtype
    keys: torch.Tensor  # [S, d_s]
    ages: torch.Tensor  # [S] int64
    rf: torch.Tensor  # [S] float64, the time-to-live ("recall frequency")
    cache: DroppedRows

    @classmethod
    def empty(cls, d: int, d_s: int, dtype: torch.dtype) -> "LayerLTM":
        return cls(torch.zeros(0, d, dtype=dtype), torch.zeros(0, d_s, dtype=dtype), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.float64),
                   DroppedRows(torch.zeros(0, d, dtype=dtype), torch.zeros(0, d_s, dtype=dtype),
                               torch.zeros(0, dtype=torch.long)))

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __repr__(self) -> str:
        return f"LayerLTM({len(self)} rows, {len(self.cache)} cached)"

    def copy(self) -> "LayerLTM":
        return LayerLTM(self.rows.clone(), self.keys.clone(), self.ages.clone(), self.rf.clone(), self.cache.copy())

    def subset(self, picks: torch.Tensor) -> "LayerLTM":
        """The LTM rows picks [r] (indices, in the order given) with their keys, ages and time-to-live; the cache
        is kept whole."""
        return LayerLTM(self.rows[picks], self.keys[picks], self.ages[picks], self.rf[picks], self.cache.copy())

    def to(self, host: torch.device, keys: torch.device) -> "LayerLTM":
        """This record with its keys (LTM and cache) on `keys`, everything else on `host` (mplus.memory.placement)."""
        return LayerLTM(self.rows.to(host), self.keys.to(keys), self.ages.to(host), self.rf.to(host),
                        self.cache.to(host, keys))

    def pool(self, field: str = "rows") -> torch.Tensor:
        """The retrieval candidates [LTM; cache] of one field ("rows" [S + c, d], "keys" [S + c, d_s], "ages"), as
        one new tensor: for inspection; answering reads only pool_slice and at."""
        return self.pool_slice(field, 0, len(self) + len(self.cache))

    def pool_slice(self, field: str, start: int, end: int) -> torch.Tensor:
        """Pool rows start..end-1 of one field; only a range across the LTM/cache boundary is copied."""
        mine, cached, S = getattr(self, field), getattr(self.cache, field), len(self)
        if end <= S:
            return mine[start:end]
        if start >= S:
            return cached[start - S:end - S].to(mine.dtype)
        return torch.cat((mine[start:], cached[:end - S].to(mine.dtype)))

    def at(self, field: str, picks: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """One field at pool indices picks [r] (0..S-1 LTM rows, S.. cached rows): [r, ...], gathering just those
        rows, never the whole pool. pin: gather into page-locked memory, from which a copy to a CUDA device is
        asynchronous (mplus.memory.placement)."""
        mine, cached, in_cache = getattr(self, field), getattr(self.cache, field), picks >= len(self)
        out = torch.empty((picks.shape[0], *mine.shape[1:]), dtype=mine.dtype, device=mine.device,
                          pin_memory=pin)  # [r, ...]
        out[~in_cache] = mine[picks[~in_cache]]
        out[in_cache] = cached[picks[in_cache] - len(self)].to(mine.dtype)
        return out

    def tensors(self, l: int, prefix: str = "") -> dict[str, torch.Tensor]:
        """The record under the state file's names for layer l: {prefix}ltm.{l}, {prefix}ltm_keys.{l}, ..."""
        return {f"{prefix}{name}.{l}": _field(self, field) for name, field in TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], l: int, prefix: str = "") -> "LayerLTM":
        t = {field: tensors[f"{prefix}{name}.{l}"] for name, field in TENSOR_NAMES}
        return cls(t["rows"], t["keys"], t["ages"], t["rf"],
                   DroppedRows(t["cache.rows"], t["cache.keys"], t["cache.ages"]))


def _field(record, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        record = getattr(record, part)
    return record


def cache_dropped_rows(ltm: LayerLTM, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, k: int) -> LayerLTM:
    """After an update (arXiv 2502.00592, section 3.2.1): everything that already left the STM ages by K, and the
    K rows just dropped, rows [K, d] with keys [K, d_s] and their STM ages [K], join the cache."""
    cache = ltm.cache
    return LayerLTM(ltm.rows, ltm.keys, ltm.ages + k, ltm.rf,
                    DroppedRows(torch.cat((cache.rows, rows)), torch.cat((cache.keys, keys)),
                                torch.cat((cache.ages + k, ages))))


def merge(ltm: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, rf: torch.Tensor,
          cache_rows: torch.Tensor, cache_keys: torch.Tensor, cache_ages: torch.Tensor, *,
          initial_rf: float, decay: float, min_rows: int):
    """Move the cache into the LTM and apply the time-to-live; returns the new (ltm, keys, ages, rf).

    New rows enter with rf = initial_rf; then every rf drops by `decay`. Rows with rf <= 0.01 are evicted,
    unless that would leave min_rows (K0) rows or fewer: then nothing is evicted and the decay is undone.
    """
    ltm, keys = torch.cat((ltm, cache_rows.to(ltm.dtype))), torch.cat((keys, cache_keys.to(keys.dtype)))
    ages = torch.cat((ages, cache_ages))
    rf = torch.cat((rf, torch.full((cache_rows.shape[0],), initial_rf, dtype=rf.dtype))) - decay
    alive = rf > 0.01
    if int(alive.sum()) > min_rows:  # the keys may live on another device than the rest (mplus.memory.placement)
        return ltm[alive], keys[alive.to(keys.device)], ages[alive], rf[alive]
    return ltm, keys, ages, rf + decay


def merge_into_ltm(ltm: LayerLTM, *, initial_rf: float, decay: float, min_rows: int) -> LayerLTM:
    """The periodic merge of M+ (arXiv 2502.00592, section 3.2.1): the cache joins the LTM with a time-to-live,
    rows whose time is up are evicted (see merge), and the cache is emptied."""
    c = ltm.cache
    rows, keys, ages, rf = merge(ltm.rows, ltm.keys, ltm.ages, ltm.rf, c.rows, c.keys, c.ages,
                                 initial_rf=initial_rf, decay=decay, min_rows=min_rows)
    return LayerLTM(rows, keys, ages, rf, c.cleared())


def cyclic_candidates(n_rows: int, k0: int) -> torch.Tensor:
    """An LTM with fewer than K0 rows feeds all of them, cyclically: the last K0 entries of 0..n-1 repeated.

    n = 12, K0 = 16 -> [8, 9, 10, 11, 0, 1, ..., 11]. With n = 0 there is nothing to feed: an empty list
    (the official loop never ends there); the model then puts no LTM rows in the prefix.
    """
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.long)
    reps = -(-k0 // n_rows)  # ceil
    return torch.arange(n_rows).repeat(reps)[-k0:]  # [K0]


def order_by_age(ages: torch.Tensor) -> torch.Tensor:
    """The order that feeds retrieved rows oldest first (arXiv 2502.00592, section 3.2.2): the reverse of a stable
    ascending sort of their ages.

    Among equal ages the later candidate comes first. The official code uses numpy's unstable default sort,
    whose tie order depends on the CPU; the fixtures pin this stable rule.
    """
    return torch.sort(ages, stable=True).indices.flip(0)


def copies_of(rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """[S] bool: which rows [S, d] are copies of a row of the written block [K, d].

    Rows are moved, never changed, from the write through the STM and the cache into the LTM, so exact
    equality finds where a chunk's memory went without any bookkeeping (training labels, benchmark recall).
    """
    return (rows[:, None] == block[None]).all(-1).any(-1)
