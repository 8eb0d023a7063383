"""Where fetched and converted artifacts live: $MPLUS_CACHE, else .cache/mplus in the current directory.

One rule for `mplus fetch` (which writes there), the Makefile (which sets MPLUS_CACHE to the clone's
.cache/mplus), the tests and the benchmarks (which read there). Set MPLUS_CACHE to use the artifacts from
another directory."""
from __future__ import annotations

import os
from pathlib import Path


CACHE_RULE = "$MPLUS_CACHE, else .cache/mplus in the current directory"


def cache_dir() -> Path:
    """The cache root (CACHE_RULE), absolute."""
    return Path(os.environ.get("MPLUS_CACHE") or Path.cwd() / ".cache" / "mplus").absolute()


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
    folder = Path(__file__).resolve().parents[3] / "checkpoints" / "tiny-mplus"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no tiny M+ at {folder}: it ships in the repository's checkpoints/ folder (run from a "
                                "clone, or train one with `make train-tiny`), or pass --model DIR / set MPLUS_TINY")
    return folder
