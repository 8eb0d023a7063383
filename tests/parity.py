"""Shared by the parity tests against the official fixtures: float comparisons that keep the worst difference
seen per name, exact comparisons, and greedy generation that keeps the logits of every step."""
from __future__ import annotations

import importlib

import pytest
import torch

generate_module = importlib.import_module("mplus.llama.generate")  # the module (mplus.llama.generate is also a function)


class Diffs:
    """Floats compared within an absolute tolerance; the worst |diff| per name is kept for the report."""

    def __init__(self, tol: float):
        self.tol, self.worst = tol, {}

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
        diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        self.worst[name] = max(self.worst.get(name, 0.0), diff)
        assert diff <= self.tol, f"{name}: max |diff| {diff:.3g} > {self.tol:g}"

    def report(self, title: str) -> None:
        print(f"\n{title}")
        for name, diff in sorted(self.worst.items()):
            print(f"  {name:40} {diff:.2e}")
        assert self.worst and max(self.worst.values()) <= self.tol


def exact(name: str, got, want: torch.Tensor) -> None:
    assert torch.equal(torch.as_tensor(got).double(), want.double()), name


def greedy_with_logits(model, state, prompt, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy new ids after prompt, and the logits [n, V] each was chosen from (prefill, then cached steps)."""
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate_module, "sample_next", lambda logits, *a: seen.append(logits) or int(logits.argmax()))
        new = model.generate(state, prompt, max_new_tokens=max_new_tokens, stop_ids=())
    return new, torch.stack(seen)
