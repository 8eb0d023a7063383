"""The memory of a MemoryLLM / M+ model as an explicit state object, separate from the weights.

One set of weights can serve many states (one per user or document); a state can be copied, saved, loaded
and swapped without touching the weights.

Notation: L layers, N short-term memory (STM) rows per layer, d hidden size, d_s retriever key size,
S_l long-term memory (LTM) rows of layer l, c_l rows in layer l's dropped-row cache.
"""
from __future__ import annotations

import dataclasses

import torch

from mplus.memory.state_check import StateError
from mplus.memory.state_file import describe_state, load_state, save_state

__all__ = ["MemoryState", "StateError"]


@dataclasses.dataclass
class MemoryState:
    """STM, LTM and the dropped-row cache of every layer, plus the counters and random generator of updates.

    Ages are integers in memory-token units (one update adds K). Recall frequencies are float64 because the
    official merge decrements them and compares with 0.01. A MemoryLLM state has no LTM (ltm is None).
    """

    stm: torch.Tensor  # [L, N, d] hidden states, model dtype
    stm_ages: torch.Tensor  # [L, N] int64
    ltm: list[torch.Tensor] | None  # L x [S_l, d]; None for MemoryLLM
    ltm_keys: list[torch.Tensor] | None  # L x [S_l, d_s]
    ltm_ages: list[torch.Tensor] | None  # L x [S_l] int64
    ltm_rf: list[torch.Tensor] | None  # L x [S_l] float64, the time-to-live ("recall frequency")
    cache_rows: list[torch.Tensor] | None  # L x [c_l, d], dropped rows waiting for the next merge
    cache_keys: list[torch.Tensor] | None  # L x [c_l, d_s]
    cache_ages: list[torch.Tensor] | None  # L x [c_l] int64
    update_step: int  # memory tokens written since the last merge
    generator: torch.Generator  # draws the STM drops (torch.randperm), so a saved state resumes identically
    # The fingerprint of the weights that wrote this memory (mplus.memory.fingerprint), saved in the file's header so
    # that a load into another model of the same shape is refused; None when unknown.
    weights: str | None = None
    # MemoryLLM only (arXiv 2402.04624; the official `initialized` buffer): False until the first injection, which
    # fills the whole STM with copies of its block; until then the model reads no memory at all.
    initialized: bool = True
    # Derived, never saved: per-layer STM keys/values for the read adapter, valid until the next update.
    stm_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = dataclasses.field(default=None, repr=False)

    @property
    def has_ltm(self) -> bool:
        return self.ltm is not None

    @property
    def num_layers(self) -> int:
        return self.stm.shape[0]

    def copy(self) -> "MemoryState":
        """An independent deep copy (tensors cloned, generator state duplicated)."""
        g = torch.Generator()
        g.set_state(self.generator.get_state())
        clone = lambda xs: None if xs is None else [x.clone() for x in xs]  # noqa: E731
        return MemoryState(
            stm=self.stm.clone(), stm_ages=self.stm_ages.clone(), ltm=clone(self.ltm), ltm_keys=clone(self.ltm_keys),
            ltm_ages=clone(self.ltm_ages), ltm_rf=clone(self.ltm_rf), cache_rows=clone(self.cache_rows),
            cache_keys=clone(self.cache_keys), cache_ages=clone(self.cache_ages), update_step=self.update_step,
            generator=g, weights=self.weights, initialized=self.initialized, stm_kv=None)

    def without_ltm(self) -> "MemoryState":
        """A copy that behaves as MemoryLLM: the same STM, no long-term memory (dropped rows are forgotten)."""
        s = self.copy()
        s.ltm = s.ltm_keys = s.ltm_ages = s.ltm_rf = s.cache_rows = s.cache_keys = s.cache_ages = None
        return s

    # Saving, loading and describing live in mplus.memory.state_file, which knows states only by their fields.
    def save(self, path, key: bytes | None = None) -> None:
        """Write this state to one safetensors file, signed with HMAC-SHA256 under `key` if given
        (see mplus.memory.state_file.save_state and docs/memory-files.md)."""
        save_state(self, path, key=key)

    @classmethod
    def load(cls, path, expect=None, key: bytes | None = None) -> "MemoryState":
        """A new state read from a file written by save; with `key`, only a file signed with that key loads
        (see mplus.memory.state_file.load_state for `expect`)."""
        return load_state(path, expect, key=key, build=cls)

    def describe(self, bins: int = 8) -> str:
        """A short text summary: sizes, dtype and per-layer age histograms (see mplus.memory.state_file.describe_state)."""
        return describe_state(self, bins)
