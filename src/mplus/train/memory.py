"""Stage 1 of the training recipe (arXiv 2402.04624, section 3.2.1, new-knowledge incorporation): teach the adapters to write a chunk into memory and read it back.

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

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mplus.memory.lora import READ, WRITE
from mplus.memory.prefix import stm_positions


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """LoRA A/B of both adapters, bos_embedding and new_memory_positional_emb; everything else frozen."""
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters()
              if ".lora_A." in n or ".lora_B." in n or n in ("bos_embedding", "new_memory_positional_emb")]
    for p in params:
        p.requires_grad_(True)
    return params


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the full-memory prefix shows the new block. The recipe's default shows it last, whole, in the STM,
    and a read adapter trained on that reads nothing else (measured: 0.87 right after the write, 0.27 two
    updates later with the block's rows all kept, 0.87 again when they are moved back to the end).

    max_age   show it as it will sit 0..max_age updates later: that many blocks of STM rows after it;
    min_keep  keep a random share q ~ U(min_keep, 1) of its rows per layer, as random drops (or a partial
              retrieval) leave it;
    ltm_ratio share of examples that show those rows among the K0 retrieved rows instead (M+ generation:
              [bos, K0 retrieved, N STM]), with the whole STM after them.
    filled_ratio  share of the other examples (block in the STM) that also show K0 retrieved rows in front, none
              of them the block's: M+ generation from a full LTM, where the retrieval brings other rows while
              the asked one still sits in the STM. Without it the read adapter has only seen a retrieved zone
              that holds the answer, and follows whatever is retrieved (measured on SmolLM2: distance-0
              accuracy 0.84 -> 0.57 once the LTM held filler).
    """
    max_age: int = 0
    min_keep: float = 1.0
    ltm_ratio: float = 0.0
    filled_ratio: float = 0.0


def full_memory_prefix(model, stm: torch.Tensor, delta: torch.Tensor, g: torch.Generator,
                       placement: Placement = Placement()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer [bos, N - K random STM rows in order, the new block]: the memory as it will be after the write
    (or, with a non-default placement, as it will be later; see Placement). Returns rows and their positions."""
    mem = model.memory_config
    N, K, k0 = mem.stm_size, mem.num_tokens, mem.ltm_retrieved
    age = int(torch.randint(0, placement.max_age + 1, (), generator=g)) if placement.max_age else 0
    q = placement.min_keep + (1 - placement.min_keep) * float(torch.rand((), generator=g)) \
        if placement.min_keep < 1 else 1.0
    m = max(1, round(K * q))
    if placement.ltm_ratio > 0 and k0 < K:
        raise ValueError(f"ltm_ratio > 0 needs at least K = {K} retrieved rows (num_ltm_blocks >= 1); this memory "
                         f"retrieves {k0}")
    in_ltm = placement.ltm_ratio > 0 and float(torch.rand((), generator=g)) < placement.ltm_ratio
    # drawn only when asked for, so that a run without it keeps its draws
    filled = not in_ltm and placement.filled_ratio > 0 and float(torch.rand((), generator=g)) < placement.filled_ratio
    rows = []
    for l in range(stm.shape[0]):
        block = delta[l][torch.randperm(K, generator=g)[:m].sort().values] if m < K else delta[l]  # [m, d]
        if in_ltm:  # [bos, K0 - m random STM rows with the block's rows at a random place among them, STM]
            others = stm[l][torch.randperm(N, generator=g)[:k0 - m]]  # [K0 - m, d]
            at = int(torch.randint(0, k0 - m + 1, (), generator=g))
            rows.append(torch.cat((model.bos_embedding[l], others[:at], block, others[at:], stm[l])))
            continue
        keep = torch.randperm(N, generator=g)[:N - m].sort().values  # [N - m]
        after = min(age * K, N - m)
        others = stm[l][keep]  # [N - m, d]
        zone = other_rows(stm[l], k0 if filled else 0, g)  # [K0 or 0, d]
        rows.append(torch.cat((model.bos_embedding[l], zone, others[:N - m - after], block, others[N - m - after:])))
    if in_ltm or filled:
        return rows, torch.arange(1 + k0 + N)  # bos 0, retrieved 1..K0, STM K0+1..K0+N
    return rows, stm_positions(k0, N)  # bos 0, then the STM slots


def other_rows(stm: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n distinct random rows of one layer's STM [N, d], in STM (age) order: a retrieved zone that does not hold
    the asked block. n = 0 draws nothing."""
    return stm[torch.randperm(stm.shape[0], generator=g)[:n].sort().values] if n else stm[:0]  # [n, d]


def rival_prefix(model, stm: torch.Tensor, written: torch.Tensor, g: torch.Generator,
                 filled_ratio: float = 0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer [bos, (K0 other rows,) N - (R + 1) K random STM rows in order, the R + 1 blocks]: the asked
    block among R rival blocks, written [R + 1, L, K, d] in write order, as the last R + 1 writes. The memory of
    the interference benchmark (five people's values of one kind), which only the name answers."""
    mem = model.memory_config
    N, K, k0, R = mem.stm_size, mem.num_tokens, mem.ltm_retrieved, written.shape[0] - 1
    if (R + 1) * K > N:
        raise ValueError(f"{R} rival blocks and the asked one ({(R + 1) * K} rows) do not fit the STM's {N} rows")
    filled = filled_ratio > 0 and float(torch.rand((), generator=g)) < filled_ratio
    rows = []
    for l in range(stm.shape[0]):
        blocks = written[:, l].flatten(0, 1)  # [(R + 1) K, d]
        keep = torch.randperm(N, generator=g)[:N - (R + 1) * K].sort().values  # [N - (R + 1) K]
        zone = other_rows(stm[l], k0 if filled else 0, g)  # [K0 or 0, d]
        rows.append(torch.cat((model.bos_embedding[l], zone, stm[l][keep], blocks)))
    return rows, (torch.arange(1 + k0 + N) if filled else stm_positions(k0, N))


def stage1_loss(model, stm: torch.Tensor, chunk: torch.Tensor, sentence: torch.Tensor, targets: torch.Tensor,
                *, fresh_only: bool, g: torch.Generator, placement: Placement = Placement(),
                rival_chunks: Sequence[torch.Tensor] = (), in_sequence: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, new block [L, K, d]) for one example.

    chunk [n] is written; sentence [T] is read back; targets [T] (bool) marks the tokens whose prediction counts
    (e.g. only the answer of a question). The returned block still carries its gradient; write it into the
    STM detached after the optimiser step, as the recipe does. rival_chunks (full memory only): other people's
    chunks, shown with the block at a random place among them, as the last writes (rival_prefix). Their blocks
    keep their gradient: the write adapter also learns from the blocks the answer must not come from
    (bench/probe_binding.py on SmolLM2, five chunks' rows read through fresh adapters for 300 steps: 0.77 right
    with the write adapter training on every block, 0.38 with the rows fixed). They are all written from the same
    STM, or, with in_sequence, one after another as inference writes them (write_in_sequence).
    """
    K = model.memory_config.num_tokens
    written = None
    if len(rival_chunks):
        at = int(torch.randint(0, len(rival_chunks) + 1, (), generator=g))
        chunks = [*rival_chunks[:at], chunk, *rival_chunks[at:]]
        written = write_in_sequence(model, stm, chunks) if in_sequence else \
            torch.stack([model.new_memory_block(stm, c) for c in chunks])  # [R + 1, L, K, d], differentiable
        delta = written[at]  # [L, K, d]
    else:
        delta = model.new_memory_block(stm, chunk)  # [L, K, d], differentiable
    if fresh_only:
        rows = [torch.cat((model.bos_embedding[l], delta[l])) for l in range(delta.shape[0])]  # [1 + K, d] each
        logits = model.logits_with_rows(sentence, 1 + K + torch.arange(sentence.shape[0]), rows, torch.arange(1 + K),
                                        WRITE)
    else:
        rows, row_positions = full_memory_prefix(model, stm, delta, g, placement) if written is None else \
            rival_prefix(model, stm, written, g, placement.filled_ratio)
        positions = model.memory_config.virtual_prefix + torch.arange(sentence.shape[0])
        logits = model.logits_with_rows(sentence, positions, rows, row_positions, READ)
    return answer_loss(logits, sentence, targets), delta


def write_in_sequence(model, stm: torch.Tensor, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The blocks [C, L, K, d] of chunks written one after another from stm [L, N, d]: each chunk's write pass
    reads the previous chunk's block as its last K STM rows (the only STM rows a write reads), as at inference,
    where a person's fact is written right after the previous person's. Gradient flows into each block from its
    own write pass only: the prefix rows are detached, as the STM is."""
    K, blocks = model.memory_config.num_tokens, []
    for c in chunks:
        blocks.append(model.new_memory_block(stm, c))  # [L, K, d]
        stm = torch.cat((stm[:, K:], blocks[-1].detach()), 1)  # [L, N, d]: the block's rows are now the last K
    return torch.stack(blocks)


def answer_loss(logits: torch.Tensor, sentence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-token predictions logits [1, T, V] of sentence [T] at its target tokens (bool [T]):
    the language-modelling loss of the training recipe (arXiv 2402.04624, section 3.2), on the answer only."""
    mask = targets[1:]
    return F.cross_entropy(logits[0, :-1][mask], sentence[1:][mask])
