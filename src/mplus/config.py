"""The Llama configuration: exactly the Hugging Face config.json fields this implementation uses.

Two generations of config.json are accepted:
  * Llama-3.1 style: top-level `rope_theta` plus `rope_scaling` ({"rope_type": "llama3", ...} or null);
  * transformers >= 5 style: `rope_parameters` holding `rope_theta`, `rope_type` and the scaling keys.
We always write the Llama-3.1 style, which every transformers version reads.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config.json that is missing a field or asks for something this implementation does not do."""


ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ----------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "LlamaConfig":
        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"config.json is missing the required field '{key}'")
            return raw[key]

        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"'{flag}: true' is not supported; Llama-3.1 has no biases")

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = raw.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
        if head_dim is None:
            raise ConfigError("config.json has no 'head_dim' and hidden_size is not divisible by num_attention_heads")
        theta, scaling = _read_rope(raw)
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

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


def _read_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either config generation."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("config field 'rope_parameters' must be an object with a 'rope_theta'")
        theta, scaling = params["rope_theta"], params
    else:
        if "rope_theta" not in raw:
            raise ConfigError("config.json is missing the required field 'rope_theta' (or 'rope_parameters')")
        theta, scaling = raw["rope_theta"], raw.get("rope_scaling")
    if scaling is None:
        return float(theta), RopeScaling("default")
    if not isinstance(scaling, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), RopeScaling("default")

    def need(key: str) -> Any:
        if key not in scaling:
            raise ConfigError(f"rope scaling of type {rope_type!r} is missing the field '{key}'")
        return scaling[key]

    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor=float(need("factor")))
    return float(theta), RopeScaling(
        "llama3", factor=float(need("factor")), low_freq_factor=float(need("low_freq_factor")),
        high_freq_factor=float(need("high_freq_factor")),
        original_max_position_embeddings=int(need("original_max_position_embeddings")))
