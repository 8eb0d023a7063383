"""Tiny random Llama models built directly with mplus (no transformers)."""
from __future__ import annotations

import torch

from mplus import Llama, LlamaConfig, RopeScaling


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32), max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2,))
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    model = Llama(tiny_config(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 if p.dim() > 1 else torch.rand(p.shape, generator=g) + 0.5)
    return model.eval().requires_grad_(False)
