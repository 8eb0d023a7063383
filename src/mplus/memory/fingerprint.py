"""A fingerprint of a model's weights, so that a memory written by one model is not loaded into another.

Two models of the same shape (a base and its fine-tune, two training runs) accept each other's memory states
without complaint, and the result is quietly wrong: the rows were written by other weights. A state file records
the fingerprint of the weights that wrote it (docs/memory-files.md), and a load into different weights is refused.

The fingerprint is a sha256 over every parameter's name and the sha256 of its shape and values rounded to bfloat16,
so a model loaded in float32 and the same weights loaded in bfloat16 share it; the parameters are hashed in
parallel threads. It is computed once and cached on the model; the cache
is keyed on each parameter's storage and version counter, so an optimizer step or a load invalidates it.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

CACHE_ATTR = "_mplus_weights_fingerprint"  # (key, digest) kept on the model


def weights_key(model: torch.nn.Module) -> tuple:
    """Cheap identity of the model's current weights: each parameter's name, storage, version counter, dtype and
    device. An optimizer step, a load or an in-place edit changes it; values derived from the weights (this
    fingerprint, the cached STM keys/values of mplus.memory.prefix) are valid while it stays the same."""
    # Inference tensors (a model built under torch.inference_mode) keep no version counter: only their storage counts.
    return tuple((name, p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.device)
                 for name, p in model.named_parameters())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """The sha256 hex digest of the model's parameters (see the module docstring); cached until they change."""
    params = list(model.named_parameters())
    key = weights_key(model)
    cached = getattr(model, CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib and torch release the GIL
        parts = list(pool.map(_digest, (p for _, p in params)))
    h = hashlib.sha256(b"mplus-weights-v1")
    for name, part in zip((name for name, _ in params), parts):  # in parameter order, so threads do not matter
        h.update(f"\n{name} {part}".encode())
    digest = h.hexdigest()
    object.__setattr__(model, CACHE_ATTR, (key, digest))  # a plain attribute, not a module, parameter or buffer
    return digest


def _digest(p: torch.Tensor) -> str:
    """sha256 of one parameter: its shape and its values rounded to bfloat16 (2 bytes each)."""
    with torch.no_grad():
        values = p.detach().to(torch.bfloat16).cpu().contiguous().reshape(-1)  # [numel]
    h = hashlib.sha256(f"{list(p.shape)}\n".encode())
    h.update(values.view(torch.uint8).numpy())
    return h.hexdigest()
