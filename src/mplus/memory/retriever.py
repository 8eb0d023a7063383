"""The M+ retriever: per layer, projectors f_q and f_k into a small key space, and the top-K0 selection.

score(query token i, memory row j) = sigmoid(f_q(norm(h_i)) . f_k(norm(m_j))), a plain dot product; a row's
relevance for a prompt is the mean of its scores over the prompt tokens. norm is the layer's input_layernorm.
Keys of memory rows are computed once, when a row leaves the STM, and stored with it.

Notation: T prompt tokens, d hidden size, d_s key size, S LTM rows, c cached rows, K0 rows retrieved.
"""
from __future__ import annotations

import torch
from torch import nn

from mplus.memory.ltm import cyclic_candidates, oldest_first


def projector(d: int, d_s: int, n_layers: int) -> nn.Sequential:
    """Linear(d, 2 d_s) -> SiLU -> Linear(2 d_s, d_s) (names .0 and .2, as in the official checkpoints)."""
    if n_layers == 1:
        return nn.Sequential(nn.Linear(d, d_s, bias=False))
    return nn.Sequential(nn.Linear(d, 2 * d_s, bias=False), nn.SiLU(), nn.Linear(2 * d_s, d_s, bias=False))


def relevance(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over queries [T, d_s] of sigmoid(q . k) for keys [S, d_s] -> [S]."""
    return torch.sigmoid(queries @ keys.t()).mean(0)  # [S]


def select(queries: torch.Tensor | None, ltm_keys: torch.Tensor, ltm_ages: torch.Tensor,
           cache_keys: torch.Tensor, cache_ages: torch.Tensor, k0: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to feed, in feeding order: (source [r] with 0 = LTM / 1 = cache, index [r] within the source).

    With at least K0 LTM rows: the top K0 by relevance over [LTM ; cache], taken in storage order, then
    ordered oldest first. With fewer: the cyclic fill of the LTM alone (no scoring, the cache ignored).
    """
    n_ltm = ltm_keys.shape[0]
    if n_ltm < k0:
        index = cyclic_candidates(n_ltm, k0)  # [r]
        source = torch.zeros_like(index)
        ages = ltm_ages[index]
    else:
        scores = relevance(queries, torch.cat((ltm_keys, cache_keys.to(ltm_keys.dtype))))  # [S + c]
        top = scores.topk(k0).indices.sort().values  # [K0] in storage order
        source = (top >= n_ltm).long()
        index = torch.where(source == 1, top - n_ltm, top)
        ages = torch.cat((ltm_ages, cache_ages))[top]
    order = oldest_first(ages)
    return source[order], index[order]
