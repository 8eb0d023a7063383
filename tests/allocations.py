"""Counting the tensors PyTorch allocates, op by op, to check a code path's memory use on small shapes.

Every aten op's outputs are looked at: an output whose storage is none of the op's inputs' (in-place results,
views and `out=` arguments excluded) is a new allocation, recorded with its dtype and byte size. Deterministic:
it counts what the code asks for, not what the allocator or the operating system does with it.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Allocations(TorchDispatchMode):
    """with Allocations() as a: ...; then a.records is [(op name, dtype, bytes)] of every new tensor."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() \
                    and t.untyped_storage().data_ptr() not in given:
                self.records.append((str(func), t.dtype, t.untyped_storage().nbytes()))
        return out

    def largest(self, dtype: torch.dtype | None = None) -> int:
        """The largest single allocation in bytes (of one dtype if given), 0 if none."""
        return max((n for _, t, n in self.records if dtype is None or t == dtype), default=0)
