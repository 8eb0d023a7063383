"""The short-term memory (STM) rules: which rows an update drops, and how the new block joins the survivors.

MemoryLLM (arXiv 2402.04624, section 3.1) keeps N rows per layer; each update drops K of them at random and
appends the K new rows. M+ (arXiv 2502.00592, section 3.2.1) keeps this rule and moves the dropped rows on to the
long-term memory (mplus.memory.ltm) instead of forgetting them.

Notation: L layers, N STM rows, K rows per update, d hidden size.
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


def write_block(stm: torch.Tensor, ages: torch.Tensor, new: torch.Tensor, kept: torch.Tensor,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One layer's STM after an update, written in place (or into out): survivors in their old order, then the
    K new rows.

    stm [N, d], ages [N], new [K, d], kept [N-K] ascending. The survivors move down over the dropped slots (a
    temporary of one layer's survivors, never of the whole STM); the block fills the last K slots. New rows get
    ages K-1, ..., 0 (the last written is the youngest); survivors keep their ages, which inference never advances
    (official behaviour). out: (stm [N, d], ages [N]) to write into instead of stm and ages themselves.
    """
    rows, row_ages = out or (stm, ages)
    n_kept, k = kept.shape[0], new.shape[0]
    rows[:n_kept], row_ages[:n_kept] = stm[kept], ages[kept]  # the right sides are gathered before the copy
    rows[n_kept:] = new
    row_ages[n_kept:] = torch.arange(k - 1, -1, -1, dtype=ages.dtype, device=ages.device)  # [K]


def drop_and_append(stm: torch.Tensor, ages: torch.Tensor, block: torch.Tensor, generator: torch.Generator, *,
                    per_layer: bool = True, out: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The STM update of MemoryLLM (arXiv 2402.04624, section 3.1): drop K random rows per layer, append the block.

    stm [L, N, d], ages [L, N], block [L, K, d], updated in place layer by layer (write_block), or written into
    out = (stm [L, N, d], ages [L, N]) when stm is shared and must stay as it is. Returns the dropped rows
    [L, K, d] and their ages [L, K]. per_layer: one draw per layer, layer 0 first (the official default); else
    one draw for all.
    """
    L, N, _ = stm.shape
    K = block.shape[1]
    shared = None if per_layer else draw_drop(N, K, generator)
    dropped = stm.new_empty(L, K, stm.shape[2])  # [L, K, d]
    dropped_ages = ages.new_empty(L, K)  # [L, K]
    for l in range(L):
        kept, gone = shared or draw_drop(N, K, generator)
        dropped[l], dropped_ages[l] = stm[l, gone], ages[l, gone]
        write_block(stm[l], ages[l], block[l].to(stm.dtype), kept, None if out is None else (out[0][l], out[1][l]))
    return dropped, dropped_ages


def first_write(block: torch.Tensor, n_rows: int, age_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A MemoryLLM pool's first update: the block [L, n, d] tiled over all N rows (tile_index), no random draw.

    Returns (stm [L, N, d], ages [L, N]); the block's rows keep the ages a write gives them (n-1, ..., 0).
    """
    index = tile_index(n_rows, block.shape[1])  # [N]
    fresh = torch.arange(block.shape[1] - 1, -1, -1, dtype=age_dtype)  # [n], as write_block
    return block[:, index], fresh[index].repeat(block.shape[0], 1)
