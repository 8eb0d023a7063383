"""Where the artifacts and shipped models are: the cache root (formats/cache_dir.py's rule) and checkpoints/."""
from __future__ import annotations

import os
from pathlib import Path

from mplus.formats.cache_dir import CACHE_RULE, cache_dir

__all__ = ["CACHE_RULE", "cache_dir", "smollm2_dir", "llama31_tokenizer_path", "tiny_model_path", "shipped_model_path"]


def smollm2_dir() -> Path:
    """HF-layout folder of the converted SmolLM2-135M-Instruct (config.json, model.safetensors, tokenizer.json)."""
    return cache_dir() / "smollm2-135m-instruct"


def llama31_tokenizer_path() -> Path:
    """The rebuilt official Llama-3.1 tokenizer.json."""
    return cache_dir() / "llama-3.1-tokenizer" / "tokenizer.json"


def tiny_model_path() -> Path:
    """The tiny M+ the project trains and ships (checkpoints/tiny-mplus in the repository), or $MPLUS_TINY."""
    if os.environ.get("MPLUS_TINY"):
        return Path(os.environ["MPLUS_TINY"])
    return shipped_model_path("tiny-mplus", "make train-tiny")


def shipped_model_path(name: str, train: str) -> Path:
    """checkpoints/<name> in the repository: a model the project trains (with `train`) and ships."""
    folder = Path(__file__).resolve().parents[3] / "checkpoints" / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no {name} at {folder}: it ships in the repository's checkpoints/ folder (run from a "
                                f"clone, or train one with `{train}`), or pass --model DIR")
    return folder
