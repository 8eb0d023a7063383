"""Weight layout for fast CPU decoding: same values, different storage.

Decoding multiplies one activation row by every weight matrix, so its speed is the memory bandwidth the matmul
reaches. On a 2-core x86 machine with MKL, x @ W^T with W stored row-major [out, in] (the HF layout) runs as a
single-threaded gemv at ~7 GB/s, while the same product with W stored in-major ([in, out] contiguous, exposed
as a transposed view of shape [out, in]) runs multi-threaded at 11-16 GB/s when out is large. Packing q/k/v
into one matrix and gate/up into another also halves the number of small matmuls per layer. Measured in
bench/llama.py.

After packing, the HF parameters (q_proj.weight, ...) are views into the packed matrices, so names, shapes,
values, state_dict() and saving are unchanged; only the forward pass reads the packed tensors. Results equal
the unpacked model's up to float rounding (different summation order; checked to 1e-5).
"""
from __future__ import annotations

import torch
from torch import nn


def in_major_empty(out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [out, in] matrix stored with the input dimension outermost (a transposed view)."""
    return torch.empty(in_features, out_features, dtype=dtype, device="cpu").t()  # [out, in]


def _pack(linears: list[nn.Linear], dtype: torch.dtype) -> torch.Tensor:
    """One in-major matrix holding the linears' weights stacked along out; each weight becomes a view of it.

    Weights still on the meta device (a model being loaded) are not copied: the loader fills the views.
    """
    packed = in_major_empty(sum(m.weight.shape[0] for m in linears), linears[0].weight.shape[1], dtype)
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        view = packed[start:start + n]  # [n, in]
        if not m.weight.is_meta:
            view.copy_(m.weight.detach())  # slice by slice: no concatenated temporary
        m.weight = nn.Parameter(view, requires_grad=False)
        start += n
    return packed


def pack_for_inference(model, dtype: torch.dtype | None = None) -> None:
    """Repack a Llama in place for fast decoding (inference only: the parameters stop needing grads).

    Works on a loaded model, or on one built on the meta device (then dtype is required and only storage is
    allocated, for the loader to fill).
    """
    dtype = dtype or model.model.norm.weight.dtype
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv_weight = _pack([a.q_proj, a.k_proj, a.v_proj], dtype)  # [(H + 2 H_kv) D, d]
        m.gate_up_weight = _pack([m.gate_proj, m.up_proj], dtype)  # [2 f, d]
    if model.lm_head.weight.is_contiguous():  # not yet in-major
        _pack([model.lm_head], dtype)  # [V, d]
    if model.config.tie_word_embeddings:
        model.model.embed_tokens.weight = model.lm_head.weight


def materialize(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every parameter still on the meta device real, uninitialised CPU storage (ties preserved)."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="cpu"), requires_grad=False)
                setattr(module, name, done[id(p)])
