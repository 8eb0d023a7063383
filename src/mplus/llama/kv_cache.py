"""A preallocated key/value cache for incremental decoding.

Keys are stored already rotated (RoPE applied at their own positions), so a later query needs only its own
rotation. Attention reads the filled part only, which on a CPU is less work than masking a full buffer.

Notation: L layers, B batch, H_kv key/value heads, S_max capacity, D head_dim.
"""
from __future__ import annotations

import torch

from mplus.llama.config import LlamaConfig


class KVCache:
    """Keys and values of every layer, [L, B, H_kv, S_max, D] each, valid up to `length`.

    One forward writes the same number of new positions n into every layer, at length..length+n-1; the
    model then calls advance(n). Until then each layer sees its own new entries plus everything before.
    """

    def __init__(self, config: LlamaConfig, max_length: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if not (isinstance(max_length, int) and max_length >= 1 and isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"max_length and batch_size must be whole numbers >= 1, got {max_length!r} and {batch_size!r}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, B, H_kv, S_max, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)  # [L, B, H_kv, S_max, D]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, n, D] after the valid part; return all keys/values [B, H_kv, length + n, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache is full: {end} positions needed, capacity {self.capacity}; "
                             "create the cache with a larger max_length")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
