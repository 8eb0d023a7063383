"""The memory fields of an M+ or MemoryLLM config.json (official names), next to the Llama fields.

Sizes, with K = num_tokens:
  N  = (num_blocks - num_ltm_blocks) * K   short-term memory rows per layer (M+ redefines num_blocks so)
  K0 = num_ltm_blocks * K                  long-term rows retrieved per layer (0 for MemoryLLM)
  P  = 1 + num_blocks * K                  virtual prefix length: inputs start at this position
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .config import ConfigError

LORA_TARGETS = ("q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    kind: str  # "mplus" or "memoryllm"
    num_tokens: int  # K: rows written per update per layer
    num_blocks: int  # total virtual blocks, STM plus retrieved LTM
    num_ltm_blocks: int = 0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    selector_hidden_dim: int = 256  # d_s
    num_selector_layers: int = 2
    add_encoder_retriever: bool = True
    update_ltm_frequency: int = 60  # merge the cache every this many updates
    decay_frequency: float = 1.0
    initial_rf_when_moving_stm_to_ltm: float = 10.0
    drop_memory_per_layer: bool = True  # MemoryLLM: one permutation per layer (True) or one for all; M+: always True

    def __post_init__(self):
        if self.kind == "mplus" and not self.drop_memory_per_layer:
            raise ConfigError("M+ always drops its STM rows with one permutation per layer (so does the official "
                              "code, whatever the flag says); drop_memory_per_layer=False is for MemoryLLM only")

    @property
    def stm_size(self) -> int:
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def ltm_retrieved(self) -> int:
        return self.num_ltm_blocks * self.num_tokens

    @property
    def virtual_prefix(self) -> int:
        return 1 + self.num_blocks * self.num_tokens

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "MemoryConfig":
        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json is missing the memory field '{key}' (is this an M+ or MemoryLLM checkpoint?)")
            return raw[key]

        if raw.get("add_bos_embedding") is False:
            raise ConfigError("add_bos_embedding false is not supported: both released models use it")
        mplus = bool(raw.get("add_selector")) or "num_ltm_blocks" in raw
        lora = raw.get("lora_config") or {}
        fields = dict(kind="mplus" if mplus else "memoryllm", num_tokens=int(need("num_tokens")),
                      num_blocks=int(need("num_blocks")),
                      lora_r=int(lora.get("r", 16)), lora_alpha=float(lora.get("lora_alpha", 32)),
                      lora_targets=tuple(lora.get("target_modules", LORA_TARGETS)),
                      drop_memory_per_layer=bool(raw.get("drop_memory_per_layer", True)))
        if mplus:
            if raw.get("update_ltm_mode", "immediate") != "immediate":
                raise ConfigError(f"update_ltm_mode {raw['update_ltm_mode']!r} is not supported; only 'immediate' runs in the official code")
            if raw.get("map_from_hidden_states") is False:
                raise ConfigError("map_from_hidden_states false is not supported (the official training rejects it too)")
            fields.update(drop_memory_per_layer=True,  # stored in M+ configs, never read by the official code
                          num_ltm_blocks=int(need("num_ltm_blocks")),
                          selector_hidden_dim=int(need("selector_hidden_dim")),
                          num_selector_layers=int(raw.get("num_selector_layers", 2)),
                          add_encoder_retriever=bool(raw.get("add_encoder_retriever", True)),
                          update_ltm_frequency=int(raw.get("update_ltm_frequency", raw["num_blocks"])),
                          decay_frequency=float(raw.get("decay_frequency", 1)),
                          initial_rf_when_moving_stm_to_ltm=float(raw.get("initial_rf_when_moving_stm_to_ltm", 10)))
        config = cls(**fields)
        if config.stm_size <= config.num_tokens:
            raise ConfigError(f"the short-term memory ({config.stm_size} rows) must be larger than one block ({config.num_tokens})")
        if config.num_selector_layers not in (1, 2):
            raise ConfigError(f"num_selector_layers must be 1 or 2, got {config.num_selector_layers}")
        return config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_tokens": self.num_tokens, "num_blocks": self.num_blocks, "add_bos_embedding": True,
            "add_decoder_lora": True, "drop_memory_per_layer": self.drop_memory_per_layer,
            "lora_config": {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": 0.1,
                            "inference_mode": False, "target_modules": list(self.lora_targets)},
        }
        if self.kind == "mplus":
            out.update(num_ltm_blocks=self.num_ltm_blocks, add_selector=True, selector_hidden_dim=self.selector_hidden_dim,
                       num_selector_layers=self.num_selector_layers, add_encoder_retriever=self.add_encoder_retriever,
                       map_from_hidden_states=True, detach_hidden_state=True, update_ltm_mode="immediate",
                       update_ltm_frequency=self.update_ltm_frequency, decay_frequency=self.decay_frequency,
                       initial_rf_when_moving_stm_to_ltm=self.initial_rf_when_moving_stm_to_ltm)
        return out
