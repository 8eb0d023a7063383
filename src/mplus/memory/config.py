"""The memory fields of an M+ or MemoryLLM config.json (official names), next to the Llama fields.

Sizes, with K = num_tokens:
  N  = (num_blocks - num_ltm_blocks) * K   short-term memory rows per layer (M+ redefines num_blocks so)
  K0 = num_ltm_blocks * K                  long-term rows retrieved per layer (0 for MemoryLLM)
  P  = 1 + num_blocks * K                  virtual prefix length: inputs start at this position

Two fields are this project's own, not the official code's: "mplus_question_template", the text a question is
asked in, as the model was trained to read it (the shipped tiny model: "Q: {question}\nA:", data/facts.py);
`mplus ask` wraps a question in it; absent (the released models), a question is sent as is. And "mplus_task",
the data it was trained on ("facts", the tiny model's, when absent; "people", train/tasks.py), which tells the
demo and the retention benchmark what to ask.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mplus.llama.config import ConfigError
from mplus.llama.config_values import boolean, integer, number, show, string
from mplus.memory.stm import official_drop_count

LORA_TARGETS = ("q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj")
# Ceilings far above the released models (K 256, 50 blocks, LoRA r 16, d_s 256): past them a config is corrupt.
MAX_TOKENS, MAX_BLOCKS, MAX_PREFIX, MAX_LORA_R, MAX_SELECTOR_DIM = 1 << 16, 1 << 16, 1 << 20, 4096, 1 << 16
QUESTION_TEMPLATE_KEY, QUESTION_SLOT, MAX_TEMPLATE_CHARS = "mplus_question_template", "{question}", 4096
TASK_KEY, TASKS = "mplus_task", ("facts", "people")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a validated field of a frozen dataclass


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
    question_template: str | None = None  # e.g. "Q: {question}\nA:"; None: questions are sent as they are
    task: str = "facts"  # the training data (train/tasks.py)

    def __post_init__(self) -> None:
        string("kind", self.kind, ("mplus", "memoryllm"))
        integer("num_tokens", self.num_tokens, 1, MAX_TOKENS)
        integer("num_blocks", self.num_blocks, 1, MAX_BLOCKS)
        if self.virtual_prefix > MAX_PREFIX:
            raise ConfigError(f"num_blocks x num_tokens = {self.num_blocks} x {self.num_tokens} memory rows per layer "
                              f"is more than {MAX_PREFIX - 1}; is the config corrupt?")
        integer("num_ltm_blocks", self.num_ltm_blocks, 0, self.num_blocks - 1 if self.kind == "mplus" else 0)
        if self.stm_size <= self.num_tokens:
            raise ConfigError(f"the short-term memory ({self.stm_size} rows) must be larger than one block ({self.num_tokens})")
        integer("lora_config.r", self.lora_r, 1, MAX_LORA_R)
        _set(self, "lora_alpha", number("lora_config.lora_alpha", self.lora_alpha, above=0))
        _set(self, "lora_targets", _lora_targets(self.lora_targets))
        integer("selector_hidden_dim", self.selector_hidden_dim, 1, MAX_SELECTOR_DIM)
        integer("num_selector_layers", self.num_selector_layers, 1, 2)
        boolean("add_encoder_retriever", self.add_encoder_retriever)
        integer("update_ltm_frequency", self.update_ltm_frequency, 1)
        # rf is a time to live: rows enter with initial_rf and lose decay per merge (arXiv 2502.00592, sec. 3.2).
        _set(self, "decay_frequency", number("decay_frequency", self.decay_frequency, above=0))
        _set(self, "initial_rf_when_moving_stm_to_ltm",
             number("initial_rf_when_moving_stm_to_ltm", self.initial_rf_when_moving_stm_to_ltm, above=0))
        n_drop = official_drop_count(self.stm_size, self.num_blocks)
        if self.kind == "memoryllm" and n_drop != self.num_tokens:
            raise ConfigError(f"num_blocks {self.num_blocks}: the official MemoryLLM would drop {n_drop} rows per "
                              f"update instead of {self.num_tokens} and grow its pool; choose another num_blocks "
                              "(50 as memoryllm-8b)")
        if not boolean("drop_memory_per_layer", self.drop_memory_per_layer) and self.kind == "mplus":
            raise ConfigError("M+ always drops its STM rows with one permutation per layer (so does the official "
                              "code, whatever the flag says); drop_memory_per_layer=False is for MemoryLLM only")
        _check_template(self.question_template)
        string(TASK_KEY, self.task, TASKS)

    @property
    def stm_size(self) -> int:
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def ltm_retrieved(self) -> int:
        return self.num_ltm_blocks * self.num_tokens

    @property
    def virtual_prefix(self) -> int:
        return 1 + self.num_blocks * self.num_tokens

    def question_prompt(self, question: str) -> str:
        """The question as the model reads it: put in question_template, or as is without one."""
        if self.question_template is None:
            return question
        return self.question_template.replace(QUESTION_SLOT, question)  # never str.format: the file is untrusted

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "MemoryConfig":
        """The memory fields of a parsed config.json, each type-checked (config_values.py); absent or null
        optional fields take the official defaults."""
        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json is missing the memory field '{key}' (is this an M+ or MemoryLLM checkpoint?)")
            return raw[key]

        def optional(key: str, default: Any, where: Mapping[str, Any] = raw) -> Any:
            return default if where.get(key) is None else where[key]

        if not boolean("add_bos_embedding", optional("add_bos_embedding", True)):
            raise ConfigError("add_bos_embedding false is not supported: both released models use it")
        mplus = boolean("add_selector", optional("add_selector", False)) or "num_ltm_blocks" in raw
        lora = optional("lora_config", {})
        if not isinstance(lora, dict):
            raise ConfigError(f"config field 'lora_config' must be an object, got {show(lora)}")
        number("lora_config.lora_dropout", optional("lora_dropout", 0.0, lora), at_least=0, below=1)
        targets = optional("target_modules", list(LORA_TARGETS), lora)
        if not isinstance(targets, list):
            raise ConfigError(f"config field 'lora_config.target_modules' must be a list of names, got {show(targets)}")
        fields = dict(kind="mplus" if mplus else "memoryllm", num_tokens=need("num_tokens"),
                      num_blocks=need("num_blocks"), lora_r=optional("r", 16, lora),
                      lora_alpha=optional("lora_alpha", 32, lora), lora_targets=tuple(targets),
                      drop_memory_per_layer=boolean("drop_memory_per_layer", optional("drop_memory_per_layer", True)),
                      question_template=raw.get(QUESTION_TEMPLATE_KEY), task=optional(TASK_KEY, "facts"))
        if mplus:
            if optional("update_ltm_mode", "immediate") != "immediate":
                raise ConfigError(f"update_ltm_mode {show(raw['update_ltm_mode'])} is not supported; only 'immediate' "
                                  "runs in the official code")
            if not boolean("map_from_hidden_states", optional("map_from_hidden_states", True)):
                raise ConfigError("map_from_hidden_states false is not supported (the official training rejects it too)")
            fields.update(drop_memory_per_layer=True,  # stored in M+ configs, never read by the official code
                          num_ltm_blocks=need("num_ltm_blocks"), selector_hidden_dim=need("selector_hidden_dim"),
                          num_selector_layers=optional("num_selector_layers", 2),
                          add_encoder_retriever=optional("add_encoder_retriever", True),
                          update_ltm_frequency=optional("update_ltm_frequency", fields["num_blocks"]),
                          decay_frequency=optional("decay_frequency", 1),
                          initial_rf_when_moving_stm_to_ltm=optional("initial_rf_when_moving_stm_to_ltm", 10))
        return cls(**fields)

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
        if self.question_template is not None:
            out[QUESTION_TEMPLATE_KEY] = self.question_template
        if self.task != "facts":  # absent means facts: the tiny model's config stays as it was
            out[TASK_KEY] = self.task
        return out


def _check_template(template: Any) -> None:
    """None, or a string of at most MAX_TEMPLATE_CHARS holding the slot {question} exactly once."""
    if template is None:
        return
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS or template.count(QUESTION_SLOT) != 1:
        raise ConfigError(f"config field '{QUESTION_TEMPLATE_KEY}' must be a text of at most {MAX_TEMPLATE_CHARS} "
                          f"characters holding {QUESTION_SLOT} once (e.g. \"Q: {{question}}\\nA:\"), got "
                          f"{show(template)}; fix it or remove the field")


def _lora_targets(targets: Any) -> tuple[str, ...]:
    name = "lora_config.target_modules"
    if not isinstance(targets, (tuple, list)) or not targets:
        raise ConfigError(f"config field '{name}' must be a non-empty list of names, got {show(targets)}")
    for t in targets:
        string(name, t, LORA_TARGETS)
    if len(set(targets)) != len(targets):
        raise ConfigError(f"config field '{name}' names a module twice: {show(targets)}")
    return tuple(targets)
