"""A config's declared sizes against the tensors a checkpoint actually holds, checked before anything is built.

A model's storage is allocated from its config, so a config.json declaring more than its files hold (hidden_size
10^9 beside a 64-wide embedding, 10^9 layers beside 3) would allocate, or loop, for what is not there. Every
tensor the config implies is looked up, by name, among the shapes read from the file headers (no data is read),
and compared dimension by dimension: a missing tensor or a mismatch is a SizeMismatchError naming the config
field, its declared value and the tensor's shape. The loaders check every shape again, exactly, once allocated.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

from mplus.llama.config import LlamaConfig
from mplus.llama.config_values import ConfigError
from mplus.formats.safetensors import WeightsError

Dim = tuple[int, str]  # a declared size and where it comes from, e.g. (64, "hidden_size = 64")
Expected = tuple[str, tuple[Dim, ...]]  # a tensor name and its declared shape
_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")


class SizeMismatchError(ConfigError, WeightsError):
    """The config and the checkpoint disagree on a size; either may be the one at fault."""


def header_shapes(index: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """name -> shape from weights.checkpoint_index; a LoRA-wrapped `<name>.base_layer.weight` is listed as
    `<name>.weight`, the plain Llama name of the same matrix."""
    return {name.replace(".base_layer.", "."): tuple(entry[1]["shape"]) for name, entry in index.items()}


def check_sizes(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], extra: Iterable[Expected] = ()) -> None:
    """Refuse a config whose sizes the checkpoint's tensor shapes do not bear out (see the module docstring);
    `extra` lists more tensors the config implies (an M+ checkpoint's, mplus.memory.sizes)."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if held != config.num_hidden_layers:
        raise SizeMismatchError(f"config field 'num_hidden_layers' is {config.num_hidden_layers}, but the "
                                f"checkpoint holds {held} layers")
    expected = [*_llama_tensors(config), *extra]
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


def dims(config: LlamaConfig) -> dict[str, Dim]:
    c = config
    return {"V": (c.vocab_size, f"field 'vocab_size' = {c.vocab_size}"),
            "d": (c.hidden_size, f"field 'hidden_size' = {c.hidden_size}"),
            "I": (c.intermediate_size, f"field 'intermediate_size' = {c.intermediate_size}"),
            "q": (c.num_attention_heads * c.head_dim,
                  f"fields num_attention_heads x head_dim = {c.num_attention_heads} x {c.head_dim}"),
            "kv": (c.num_key_value_heads * c.head_dim,
                   f"fields num_key_value_heads x head_dim = {c.num_key_value_heads} x {c.head_dim}")}


def projections(config: LlamaConfig) -> dict[str, tuple[str, Dim, Dim]]:
    """projection -> (parent module, out, in): the [out, in] weight of each linear layer of a decoder layer."""
    x = dims(config)
    return {"q_proj": ("self_attn", x["q"], x["d"]), "k_proj": ("self_attn", x["kv"], x["d"]),
            "v_proj": ("self_attn", x["kv"], x["d"]), "o_proj": ("self_attn", x["d"], x["q"]),
            "gate_proj": ("mlp", x["I"], x["d"]), "up_proj": ("mlp", x["I"], x["d"]),
            "down_proj": ("mlp", x["d"], x["I"])}


def _llama_tensors(config: LlamaConfig) -> Iterator[Expected]:
    x = dims(config)
    yield "model.embed_tokens.weight", (x["V"], x["d"])
    yield "model.norm.weight", (x["d"],)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (x["V"], x["d"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (x["d"],)
        yield prefix + "post_attention_layernorm.weight", (x["d"],)
        for proj, (parent, out, inp) in projections(config).items():
            yield f"{prefix}{parent}.{proj}.weight", (out, inp)
