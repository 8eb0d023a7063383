"""int8 weight-only quantization for CPU decoding: a quarter of float32's bytes per token.

Every projection weight W [out, in] (q/k/v/o, gate/up/down and lm_head) is stored as int8 with one scale per
output row (symmetric, per channel): W ~ q * s[:, None] with s = max|W[row]| / 127 and q = round(W / s) in
[-127, 127]. Norms stay in the model's dtype; a tied embedding reads the rows of the quantized lm_head.

Decoding multiplies one activation row by each weight, so it is bound by the bytes read. torch's CPU kernel
_weight_int8pack_mm reads the int8 weight directly with bfloat16 activations (about 4x float32's decode
speed per weight here; its float32 and float16 paths are an order of magnitude slower); for many rows
(prefill) dequantizing the weight once and running the dense matmul is faster. Both give bfloat16-rounded
products of the same int8 values. Measured in bench/llama.py.

Loading reads the checkpoint's tensors one at a time and quantizes each into preallocated int8 storage, so
the float weights are never all in memory at once (peak: the int8 model plus one float tensor).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mplus.formats.hf_folder import load_state_into, read_tensors
from mplus.formats.safetensors import WeightsError

SMALL_BATCH = 32  # rows up to which the int8 kernel beats dequantize + dense matmul (576 x 3072, one thread)
SCALE_DTYPE = torch.bfloat16  # what the kernel multiplies by; s is rounded before q is computed from it
ROWS_AT_ONCE = 1 << 20  # weights quantized per block on loading: the float temporaries stay ~4 MB


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: (q [out, in] int8, s [out] bfloat16) with weight ~ q * s[:, None]."""
    w = weight.float()  # [out, in]
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)  # [out]
    q = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # [out, in]
    return q, scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (weight * scales[:, None])^T -> [..., out] in x's dtype; weight int8 [out, in], scales [out]."""
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    if rows.shape[0] <= SMALL_BATCH:
        out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), weight, scales)  # [N, out] bfloat16
    else:
        out = F.linear(rows.to(torch.bfloat16), weight.to(torch.bfloat16) * scales[:, None])  # [N, out]
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


class Int8Weight:
    """A fused int8 weight (q/k/v or gate/up stacked along out), called like F.linear(x, W). Not a module, so
    it adds nothing to state_dict(): the projections' own int8 buffers are views of it."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        self.weight, self.scales = weight, scales  # [out, in] int8, [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weight [out, in] and per-row scales [out] as buffers."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)


class Int8Embedding(nn.Module):
    """Token embeddings read from a quantized (tied) lm_head: row i is weight[i] * scales[i], in `dtype`."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = [head], dtype  # a list: the head stays lm_head's, not a second submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight[ids].to(self.dtype) * head.scales[ids, None].to(self.dtype)  # [B, T, d]


def _fused(linears: dict[str, nn.Linear], owner: nn.Module) -> Int8Weight:
    """Replace owner's named linears with Int8Linears whose buffers are row slices of one fused int8 weight."""
    n_in = next(iter(linears.values())).in_features
    fused = Int8Weight(torch.empty(sum(m.out_features for m in linears.values()), n_in, dtype=torch.int8),
                       torch.empty(sum(m.out_features for m in linears.values()), dtype=SCALE_DTYPE))
    start = 0
    for name, m in linears.items():
        rows = slice(start, start + m.out_features)
        setattr(owner, name, Int8Linear(fused.weight[rows], fused.scales[rows]))
        start += m.out_features
    return fused


def quantize_layout(model, dtype: torch.dtype) -> dict[str, Int8Linear]:
    """Give a Llama built on the meta device int8 storage for every projection and lm_head (q/k/v fused, and
    gate/up); dtype is that of the activations and of the norms. Returns checkpoint name -> the Int8Linear
    its float tensor is quantized into (a tied lm_head's source is model.embed_tokens.weight)."""
    targets = {}
    for l, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        a.qkv_weight = _fused({n: getattr(a, n) for n in ("q_proj", "k_proj", "v_proj")}, a)  # [(H + 2 H_kv) D, d]
        m.gate_up_weight = _fused({n: getattr(m, n) for n in ("gate_proj", "up_proj")}, m)  # [2 f, d]
        _fused({"o_proj": a.o_proj}, a), _fused({"down_proj": m.down_proj}, m)
        for owner, names in ((a, ("q_proj", "k_proj", "v_proj", "o_proj")), (m, ("gate_proj", "up_proj", "down_proj"))):
            prefix = f"model.layers.{l}.{'self_attn' if owner is a else 'mlp'}"
            targets.update({f"{prefix}.{n}.weight": getattr(owner, n) for n in names})
    _fused({"lm_head": model.lm_head}, model)
    if model.config.tie_word_embeddings:
        model.model.embed_tokens = Int8Embedding(model.lm_head, dtype)
        targets["model.embed_tokens.weight"] = model.lm_head
    else:
        targets["lm_head.weight"] = model.lm_head
    return targets


def load_quantized(model, folder: Path, targets: dict[str, Int8Linear], progress: bool = False) -> None:
    """Fill a Llama laid out by quantize_layout (targets: what it returned; the other parameters allocated)
    from a HF folder: the float tensors (norms, an untied embedding) as they are, then each projection read
    alone and quantized into its int8 storage."""
    int8_buffers = [f"{name.removesuffix('.weight')}.{b}" for name in [*targets, "lm_head.weight"]
                    for b in ("weight", "scales")]
    tied = model.config.tie_word_embeddings
    load_state_into(model, folder, optional=int8_buffers,
                    rename=lambda n: None if n in targets or (tied and n == "lm_head.weight") else n)
    with torch.no_grad():
        for name in tqdm(targets, desc="quantizing", disable=not progress):
            (weight,) = read_tensors(folder, [name]).values()
            target = targets[name]
            if weight.shape != target.weight.shape:
                raise WeightsError(f"tensor '{name}' has shape {tuple(weight.shape)}, the model expects "
                                   f"{tuple(target.weight.shape)}")
            for start in range(0, weight.shape[0], max(1, ROWS_AT_ONCE // weight.shape[1])):
                rows = slice(start, start + max(1, ROWS_AT_ONCE // weight.shape[1]))
                q, s = quantize(weight[rows])
                target.weight[rows].copy_(q), target.scales[rows].copy_(s)
