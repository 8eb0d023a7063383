"""The Llama configuration: exactly the Hugging Face config.json fields this implementation uses.

Two generations of config.json are accepted:
  * Llama-3.1 style: top-level `rope_theta` plus `rope_scaling` ({"rope_type": "llama3", ...} or null);
  * transformers >= 5 style: `rope_parameters` holding `rope_theta`, `rope_type` and the scaling keys.
We always write the Llama-3.1 style, which every transformers version reads.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from mplus.llama.config_values import ConfigError, boolean, integer, number, read_json_object, show, string

ROPE_TYPES = ("default", "linear", "llama3")
# Ceilings far above any released Llama (Llama-3.1-405B: vocab 128256, hidden 16384, intermediate 53248,
# 126 layers, 128 heads of 128; Llama-4 contexts of 10M): a config past them is corrupt or hostile and is
# refused before anything is built. The checkpoint's tensors then bound the sizes for real (config_sizes.py).
MAX_SIZES = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 19, "num_hidden_layers": 1024,
             "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
             "max_position_embeddings": 1 << 24}


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a validated field of a frozen dataclass


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only
    source: str = dataclasses.field(default="rope_scaling", compare=False, repr=False)  # names fields in errors

    def __post_init__(self) -> None:
        string(f"{self.source}.rope_type", self.rope_type, ROPE_TYPES)
        if self.rope_type == "default":
            return
        _set(self, "factor", number(f"{self.source}.factor", self.factor, above=0))
        if self.rope_type == "llama3":
            low = number(f"{self.source}.low_freq_factor", self.low_freq_factor, above=0)
            high = number(f"{self.source}.high_freq_factor", self.high_freq_factor, above=0)
            if high <= low:  # the smooth blend divides by high - low
                raise ConfigError(f"config field '{self.source}.high_freq_factor' ({high}) must be larger than "
                                  f"low_freq_factor ({low})")
            _set(self, "low_freq_factor", low), _set(self, "high_freq_factor", high)
            integer(f"{self.source}.original_max_position_embeddings", self.original_max_position_embeddings,
                    1, MAX_SIZES["max_position_embeddings"])


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, ceiling in MAX_SIZES.items():
            integer(name, getattr(self, name), 1, ceiling)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        _set(self, "rms_norm_eps", number("rms_norm_eps", self.rms_norm_eps, above=0, below=1))
        _set(self, "rope_theta", number("rope_theta", self.rope_theta, above=0))
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling, got {show(self.rope_scaling)}")
        boolean("tie_word_embeddings", self.tie_word_embeddings)
        if self.bos_token_id is not None:
            integer("bos_token_id", self.bos_token_id, 0, self.vocab_size - 1)
        if not isinstance(self.eos_token_id, tuple):
            raise ConfigError(f"eos_token_id must be a tuple of token ids, got {show(self.eos_token_id)}")
        for eos in self.eos_token_id:
            integer("eos_token_id", eos, 0, self.vocab_size - 1)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ----------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "LlamaConfig":
        """The config of a parsed config.json; every value is type-checked, none is coerced (config_values.py).
        A field that HF allows to be null or absent takes HF's default (head_dim: hidden_size / heads)."""
        if not isinstance(raw, Mapping):
            raise ConfigError("a config.json must hold a JSON object")

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json is missing the required field '{key}'")
            return raw[key]

        def optional(key: str, default: Any) -> Any:
            return default if raw.get(key) is None else raw[key]

        string("hidden_act", optional("hidden_act", "silu"), ("silu",))  # SwiGLU only
        for flag in ("attention_bias", "mlp_bias"):
            if boolean(flag, optional(flag, False)):
                raise ConfigError(f"'{flag}: true' is not supported; Llama-3.1 has no biases")

        hidden = integer("hidden_size", need("hidden_size"), 1, MAX_SIZES["hidden_size"])
        heads = integer("num_attention_heads", need("num_attention_heads"), 1, MAX_SIZES["num_attention_heads"])
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError("config.json has no 'head_dim' and hidden_size is not divisible by num_attention_heads")
        theta, scaling = _read_rope(raw)
        eos = optional("eos_token_id", [])
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=optional("num_key_value_heads", heads),
            head_dim=optional("head_dim", hidden // heads),
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=optional("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face model folder")
        return cls.from_dict(read_json_object(path))

    # ----------------------------------------------------------------------------------------- writing

    def to_dict(self) -> dict[str, Any]:
        s = self.rope_scaling
        scaling: dict[str, Any] | None
        if s.rope_type == "default":
            scaling = None
        elif s.rope_type == "linear":
            scaling = {"rope_type": "linear", "factor": s.factor}
        else:
            scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                       "high_freq_factor": s.high_freq_factor,
                       "original_max_position_embeddings": s.original_max_position_embeddings}
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }


def _read_rope(raw: Mapping[str, Any]) -> tuple[Any, RopeScaling]:
    """(rope_theta, scaling) from either config generation; values are checked by the dataclasses."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("config field 'rope_parameters' must be an object with a 'rope_theta'")
        theta, scaling, source = params["rope_theta"], params, "rope_parameters"
    else:
        if raw.get("rope_theta") is None:
            raise ConfigError("config.json is missing the required field 'rope_theta' (or 'rope_parameters')")
        theta, scaling, source = raw["rope_theta"], raw.get("rope_scaling"), "rope_scaling"
    if scaling is None:
        return theta, RopeScaling("default")
    if not isinstance(scaling, dict):
        raise ConfigError(f"config field '{source}' must be an object or null, got {show(scaling)}")
    names = [scaling[k] for k in ("rope_type", "type") if k in scaling]  # older files say "type", some both
    if len(names) == 2 and names[0] != names[1]:
        raise ConfigError(f"config field '{source}' has rope_type {show(names[0])} but type {show(names[1])}")
    rope_type = names[0] if names else "default"
    string(f"{source}.rope_type", rope_type, ROPE_TYPES)
    if rope_type == "default":
        return theta, RopeScaling("default")

    def need(key: str) -> Any:
        if scaling.get(key) is None:
            raise ConfigError(f"rope scaling of type {rope_type!r} is missing the field '{source}.{key}'")
        return scaling[key]

    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=need("factor"), source=source)
    return theta, RopeScaling(
        "llama3", factor=need("factor"), low_freq_factor=need("low_freq_factor"),
        high_freq_factor=need("high_freq_factor"),
        original_max_position_embeddings=need("original_max_position_embeddings"), source=source)
