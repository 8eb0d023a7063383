"""The Llama-3.1 decoder block: RMSNorm, GQA attention with an optional key/value-only prefix, SwiGLU MLP.

Module and parameter names are Hugging Face's (self_attn.q_proj, mlp.gate_proj, input_layernorm, ...), so a
HF state dict loads by identity.

Notation: B batch, T queries (the input positions), S keys (prefix + cached + input), P prefix length,
d hidden_size, H query heads, H_kv key/value heads, D head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mplus.llama.config import LlamaConfig
from mplus.llama.rope import apply_rope


def project(linear: nn.Module, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """linear(x), through the named LoRA adapter when `linear` carries adapters (see lora.py)."""
    return linear(x) if adapter is None else linear(x, adapter)


def fused_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight^T for a packed weight: a float tensor, or an int8 one (quant.Int8Weight, callable)."""
    return F.linear(x, weight) if isinstance(weight, torch.Tensor) else weight(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)); statistics in fp32, cast back to x's dtype *before* the weight multiply (HF, Meta)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def causal_mask(n_queries: int, n_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask [T, S] (True = may attend): query t sees key j iff j <= (S - T) + t.

    The S - T leading keys (a memory prefix, or the cache) are visible to every query. SDPA's is_causal is
    top-left aligned, which is only the same thing when T == S.
    """
    ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=n_keys - n_queries)  # [T, S]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention: q [B, H, T, D] over k, v [B, H_kv, S, D] -> [B, H, T, D].

    Query head h reads key/value head h // (H / H_kv) (repeat_interleave order), which is what SDPA's
    enable_gqa does, without materialising the repeated keys.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q == 1:  # one query at the end of the sequence sees every key: no mask
        return decode_attend(q, k, v)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = causal_mask(n_q, n_k, q.device)  # [T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head, q [B, H, 1, D] over k, v [B, H_kv, S, D] -> [B, H, 1, D].

    The query heads of a group share one matmul against their key/value head. For a single query this reads
    the keys and values once at full bandwidth, about twice as fast here as SDPA's CPU kernel with
    enable_gqa over a cache slice (measured at S = 8800, H = 8, H_kv = 2). Softmax in fp32.
    """
    B, H, _, D = q.shape
    H_kv = k.shape[1]
    qg = q.reshape(B, H_kv, H // H_kv, D)  # [B, H_kv, G, D]: the G query heads of each key/value head
    scores = (qg @ k.transpose(-1, -2)) * D ** -0.5  # [B, H_kv, G, S]
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs @ v).reshape(B, H, 1, D)  # [B, H, 1, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = nn.Linear(d, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, d, bias=False)
        # Set by packing.pack_for_inference (or quant.quantize_layout): q/k/v weights as one matrix, of which
        # q/k/v_proj.weight are views.
        self.qkv_weight = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # [B, n, T, D]

    def project_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   adapter: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B, H_kv, S, D] of normalised hidden states h [B, S, d] at cos/sin [S, D]."""
        k = apply_rope(self._heads(project(self.k_proj, h, adapter), self.n_kv_heads), cos, sin)  # [B, H_kv, S, D]
        v = self._heads(project(self.v_proj, h, adapter), self.n_kv_heads)  # [B, H_kv, S, D]
        return k, v

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache=None, layer: int = 0, last_only: bool = False, adapter: str | None = None) -> torch.Tensor:
        """h [B, T, d] normalised input; prefix_kv: keys/values [B, H_kv, P, D] placed before the input.

        last_only: every position still writes its keys/values, but only the last one queries ([B, 1, d] out).
        adapter: the LoRA adapter of q/k/v (o_proj never has one).
        """
        B, T, _ = h.shape
        if self.qkv_weight is None:
            q, k, v = (project(m, h, adapter) for m in (self.q_proj, self.k_proj, self.v_proj))  # [B, T, H D], [B, T, H_kv D] x 2
        else:
            kv_dim = self.n_kv_heads * self.head_dim
            q, k, v = fused_linear(h, self.qkv_weight).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(self._heads(q, self.n_heads), cos, sin)  # [B, H, T, D]
        k = apply_rope(self._heads(k, self.n_kv_heads), cos, sin)  # [B, H_kv, T, D]
        v = self._heads(v, self.n_kv_heads)  # [B, H_kv, T, D]
        if last_only:
            q, T = q[:, :, -1:], 1  # [B, H, 1, D]
        if prefix_kv is not None:
            k = torch.cat((prefix_kv[0], k), dim=2)  # [B, H_kv, P + T, D]
            v = torch.cat((prefix_kv[1], v), dim=2)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, H_kv, S, D], everything cached so far plus the new keys
        out = attend(q, k, v)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # [B, T, d]


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        # Set by packing.pack_for_inference (or quant.quantize_layout): gate/up weights as one matrix, of which
        # gate/up_proj.weight are views.
        self.gate_up_weight = None

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        if self.gate_up_weight is None:
            gate, up = project(self.gate_proj, x, adapter), project(self.up_proj, x, adapter)  # [B, T, f] each
        else:
            gate, up = fused_linear(x, self.gate_up_weight).chunk(2, dim=-1)  # [B, T, f] each
        if torch.is_grad_enabled():
            hidden = F.silu(gate) * up  # [B, T, f]
        else:  # inference: reuse gate's buffer instead of allocating two more [B, T, f] tensors
            hidden = F.silu(gate, inplace=True).mul_(up)
        return project(self.down_proj, hidden, adapter)  # [B, T, d]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def prefix_kv(self, prefix: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  adapter: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [B, H_kv, P, D] of prefix hidden states [B, P, d]: normalised like inputs, never queried.

        A prefix's keys and values depend only on the prefix, its positions and the weights, so a caller may
        compute them once and pass them to forward(prefix_kv=...) again and again.
        """
        return self.self_attn.project_kv(self.input_layernorm(prefix), cos, sin, adapter)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache=None, layer: int = 0, last_only: bool = False, adapter: str | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d], or [B, 1, d] for the last position only (its keys/values all cached)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, prefix_kv=prefix_kv, cache=cache, layer=layer,
                           last_only=last_only, adapter=adapter)
        x = (x[:, -1:] if last_only else x) + h  # [B, T or 1, d]
        return x + self.mlp(self.post_attention_layernorm(x), adapter)  # [B, T, d]
