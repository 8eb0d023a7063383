"""M+ checkpoints that ship only what training added, and name the frozen base they were trained on.

A memory trained around a frozen base (train/stage1.py: base weights never change) differs from it only in
the adapters, the retriever, the two learned embeddings and the memory. Such a folder holds those tensors and,
in config.json, the base it needs:

    "mplus_base": {"name": "smollm2-135m-instruct", "sha256": "<sha256 of the base's model.safetensors>"}

Loading finds the base folder by name under the cache root ($MPLUS_CACHE, else .cache/mplus: where
`mplus fetch` puts it), or takes it from the caller, and refuses a base whose model.safetensors hash differs:
the adapters are only meaningful on the exact weights they were trained with. The model layer never downloads;
the CLI fetches a missing base before loading (apps/paths.load_memory_model).

Shipped tensors are stored in bf16 to halve the folder (the integer-valued LTM ages stay fp32) and come back in
the load dtype; the accuracy a shipped folder is credited with is measured on the folder itself.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from mplus.formats.cache_dir import cache_dir
from mplus.llama.config import ConfigError

BASE_KEY = "mplus_base"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")  # a plain folder name: never a path out of the cache


class BaseMismatchError(ConfigError):
    """The base named by a checkpoint is missing, or is not the exact file it was trained on."""


def is_base_weight(name: str) -> bool:
    """Whether a model tensor comes unchanged from the base (everything but adapters, retriever, embeddings)."""
    fresh = (".lora_" in name or "_proj.0." in name or "_proj.2." in name
             or name in ("bos_embedding", "new_memory_positional_emb"))
    return not fresh


def base_name(name: str) -> str:
    """The base checkpoint's name for a wrapped projection's frozen weight (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def reference(raw: dict) -> dict | None:
    """The config's base reference, checked: {"name", "sha256"}, or None for a self-contained checkpoint."""
    ref = raw.get(BASE_KEY)
    if ref is None:
        return None
    if not (isinstance(ref, dict) and set(ref) == {"name", "sha256"} and isinstance(ref["name"], str)
            and NAME.fullmatch(ref["name"]) and isinstance(ref["sha256"], str)
            and re.fullmatch(r"[0-9a-f]{64}", ref["sha256"])):
        raise ConfigError(f"config field '{BASE_KEY}' must be {{\"name\": a plain folder name, \"sha256\": 64 hex "
                          f"digits}}; fix it or use an intact copy of the checkpoint")
    return ref


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def base_folder(ref: dict, base: str | Path | None = None) -> Path:
    """The folder of the base named by ref (the given one, else <cache root>/<name>), its weights' hash checked."""
    folder = Path(base) if base is not None else cache_dir() / ref["name"]
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise BaseMismatchError(f"this M+ needs its base '{ref['name']}' at {folder} (no model.safetensors there); "
                                "run `mplus fetch`, or pass the base folder")
    found = file_sha256(weights)
    if found != ref["sha256"]:
        raise BaseMismatchError(f"{weights} has sha256 {found[:12]}..., but this M+ was trained on "
                                f"{ref['sha256'][:12]}...: its adapters fit no other weights; fetch the exact base "
                                "again (`mplus fetch`)")
    return folder


def shipped_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a base-referencing folder stores (the caller has left out the base's), floating ones in bf16
    (LTM ages and recall frequencies, small and integer-valued, stay fp32)."""
    out = {}
    for name, t in tensors.items():
        keep = not t.is_floating_point() or name.startswith(("ltm_ages.", "ltm_recall_frequencies."))
        out[name] = t if keep else t.to(torch.bfloat16)
    return out
