"""The memory of a MemoryLLM / M+ model as an explicit state object, separate from the weights.

One set of weights can serve many states (one per user or document); a state can be copied, saved, loaded
and swapped without touching the weights.

Notation: L layers, N short-term memory (STM) rows per layer, d hidden size, d_s retriever key size,
S_l long-term memory (LTM) rows of layer l, c_l rows in layer l's dropped-row cache.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mplus.memory.ltm import LayerLTM
from mplus.memory.placement import HOST, Placement
from mplus.memory.state_check import StateError
from mplus.memory.state_file import describe_state, load_state, save_state

if TYPE_CHECKING:
    from mplus.memory.prefix import PrefixCache

__all__ = ["LayerLTM", "MemoryState", "StateError"]


@dataclasses.dataclass(eq=False, repr=False)
class MemoryState:
    """STM of every layer, and for M+ each layer's LTM with its dropped-row cache (mplus.memory.ltm.LayerLTM),
    plus the counters and random generator of updates.

    Ages are integers in memory-token units (one update adds K). A MemoryLLM state has no LTM (ltm is None).
    """

    stm: torch.Tensor  # [L, N, d] hidden states, model dtype
    stm_ages: torch.Tensor  # [L, N] int64
    ltm: list[LayerLTM] | None  # one record per layer: S_l rows, keys, ages, time-to-live, c_l cached rows
    update_step: int  # memory tokens written since the last merge
    generator: torch.Generator  # draws the STM drops (torch.randperm), so a saved state resumes identically
    # The fingerprint of the weights that wrote this memory (mplus.memory.fingerprint), saved in the file's header so
    # that a load into another model of the same shape is refused; None when unknown.
    weights: str | None = None
    # MemoryLLM only (arXiv 2402.04624; the official `initialized` buffer): False until the first injection, which
    # fills the whole STM with copies of its block; until then the model reads no memory at all.
    initialized: bool = True
    # Derived, never saved: the [bos; STM] keys/values of the read prefix, as one model computed them, valid until
    # the next update (mplus.memory.prefix).
    stm_kv: PrefixCache | None = None
    # Never saved: the STM and LTM tensors are the model's stored memory itself (MPlus.initial_state hands them out
    # without copying). Writes never change LTM tensors in place; the first write gives the state an STM of its
    # own (mplus.memory.stm.drop_and_append with out=...), after which writes update it in place.
    shares_memory: bool = False
    # Where each part lives (mplus.memory.placement; docs/placement.md): the STM on the compute device, the LTM and
    # the cache on the host, the retriever keys on either. Never saved: a file is loaded where the caller asks.
    placement: Placement = HOST

    @property
    def has_ltm(self) -> bool:
        return self.ltm is not None

    @property
    def num_layers(self) -> int:
        return self.stm.shape[0]

    def __repr__(self) -> str:
        """One line: kind, sizes and update step (describe() gives the per-layer detail)."""
        L, N, d = self.stm.shape
        ltm = (f", LTM {sum(map(len, self.ltm))} rows + {sum(len(m.cache) for m in self.ltm)} cached"
               if self.has_ltm else "")
        where = "" if self.placement == HOST else f", {self.placement}"
        return (f"MemoryState({'M+' if self.has_ltm else 'MemoryLLM'}, {L} layers, STM {N} rows x d={d}{ltm}, "
                f"update_step {self.update_step}{'' if self.initialized else ', not yet written'}{where})")

    def copy(self) -> "MemoryState":
        """An independent deep copy (tensors cloned, generator state duplicated), its STM its own."""
        g = torch.Generator()
        g.set_state(self.generator.get_state())
        return MemoryState(stm=self.stm.clone(), stm_ages=self.stm_ages.clone(),
                           ltm=None if self.ltm is None else [m.copy() for m in self.ltm],
                           update_step=self.update_step, generator=g, weights=self.weights,
                           initialized=self.initialized, stm_kv=None, placement=self.placement)

    def to(self, placement: Placement) -> "MemoryState":
        """This state with its parts where `placement` says (the same object if they are there already). Parts that
        move are copied; parts that stay are shared, as is the generator (a CPU generator wherever the STM is)."""
        if placement == self.placement:
            return self
        ltm = None if self.ltm is None else [m.to(placement.ltm_device, placement.keys_device) for m in self.ltm]
        moved = placement.device != self.placement.device
        return dataclasses.replace(self, stm=self.stm.to(placement.device), stm_ages=self.stm_ages.to(placement.device),
                                   ltm=ltm, placement=placement, stm_kv=None if moved else self.stm_kv,
                                   shares_memory=self.shares_memory and not moved)

    def without_ltm(self) -> "MemoryState":
        """A copy that behaves as MemoryLLM: the same STM, no long-term memory (dropped rows are forgotten)."""
        s = self.copy()
        s.ltm = None
        return s

    # Saving, loading and describing live in mplus.memory.state_file, which knows states only by their fields.
    def save(self, path, key: bytes | None = None) -> None:
        """Write this state to one safetensors file, signed with HMAC-SHA256 under `key` if given
        (see mplus.memory.state_file.save_state and docs/memory-files.md)."""
        save_state(self, path, key=key)

    @classmethod
    def load(cls, path, expect=None, key: bytes | None = None, placement: Placement | None = None,
             device=None) -> "MemoryState":
        """A new state read from a file written by save; with `key`, only a file signed with that key loads
        (see mplus.memory.state_file.load_state for `expect`). Its parts go where `placement` says (a model's
        .placement), or with `device`, to Placement.on(device); by default all on the CPU."""
        if placement is not None and device is not None:
            raise TypeError("pass placement or device, not both")
        return load_state(path, expect, key=key, build=cls).to(placement or Placement.on(device or "cpu"))

    def describe(self, bins: int = 8) -> str:
        """A short text summary: sizes, dtype and per-layer age histograms (see mplus.memory.state_file.describe_state)."""
        return describe_state(self, bins)
