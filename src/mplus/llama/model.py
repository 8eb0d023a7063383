"""Llama-3.1 causal language model, hand-written in PyTorch with Hugging Face parameter names.

    logits = lm_head(norm(layers(embed_tokens[input_ids])))

Every layer may take a prefix of hidden states that contributes keys and values only (never queried), at
positions the caller chooses: the hook that MemoryLLM and M+ use to put memory in front of the input.

Notation: B batch, T input positions, P prefix length, L layers, d hidden_size, V vocab_size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mplus.llama.config import LlamaConfig
from mplus.llama.kv_cache import KVCache
from mplus.llama.layers import DecoderLayer, RMSNorm
from mplus.llama.rope import inv_freq_for, rope_cos_sin

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [B, H_kv, S, D]


class Decoder(nn.Module):
    """The HF `model.` part: embeddings, layers and the final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        # nn.Embedding's own init calls normal_, which on the meta device imports torch._dynamo (~1.6 s and
        # ~75 MB of RSS); a checkpoint is about to overwrite it anyway, so initialise only real tensors.
        weight = torch.empty(config.vocab_size, config.hidden_size)  # [V, d]
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                   prefix: Callable[[int, torch.Tensor], KV | None] | None = None,
                   layer_input: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                   on_output: Callable[[int, torch.Tensor], None] | None = None,
                   cache: KVCache | None = None, adapter: str | None = None, last_only: bool = False) -> torch.Tensor:
        """Hidden states x [B, T, d] at cos/sin [T, D] through every layer: [B, T, d] ([B, 1, d] with last_only).

        The one layer loop of the package: Llama, M+ reading, M+ writing, decoding and training all run it.
        prefix(l, x): layer l's key/value-only prefix (keys, values [B, H_kv, P, D]) or None, given the layer's
            input x; M+ retrieves with x, so layer l's prefix exists only once layer l - 1 has run.
        layer_input(l, x): what layer l reads, given the previous layer's output (the M+ write pass puts memory
            rows before the chunk); by default that output itself.
        on_output(l, out): sees every layer's output (records; the new memory rows of the write pass).
        cache: every layer appends its prefix and input keys/values; the cache is advanced past them at the end.
        adapter: the LoRA adapter of every projection (M+ read or write); None for a plain Llama.
        last_only: the last layer queries with the last position only (every position still fills the cache).
        """
        last, written = len(self.layers) - 1, 0
        for l, layer in enumerate(self.layers):
            if layer_input is not None:
                x = layer_input(l, x)  # [B, T', d]
            prefix_kv = None if prefix is None else prefix(l, x)  # [B, H_kv, P, D] each, or None
            written = x.shape[1] + (0 if prefix_kv is None else prefix_kv[0].shape[2])
            x = layer(x, cos, sin, prefix_kv=prefix_kv, cache=cache, layer=l, adapter=adapter,
                      last_only=last_only and l == last)  # [B, T', d]; [B, 1, d] after a last_only last layer
            if on_output is not None:
                on_output(l, x)
        if cache is not None:
            cache.advance(written)
        return x


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Derived from the config, not a weight. A plain fp32 CPU tensor rather than a buffer, so that
        # model.to(torch.bfloat16) cannot round it (the official M+ code does that; see rope.py).
        self.inv_freq = inv_freq_for(config)  # [D/2]

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
                        packed: bool = True, quantize: str | None = None) -> "Llama":
        """Load a HF-layout folder (config.json + model.safetensors or a sharded index) for inference.

        packed: lay the weights out for fast CPU decoding (see packing.py); False keeps plain row-major weights.
        quantize="int8": int8 weight-only projections and lm_head, one scale per output channel (see quant.py);
        dtype is then that of the activations, norms and cache (bfloat16 suits the int8 kernel best).
        """
        from mplus.llama.checkpoint import load_model
        return load_model(cls, path, dtype=dtype, progress=progress, packed=packed, quantize=quantize)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        from mplus.llama.checkpoint import save_model
        save_model(self, path, max_shard_bytes=max_shard_bytes)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def new_cache(self, max_length: int, batch_size: int = 1) -> KVCache:
        return KVCache(self.config, max_length, batch_size=batch_size, dtype=self.dtype,
                       device=self.model.norm.weight.device)

    # ----------------------------------------------------------------------------------------- forward

    def check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer torch.Tensor of shape [batch, length]")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for this model's vocabulary of "
                             f"{self.config.vocab_size}; was the text encoded with another model's tokenizer?")

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None,
                prefix: Sequence[torch.Tensor] | torch.Tensor | None = None,
                prefix_positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (fp32) for input_ids [B, T]; [B, 1, V] with last_only.

        positions [T]: absolute positions of the inputs; by default they follow the cache (or the prefix).
        prefix: per-layer hidden states, prefix[l] of shape [B, P, d], seen by layer l as keys/values only.
        prefix_positions [P]: their positions; by default the P positions just before the inputs.
        With a cache, the prefix keys/values are cached too, so later calls see them without passing them again.
        """
        self.check_ids(input_ids)
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        P = 0 if prefix is None else prefix[0].shape[1]
        if positions is None:
            positions = torch.arange(start + P, start + P + T)  # [T]
        inv_freq = self.inv_freq.to(input_ids.device)  # [D/2]
        cos, sin = rope_cos_sin(inv_freq, positions.to(input_ids.device))  # [T, D] each
        if prefix is not None:
            if len(prefix) != self.config.num_hidden_layers:
                raise ValueError(f"prefix must hold one tensor per layer ({self.config.num_hidden_layers}), got {len(prefix)}")
            if prefix_positions is None:
                prefix_positions = torch.arange(start, start + P)  # [P]
            p_cos, p_sin = rope_cos_sin(inv_freq, prefix_positions.to(input_ids.device))  # [P, D] each

        layers = self.model.layers
        x = self.model.run_layers(self.model.embed_tokens(input_ids), cos, sin, cache=cache, last_only=last_only,
                                  prefix=None if prefix is None else
                                  lambda l, _: layers[l].prefix_kv(prefix[l], p_cos, p_sin))  # [B, T or 1, d]
        return self.lm_head(self.model.norm(x)).float()  # [B, T or 1, V]

    # ----------------------------------------------------------------------------------------- generation

    def generate(self, prompt_ids, **kwargs) -> list[int]:
        """Generate after prompt_ids (a list of ids or a [T] / [1, T] tensor); see mplus.llama.generate.generate."""
        from mplus.llama.generate import generate
        return generate(self, prompt_ids, **kwargs)
