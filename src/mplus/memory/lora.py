"""LoRA with several named adapters on one linear layer, the adapter chosen per call.

M+ carries two adapters on q/k/v/gate/up/down: `default` writes memory (injection) and `decoder_adapter`
reads it (generation). Parameter names follow PEFT 0.10, so official checkpoints load by identity:
`<name>.base_layer.weight`, `<name>.lora_A.<adapter>.weight` [r, in], `<name>.lora_B.<adapter>.weight` [out, r].

    y = W x + (alpha / r) * B (A x)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mplus.llama.config_values import integer, number

WRITE, READ = "default", "decoder_adapter"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, adapters: tuple[str, ...] = (WRITE, READ)):
        super().__init__()
        r = integer("lora_config.r", r)  # the scale divides by it
        alpha = number("lora_config.lora_alpha", alpha, above=0)
        self.base_layer = base
        self.lora_A = nn.ModuleDict({a: nn.Linear(base.in_features, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, base.out_features, bias=False) for a in adapters})
        self.scale = alpha / r
        self.merged: str | None = None  # the adapter folded into base_layer.weight, if any (see merge)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        y = self.base_layer(x)
        if adapter is None or adapter == self.merged:
            return y
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged into the weights, so {adapter!r} cannot run; "
                             "reload the model to use both adapters")
        if adapter not in self.lora_A:
            raise ValueError(f"no LoRA adapter named {adapter!r}; this layer has {list(self.lora_A)}")
        return y + self.lora_B[adapter](self.lora_A[adapter](x)) * self.scale

    def merge(self, adapter: str) -> None:
        """Fold one adapter into the base weight: W <- W + scale B A. Equal to running the adapter up to float
        rounding, one matmul cheaper per call; the other adapter can no longer run."""
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is already merged")
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight(adapter).to(self.base_layer.weight.dtype)
        self.merged = adapter

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scale * B A [out, in]: what merging `adapter` adds to the base weight."""
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scale

    def reset_adapter(self, adapter: str, generator: torch.Generator) -> None:
        """The training initialisation: A Kaiming-uniform (a = sqrt 5, PyTorch's Linear default), B = 0."""
        a = self.lora_A[adapter].weight
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in))
        with torch.no_grad():
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
            self.lora_B[adapter].weight.zero_()


def wrap_with_lora(parent: nn.Module, names: list[str], r: int, alpha: float) -> None:
    """Replace parent.<name> (an nn.Linear) by a LoRALinear around it, for every name."""
    for name in names:
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha))
