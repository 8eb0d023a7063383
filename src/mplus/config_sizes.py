"""A config's declared sizes against the tensors a checkpoint actually holds, checked before anything is built.

A model's storage is allocated from its config, so a config.json declaring more than its files hold (hidden_size
10^9 beside a 64-wide embedding, 10^9 layers beside 3) would allocate, or loop, for what is not there. Every
tensor the config implies is looked up, by name, among the shapes read from the file headers (no data is read),
and compared dimension by dimension: a missing tensor or a mismatch is a SizeMismatchError naming the config
field, its declared value and the tensor's shape. The loaders check every shape again, exactly, once allocated.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping

from .config import LlamaConfig
from .config_values import ConfigError
from .memory_config import MemoryConfig
from .weights import WeightsError

Dim = tuple[int, str]  # a declared size and where it comes from, e.g. (64, "hidden_size = 64")
Expected = tuple[str, tuple[Dim, ...]]  # a tensor name and its declared shape
_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")
_ADAPTERS = ("default", "decoder_adapter")  # lora.WRITE, lora.READ


class SizeMismatchError(ConfigError, WeightsError):
    """The config and the checkpoint disagree on a size; either may be the one at fault."""


def header_shapes(index: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """name -> shape from weights.checkpoint_index; a LoRA-wrapped `<name>.base_layer.weight` is listed as
    `<name>.weight`, the plain Llama name of the same matrix."""
    return {name.replace(".base_layer.", "."): tuple(entry[1]["shape"]) for name, entry in index.items()}


def check_sizes(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], memory: MemoryConfig | None = None) -> None:
    """Refuse a config whose sizes the checkpoint's tensor shapes do not bear out (see the module docstring)."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if held != config.num_hidden_layers:
        raise SizeMismatchError(f"config field 'num_hidden_layers' is {config.num_hidden_layers}, but the "
                                f"checkpoint holds {held} layers")
    expected = list(_llama_tensors(config))
    if memory is not None:
        expected += _memory_tensors(config, memory)
    missing = [f"{name} {tuple(size for size, _ in dims)}" for name, dims in expected if name not in shapes]
    if missing:
        raise SizeMismatchError(f"the checkpoint does not hold what its config describes: missing tensors: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, dims in expected:
        shape, declared = shapes[name], tuple(size for size, _ in dims)
        if len(shape) != len(dims):
            raise SizeMismatchError(f"tensor '{name}' has shape {shape}, the config implies {declared}")
        for (size, origin), held_size in zip(dims, shape):
            if size != held_size:
                raise SizeMismatchError(f"config {origin} does not match the checkpoint: tensor '{name}' has shape "
                                        f"{shape}, the config implies {declared}")


def _dims(config: LlamaConfig) -> dict[str, Dim]:
    c = config
    return {"V": (c.vocab_size, f"field 'vocab_size' = {c.vocab_size}"),
            "d": (c.hidden_size, f"field 'hidden_size' = {c.hidden_size}"),
            "I": (c.intermediate_size, f"field 'intermediate_size' = {c.intermediate_size}"),
            "q": (c.num_attention_heads * c.head_dim,
                  f"fields num_attention_heads x head_dim = {c.num_attention_heads} x {c.head_dim}"),
            "kv": (c.num_key_value_heads * c.head_dim,
                   f"fields num_key_value_heads x head_dim = {c.num_key_value_heads} x {c.head_dim}")}


def _projections(config: LlamaConfig) -> dict[str, tuple[str, Dim, Dim]]:
    """projection -> (parent module, out, in): the [out, in] weight of each linear layer of a decoder layer."""
    x = _dims(config)
    return {"q_proj": ("self_attn", x["q"], x["d"]), "k_proj": ("self_attn", x["kv"], x["d"]),
            "v_proj": ("self_attn", x["kv"], x["d"]), "o_proj": ("self_attn", x["d"], x["q"]),
            "gate_proj": ("mlp", x["I"], x["d"]), "up_proj": ("mlp", x["I"], x["d"]),
            "down_proj": ("mlp", x["d"], x["I"])}


def _llama_tensors(config: LlamaConfig) -> Iterator[Expected]:
    x = _dims(config)
    yield "model.embed_tokens.weight", (x["V"], x["d"])
    yield "model.norm.weight", (x["d"],)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (x["V"], x["d"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (x["d"],)
        yield prefix + "post_attention_layernorm.weight", (x["d"],)
        for proj, (parent, out, inp) in _projections(config).items():
            yield f"{prefix}{parent}.{proj}.weight", (out, inp)


def _memory_tensors(config: LlamaConfig, memory: MemoryConfig) -> Iterator[Expected]:
    """The tensors of an official M+ / MemoryLLM checkpoint that the memory fields size (arXiv 2502.00592 sec. 3)."""
    d, m = _dims(config)["d"], memory
    n_layers = (config.num_hidden_layers, f"field 'num_hidden_layers' = {config.num_hidden_layers}")
    rows = (m.stm_size, f"fields (num_blocks - num_ltm_blocks) x num_tokens = "
                        f"({m.num_blocks} - {m.num_ltm_blocks}) x {m.num_tokens}")
    one = (1, "layout (a fixed 1)")
    r = (m.lora_r, f"field 'lora_config.r' = {m.lora_r}")
    d_s = (m.selector_hidden_dim, f"field 'selector_hidden_dim' = {m.selector_hidden_dim}")
    hidden_s = (2 * m.selector_hidden_dim, f"2 x selector_hidden_dim = 2 x {m.selector_hidden_dim}")
    yield "memory", (n_layers, rows, d)
    yield "bos_embedding", (n_layers, one, d)
    yield "new_memory_positional_emb", (one, one, d)
    projections = _projections(config)
    retrievers = ("query_proj", "key_proj") + (("encoder_query_proj",) if m.add_encoder_retriever else ())
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for proj in m.lora_targets:
            parent, out, inp = projections[proj]
            for adapter in _ADAPTERS:
                yield f"{prefix}{parent}.{proj}.lora_A.{adapter}.weight", (r, inp)
                yield f"{prefix}{parent}.{proj}.lora_B.{adapter}.weight", (out, r)
        if m.kind != "mplus":
            continue
        for proj in retrievers:  # retriever.projector: Linear(d, 2 d_s), SiLU, Linear(2 d_s, d_s); or Linear(d, d_s)
            if m.num_selector_layers == 2:
                yield f"{prefix}self_attn.{proj}.0.weight", (hidden_s, d)
                yield f"{prefix}self_attn.{proj}.2.weight", (d_s, hidden_s)
            else:
                yield f"{prefix}self_attn.{proj}.0.weight", (d_s, d)
