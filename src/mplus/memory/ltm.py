"""Long-term memory bookkeeping: drops, the dropped-row cache, merges with time-to-live, retrieval order.

Pure functions on one layer's tensors, so that each rule can be read, and tested, on its own.

Notation: N STM rows, K rows per update, S LTM rows, c cached rows, d hidden size, d_s key size.
"""
from __future__ import annotations

import torch


def draw_drop(n_rows: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, dropped) row indices, each sorted: the first N-K and the last K entries of one randperm(N)."""
    perm = torch.randperm(n_rows, generator=generator)  # [N]
    return perm[:n_rows - k].sort().values, perm[n_rows - k:].sort().values  # [N-K], [K]


def official_drop_count(n_rows: int, num_blocks: int) -> int:
    """The rows the official MemoryLLM drops per update: int(N * (1 / num_blocks)), in floating point.

    It equals K for the released configs; for some block counts (49 blocks: K - 1) it does not, and the official
    pool then grows by a row at every update, which a fixed-size state cannot follow.
    """
    return int(n_rows * (1 / num_blocks))


def tile_index(n_rows: int, n: int) -> torch.Tensor:
    """Which of n new rows fill each of the N slots of a MemoryLLM pool at its first update (0 <= n < N).

    The official code repeats the block floor(N / n) times and appends its last N mod n rows:
    N = 32, n = 5 -> [0..4] x 6, then [3, 4].
    """
    return torch.cat((torch.arange(n).repeat(n_rows // n), torch.arange(n - n_rows % n, n)))  # [N]


def write_block(stm: torch.Tensor, ages: torch.Tensor, new: torch.Tensor, kept: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's STM after an update: survivors in their old order, then the K new rows.

    stm [N, d], ages [N], new [K, d] -> stm [N, d], ages [N]. New rows get ages K-1, ..., 0 (the last written is
    the youngest); survivors keep their ages, which inference never advances (official behaviour).
    """
    k = new.shape[0]
    fresh = torch.arange(k - 1, -1, -1, dtype=ages.dtype)  # [K]
    return torch.cat((stm[kept], new.to(stm.dtype))), torch.cat((ages[kept], fresh))


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
    if int(alive.sum()) > min_rows:
        return ltm[alive], keys[alive], ages[alive], rf[alive]
    return ltm, keys, ages, rf + decay


def cyclic_candidates(n_rows: int, k0: int) -> torch.Tensor:
    """An LTM with fewer than K0 rows feeds all of them, cyclically: the last K0 entries of 0..n-1 repeated.

    n = 12, K0 = 16 -> [8, 9, 10, 11, 0, 1, ..., 11]. With n = 0 there is nothing to feed: an empty list
    (the official loop never ends there); the model then puts no LTM rows in the prefix.
    """
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.long)
    reps = -(-k0 // n_rows)  # ceil
    return torch.arange(n_rows).repeat(reps)[-k0:]  # [K0]


def oldest_first(ages: torch.Tensor) -> torch.Tensor:
    """The order that feeds candidates oldest first: the reverse of a stable ascending sort of their ages.

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
