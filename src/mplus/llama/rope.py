"""Rotary position embeddings (RoPE) in the Hugging Face "rotate_half" layout, with Llama-3.1 scaling.

Pair i of a head is (x[i], x[i + D/2]); HF checkpoints are already permuted for this layout, so q_proj and
k_proj load as they are. Frequencies, angles, cos and sin are always fp32 (angles reach ~1e5 rad at long
positions); cos/sin are cast to the activation dtype only when applied, as transformers does.

Notation: B batch, H heads, T positions, D head_dim.
"""
from __future__ import annotations

import math

import torch

from mplus.llama.config import LlamaConfig, RopeScaling


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """f_i = theta^(-2i/D), computed in fp32 exactly as transformers does."""
    # device="cpu" even when the model is built under torch.device("meta"): these are computed, not loaded.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim  # [D/2]
    return 1.0 / (theta ** exponents)  # [D/2]


def llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama-3.1 band remap: high frequencies kept, low ones divided by `factor`, a linear blend between.

    Written with the same fp32 operations as transformers' `_compute_llama3_parameters`, so the result matches
    it bit for bit (the band edges decide branches, and rounding there would move a frequency across one).
    """
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)  # [D/2]


def inv_freq_for(config: LlamaConfig) -> torch.Tensor:
    """The static inverse frequencies [D/2] (fp32) of a config; never depends on sequence or cache length."""
    base = default_inv_freq(config.head_dim, config.rope_theta)
    s = config.rope_scaling
    if s.rope_type == "linear":
        return base / s.factor  # positions / factor, folded into the frequencies
    if s.rope_type == "llama3":
        return llama3_scale(base, s)
    return base


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] (fp32) for integer positions [T]; halves duplicated to match rotate_half."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] along the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [T, D]; the tables are cast to x's dtype first, as transformers does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin  # [B, H, T, D]
