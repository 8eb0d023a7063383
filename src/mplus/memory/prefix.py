"""The memory prefix every layer reads when M+ or MemoryLLM answers: keys and values only, never queried.

    layer l:  [bos_embedding[l] (position 0), retrieved LTM rows (1..r), STM[l] (1+K0..K0+N)]

then the input tokens from position 1 + K0 + N = 1 + num_blocks * K (arXiv 2402.04624, section 3.1: the memory
is a prefix of every layer; arXiv 2502.00592, section 3.2.2: the retrieved long-term rows go between the BOS
embedding and the STM, oldest first). MemoryLLM retrieves nothing (r = 0).

The [bos; STM] part depends only on the memory and the weights, so its keys/values are computed once and kept
with the state (PrefixCache) until the memory changes. They belong to the model that computed them: another
model, or the same model after its weights changed, computes its own. With gradients on (training), nothing is
kept or reused: the keys/values must carry the gradient of the weights as they are now.

Notation: L layers, N STM rows, K0 rows retrieved, r rows fed, d hidden size, H_kv key/value heads, D head_dim.
"""
from __future__ import annotations

import dataclasses
import weakref

import torch

from mplus.llama.rope import rope_cos_sin
from mplus.memory.fingerprint import weights_key
from mplus.memory.lora import READ
from mplus.memory.retriever import Retrieved

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [1, H_kv, P, D]


@dataclasses.dataclass(repr=False)
class PrefixCache:
    """The read adapter's [bos; STM] keys/values of every layer, as one model's weights computed them."""

    owner: weakref.ref  # the model
    weights: tuple  # its weights_key at the time
    kv: list[KV | None]  # per layer, filled as layers are read

    def __repr__(self) -> str:
        return f"PrefixCache({sum(kv is not None for kv in self.kv)} of {len(self.kv)} layers)"

    def belongs_to(self, model) -> bool:
        return self.owner() is model and self.weights == weights_key(model)


def prefix_cache(model, state) -> PrefixCache | None:
    """The state's cache of [bos; STM] keys/values if this model, with its current weights, computed it; else a
    new empty one, kept in the state. None with gradients on: training recomputes them every time."""
    if torch.is_grad_enabled():
        return None
    cache = state.stm_kv
    if cache is None or not cache.belongs_to(model):
        cache = state.stm_kv = PrefixCache(weakref.ref(model), weights_key(model), [None] * state.num_layers)
    return cache


def _cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(model.inv_freq, positions.to(model.inv_freq.device))  # [P, D] each, where the model is


def stm_positions(k0: int, n: int) -> torch.Tensor:
    """Positions [1 + N] of [bos; STM] in the read prefix: 0, then 1 + K0 .. K0 + N (after the retrieved slots)."""
    return torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1 + k0, 1 + k0 + n)))


def memory_prefix(model, state, l: int, retrieved: Retrieved, cache: PrefixCache | None) -> KV | None:
    """Layer l's read prefix (module docstring): keys/values [1, H_kv, 1 + r + N, D] of [bos; retrieved; STM[l]]
    through the read adapter; None for a MemoryLLM state not yet written (the official model is a plain Llama then).

    cache: from prefix_cache; None computes the [bos; STM] part afresh (with gradient, when enabled).
    """
    if not state.initialized:
        return None
    layer, mem = model.model.layers[l], model.memory_config
    stm_kv = None if cache is None else cache.kv[l]
    if stm_kv is None:
        rows = torch.cat((model.bos_embedding[l], state.stm[l]))[None]  # [1, 1 + N, d]
        stm_kv = layer.prefix_kv(rows, *_cos_sin(model, stm_positions(mem.ltm_retrieved, mem.stm_size)),
                                 READ)  # [1, H_kv, 1 + N, D] each
        if cache is not None:
            cache.kv[l] = stm_kv
    if not len(retrieved):
        return stm_kv
    stm_k, stm_v = stm_kv
    ltm_k, ltm_v = layer.prefix_kv(retrieved.rows[None], *_cos_sin(model, torch.arange(1, 1 + len(retrieved))),
                                   READ)  # [1, H_kv, r, D] each
    return (torch.cat((stm_k[:, :, :1], ltm_k, stm_k[:, :, 1:]), 2),
            torch.cat((stm_v[:, :, :1], ltm_v, stm_v[:, :, 1:]), 2))
