"""Stage 1 of the training recipe (spec 8.3): teach the adapters to write a chunk into memory and read it back.

One step encodes a context chunk into a new memory block with the write adapter (keeping its gradient: the
only way gradient reaches the write adapter), then predicts a "sentence" that depends on the chunk while
reading a memory that holds the block:

  * full memory (80 % of steps in the recipe): prefix [bos, a random sorted subset of N - K STM rows, the new
    block] at the generation positions, read adapter;
  * fresh block only (20 %): prefix [bos, the new block] at positions 0..K, sentence from K + 1, write adapter.

The loss is cross-entropy on the sentence's target tokens. Only the two adapters and the two learned
embeddings train; the base weights and the memory are frozen (the STM evolves by writes, not by gradients).

Notation: L layers, N STM rows, K rows per block, P prefix rows, T sentence tokens, d hidden size, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import READ, WRITE


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """LoRA A/B of both adapters, bos_embedding and new_memory_positional_emb; everything else frozen."""
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters()
              if ".lora_A." in n or ".lora_B." in n or n in ("bos_embedding", "new_memory_positional_emb")]
    for p in params:
        p.requires_grad_(True)
    return params


def read_logits(model, rows: list[torch.Tensor], row_positions: torch.Tensor, ids: torch.Tensor,
                positions: torch.Tensor, adapter: str) -> torch.Tensor:
    """Logits [1, T, V] of ids [T] at `positions`, every layer l reading rows[l] [P, d] as keys/values only."""
    cos, sin = model._cos_sin(positions)  # [T, D]
    p_cos, p_sin = model._cos_sin(row_positions)  # [P, D]
    x = model.model.embed_tokens(ids)[None]  # [1, T, d]
    for l, layer in enumerate(model.model.layers):
        prefix_kv = layer.prefix_kv(rows[l][None], p_cos, p_sin, adapter)
        x = layer(x, cos, sin, prefix_kv=prefix_kv, adapter=adapter)  # [1, T, d]
    return model.lm_head(model.model.norm(x)).float()  # [1, T, V]


def full_memory_prefix(model, stm: torch.Tensor, delta: torch.Tensor, g: torch.Generator
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer [bos, N - K random STM rows in order, the new block]: the memory as it will be after the write."""
    mem = model.memory_config
    N, K, k0 = mem.stm_size, mem.num_tokens, mem.ltm_retrieved
    rows = []
    for l in range(stm.shape[0]):
        keep = torch.randperm(N, generator=g)[:N - K].sort().values  # [N - K]
        rows.append(torch.cat((model.bos_embedding[l], stm[l][keep], delta[l])))  # [1 + N, d]
    positions = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1 + k0, 1 + k0 + N)))  # STM slots
    return rows, positions


def stage1_loss(model, stm: torch.Tensor, chunk: torch.Tensor, sentence: torch.Tensor, targets: torch.Tensor,
                *, fresh_only: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, new block [L, K, d]) for one example.

    chunk [n] is written; sentence [T] is read back; targets [T] (bool) marks the tokens whose prediction counts
    (e.g. only the answer of a question). The returned block still carries its gradient; write it into the
    STM detached after the optimiser step, as the recipe does.
    """
    K = model.memory_config.num_tokens
    delta = model.encode(stm, chunk)  # [L, K, d], differentiable
    if fresh_only:
        rows = [torch.cat((model.bos_embedding[l], delta[l])) for l in range(delta.shape[0])]  # [1 + K, d] each
        logits = read_logits(model, rows, torch.arange(1 + K), sentence, 1 + K + torch.arange(sentence.shape[0]),
                             WRITE)
    else:
        rows, row_positions = full_memory_prefix(model, stm, delta, g)
        positions = model.memory_config.virtual_prefix + torch.arange(sentence.shape[0])
        logits = read_logits(model, rows, row_positions, sentence, positions, READ)
    mask = targets[1:]
    loss = F.cross_entropy(logits[0, :-1][mask], sentence[1:][mask])
    return loss, delta
