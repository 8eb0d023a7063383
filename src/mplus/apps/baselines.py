"""The baselines an M+ is compared with, built from its own weights: a MemoryLLM of the same memory size, and
the decoder reading everything in its prompt.

M+ (arXiv 2502.00592, section 3) reads N STM rows plus K0 rows retrieved from its long-term memory, N + K0
memory rows per layer. Switching its LTM off (MemoryState.without_ltm) gives MemoryLLM (arXiv 2402.04624) with
only N rows; the fair comparison is a MemoryLLM whose STM holds all N + K0 rows:

  same_size_memoryllm(m)  the same weights (no retriever), num_blocks unchanged, num_ltm_blocks 0, so
                          N' = num_blocks * K = N + K0 rows, K rows written per chunk, and the input tokens at the
                          same positions (1 + num_blocks * K onwards). Its stored memory is the M+ one grown by
                          K0 rows: per layer the K0 rows the M+ dropped last (the youngest of its LTM, oldest of
                          them first), then the M+ STM. Every row is one the M+ wrote from its own filler
                          priming, nothing new is learnt, and the STM ends with the same block as the M+ STM, so
                          a chunk writes the same block into both (encode reads only the last K rows).
  in_context_reply(m, ids) the greedy reply of the decoder M+ answers with (its weights and read adapter) to the
                          fact, the filler and the question in one prompt, with no memory in front: the model
                          given the text itself instead of a memory of it, in the base's training format (fact,
                          filler, "Q: ...\nA:"). Measured on the shipped model, 30 test people, 0 / 4 / 8 / 16 / 32 / 60
                          filler chunks: 0.73 / 0.67 / 0.43 / 0.50 / 0.03 / 0.10 this way; 0.80 / 0.50 / 0.03 / 0 /
                          0 / 0 with the bare base weights (no adapter), which lose the fact beyond their 256-token
                          training windows sooner; 0.60 / 0.67 / 0.37 / 0.17 / 0.07 / 0.07 with the memory in front
                          as well. This way is the strongest at a distance: the upper bound.
"""
from __future__ import annotations

import torch

from mplus.llama.generate import collect, decode_loop
from mplus.llama.kv_cache import KVCache
from mplus.memory.lora import READ
from mplus.memory.config import MemoryConfig
from mplus.memory.checkpoint import new_state
from mplus.memory.mplus import MPlus
from mplus.llama.rope import rope_cos_sin
from mplus.memory.state import MemoryState


def grown_stm(state: MemoryState, extra: int) -> torch.Tensor:
    """[L, extra + N, d]: per layer the `extra` youngest rows of the LTM and dropped-row cache (oldest of them
    first, as the STM keeps insertion order), then the STM [L, N, d]."""
    rows = []
    for l, ltm in enumerate(state.ltm):
        pool, ages = ltm.pool("rows"), ltm.pool("ages")  # [S + c, d], [S + c]
        if pool.shape[0] < extra:
            raise ValueError(f"layer {l} of this M+ memory holds {pool.shape[0]} long-term rows, fewer than the "
                             f"{extra} needed to grow a MemoryLLM of the same size; inject more chunks first")
        youngest = torch.sort(ages, stable=True).indices[:extra].flip(0)  # [extra], oldest of them first
        rows.append(torch.cat((pool[youngest], state.stm[l])))
    return torch.stack(rows)  # [L, extra + N, d]


def same_size_memoryllm(model: MPlus) -> MPlus:
    """A MemoryLLM with N + K0 STM rows per layer from an M+'s weights and stored memory (module docstring).
    It can be saved with save_pretrained as a MemoryLLM checkpoint."""
    mem = model.memory_config
    if mem.kind != "mplus":
        raise ValueError("same_size_memoryllm needs an M+ model (it moves the retrieved rows into the STM)")
    size = MemoryConfig(kind="memoryllm", num_tokens=mem.num_tokens, num_blocks=mem.num_blocks, lora_r=mem.lora_r,
                        lora_alpha=mem.lora_alpha, lora_targets=mem.lora_targets,
                        drop_memory_per_layer=mem.drop_memory_per_layer, question_template=mem.question_template)
    out = MPlus(model.config, size).to(model.dtype)
    weights = model.state_dict()
    out.load_state_dict({name: weights[name] for name in out.state_dict()})  # every MemoryLLM weight is an M+ one
    out.inv_freq = model.inv_freq.clone()
    out.checkpoint_state = new_state(out, grown_stm(model.checkpoint_state, mem.ltm_retrieved), None, None, None, None)
    return out.eval()


def fits_in_context(model: MPlus, n_tokens: int, max_new_tokens: int = 16) -> bool:
    """Whether a prompt of n_tokens and its reply fit the decoder's max_position_embeddings."""
    return n_tokens + max_new_tokens <= model.config.max_position_embeddings


def in_context_reply(model: MPlus, ids: list[int], max_new_tokens: int = 16, adapter: str | None = READ) -> list[int]:
    """Greedy new tokens after ids of the decoder with its read adapter (adapter None: the base model itself)
    and no memory, at positions 0.."""
    if not fits_in_context(model, len(ids), max_new_tokens):
        raise ValueError(f"a prompt of {len(ids)} tokens and {max_new_tokens} new ones exceed the model's "
                         f"{model.config.max_position_embeddings} positions; shorten the context")
    cache = KVCache(model.config, len(ids) + max_new_tokens, dtype=model.dtype)

    def forward(tokens: list[int]) -> torch.Tensor:
        positions = torch.arange(cache.length, cache.length + len(tokens))  # [T]
        cos, sin = rope_cos_sin(model.inv_freq, positions)
        x = model.model.run_layers(model.model.embed_tokens(torch.tensor(tokens))[None], cos, sin, cache=cache,
                                   adapter=adapter, last_only=True)  # [1, 1, d]
        return model.lm_head(model.model.norm(x)).float()[0, -1]  # [V]

    return collect(decode_loop(lambda: forward(ids), lambda token: forward([token]), max_new_tokens=max_new_tokens,
                               stop=set(model.config.eos_token_id)))
