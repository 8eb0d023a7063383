"""The M+ retriever (arXiv 2502.00592, section 3.2.2): per layer, projectors f_q and f_k into a small key space,
and the top-K0 selection of long-term rows for a prompt.

score(query token i, memory row j) = sigmoid(f_q(norm(h_i)) . f_k(norm(m_j))), a plain dot product; a row's
relevance for a prompt is the mean of its scores over the prompt tokens. norm is the layer's input_layernorm.
Keys of memory rows are computed once, when a row leaves the STM, and stored with it.

Notation: T prompt tokens, d hidden size, d_s key size, S LTM rows, c cached rows, K0 rows retrieved, r rows fed.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mplus.memory.ltm import LayerLTM, cyclic_candidates, order_by_age
from mplus.memory.placement import HOST, Placement


def projector(d: int, d_s: int, n_layers: int) -> nn.Sequential:
    """Linear(d, 2 d_s) -> SiLU -> Linear(2 d_s, d_s) (names .0 and .2, as in the official checkpoints)."""
    if n_layers == 1:
        return nn.Sequential(nn.Linear(d, d_s, bias=False))
    return nn.Sequential(nn.Linear(d, 2 * d_s, bias=False), nn.SiLU(), nn.Linear(2 * d_s, d_s, bias=False))


def relevance(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over queries [T, d_s] of sigmoid(q . k) for keys [S, d_s] -> [S]."""
    return torch.sigmoid(queries @ keys.t()).mean(0)  # [S]


# Keys scored at a time: the temporaries are [SCORE_BLOCK, d_s] keys (only where a block spans the LTM and the cache)
# and [T, SCORE_BLOCK] scores, whatever the LTM's size. A multiple of 64, so that every block's reductions split the
# columns as one block over the whole pool does: the scores, hence the picks, are the same to the bit.
SCORE_BLOCK = 65536


def pool_relevance(queries: torch.Tensor, ltm: LayerLTM, block: int = SCORE_BLOCK) -> torch.Tensor:
    """relevance [S + c] of every row of the pool [LTM; cache] for queries [T, d_s], block rows at a time, without
    concatenating the pool's keys."""
    if block % 64:
        raise ValueError(f"the scoring block must be a multiple of 64 rows, not {block}")
    n = len(ltm) + len(ltm.cache)
    out = None
    for start in range(0, n, block):
        scores = relevance(queries, ltm.pool_slice("keys", start, min(n, start + block)))  # [<= block]
        out = scores.new_empty(n) if out is None else out  # [S + c]
        out[start:start + scores.shape[0]] = scores
    return out


def select(queries: torch.Tensor | None, ltm: LayerLTM, k0: int, block: int = SCORE_BLOCK) -> torch.Tensor:
    """Pool indices [r] of the rows of the pool [LTM; cache] to feed, in feeding order, for queries [T, d_s].

    With at least K0 LTM rows: the top K0 by relevance over the whole pool (pool_relevance), taken in storage order,
    then ordered oldest first. With fewer: the cyclic fill of the LTM alone (no scoring, the cache ignored).
    The indices are on the LTM's device: scored where the keys are, only the K0 picks come back to it.
    """
    if len(ltm) < k0:
        picks = cyclic_candidates(len(ltm), k0).to(ltm.ages.device)  # [r]
    else:
        picks = pool_relevance(queries, ltm, block).topk(k0).indices.sort().values  # [K0] in storage order
        picks = picks.to(ltm.ages.device)
    return picks[order_by_age(ltm.at("ages", picks))]


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """One layer's retrieved rows, in feeding order (oldest first)."""

    rows: torch.Tensor  # [r, d]
    ages: torch.Tensor  # [r]
    picks: torch.Tensor  # [r] indices into the layer's pool [LTM rows; cached rows]
    n_ltm: int  # S: picks >= S are cached dropped rows

    @property
    def from_cache(self) -> torch.Tensor:
        """[r] bool: a dropped row still in the cache (not yet merged) rather than an LTM row."""
        return self.picks >= self.n_ltm

    @property
    def source(self) -> torch.Tensor:
        """[r] 0 for an LTM row, 1 for a cached row (the official code's `source`)."""
        return self.from_cache.long()

    @property
    def index(self) -> torch.Tensor:
        """[r] index within the source (the official code's `index`)."""
        return self.picks - self.source * self.n_ltm

    def __len__(self) -> int:
        return self.picks.shape[0]

    def __repr__(self) -> str:
        return f"Retrieved({len(self)} rows, {int(self.from_cache.sum())} from the cache)"


def retrieve(queries: torch.Tensor, ltm: LayerLTM, k0: int, placement: Placement = HOST) -> Retrieved:
    """Retrieval of M+ (arXiv 2502.00592, section 3.2.2) in one layer: the K0 rows of the pool [LTM; cache] most
    relevant to the prompt's queries [T, d_s] (f_q of its layer inputs), fed oldest first (see select); only
    the K0 picked rows are gathered, on the LTM's host, and only they move to the placement's device."""
    picks = select(placement.queries_to_keys(queries), ltm, k0)  # [r], on the LTM's device
    rows = placement.rows_to_device(ltm.at("rows", picks, pin=placement.pin))  # [r, d]
    return Retrieved(rows=rows, ages=ltm.at("ages", picks), picks=picks, n_ltm=len(ltm))


def nothing_retrieved(d: int, dtype: torch.dtype) -> Retrieved:
    """What a layer without a long-term memory retrieves (MemoryLLM)."""
    none = torch.zeros(0, dtype=torch.long)
    return Retrieved(rows=torch.zeros(0, d, dtype=dtype), ages=none, picks=none, n_ltm=0)
