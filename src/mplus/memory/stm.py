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


def write_block(stm: torch.Tensor, ages: torch.Tensor, new: torch.Tensor, kept: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's STM after an update: survivors in their old order, then the K new rows.

    stm [N, d], ages [N], new [K, d] -> stm [N, d], ages [N]. New rows get ages K-1, ..., 0 (the last written is
    the youngest); survivors keep their ages, which inference never advances (official behaviour).
    """
    k = new.shape[0]
    fresh = torch.arange(k - 1, -1, -1, dtype=ages.dtype)  # [K]
    return torch.cat((stm[kept], new.to(stm.dtype))), torch.cat((ages[kept], fresh))


def drop_and_append(stm: torch.Tensor, ages: torch.Tensor, block: torch.Tensor, generator: torch.Generator, *,
                    per_layer: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The STM update of MemoryLLM (arXiv 2402.04624, section 3.1): drop K random rows per layer, append the block.

    stm [L, N, d], ages [L, N], block [L, K, d] -> (stm [L, N, d], ages [L, N], dropped rows [L, K, d], their
    ages [L, K]). per_layer: one draw per layer, layer 0 first (the official default); else one draw for all.
    """
    L, N, _ = stm.shape
    K = block.shape[1]
    shared = None if per_layer else draw_drop(N, K, generator)
    rows, row_ages, dropped, dropped_ages = [], [], [], []
    for l in range(L):
        kept, gone = shared or draw_drop(N, K, generator)
        dropped.append(stm[l][gone]), dropped_ages.append(ages[l][gone])
        new_rows, new_ages = write_block(stm[l], ages[l], block[l], kept)
        rows.append(new_rows), row_ages.append(new_ages)
    return torch.stack(rows), torch.stack(row_ages), torch.stack(dropped), torch.stack(dropped_ages)


def first_write(block: torch.Tensor, n_rows: int, age_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A MemoryLLM pool's first update: the block [L, n, d] tiled over all N rows (tile_index), no random draw.

    Returns (stm [L, N, d], ages [L, N]); the block's rows keep the ages a write gives them (n-1, ..., 0).
    """
    index = tile_index(n_rows, block.shape[1])  # [N]
    fresh = torch.arange(block.shape[1] - 1, -1, -1, dtype=age_dtype)  # [n], as write_block
    return block[:, index], fresh[index].repeat(block.shape[0], 1)
