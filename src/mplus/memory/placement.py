"""Where the parts of a memory live: the compute device (weights, STM, its prefix keys/values) and the host that
keeps the long-term memory (docs/placement.md).

An LTM grows without bound (M+ keeps every dropped row until its time-to-live runs out), while a question reads
only K0 of its rows per layer. So the LTM rows and the dropped-row cache stay in host memory, and per question
only the K0 retrieved rows of each layer cross to the device. The retriever keys (d_s wide, all of them scored
per question) live on the device (fast scoring, S x d_s device memory per layer) or on the host (scoring on the
CPU; only the prompt's queries cross), as `keys` says.

Every crossing goes through `transfer`, so a test can count what moves.

Notation: S LTM rows, K0 rows retrieved, d hidden size, d_s key size.
"""
from __future__ import annotations

import dataclasses

import torch

KEYS = ("device", "host")  # where the retriever keys may live


def as_device(device: torch.device | str) -> torch.device:
    """torch.device(device), with "cuda" made "cuda:N" (the current device), as tensors report it; a device torch
    cannot use is refused here, with its cause."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def transfer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device` (t itself if already there). Asynchronous only towards an accelerator: a device-to-host copy
    must be complete before the host reads it."""
    return t.to(device, non_blocking=device.type != "cpu")


@dataclasses.dataclass(frozen=True)
class Placement:
    """device: weights, STM [L, N, d], STM ages and the [bos; STM] keys/values. ltm_device: LTM rows, ages,
    time-to-live and the dropped-row cache's rows and ages. keys_device: the retriever keys of the LTM and of the
    cache (scored together, so kept together)."""

    device: torch.device = torch.device("cpu")
    ltm_device: torch.device = torch.device("cpu")
    keys_device: torch.device = torch.device("cpu")

    def __post_init__(self):
        for field in ("device", "ltm_device", "keys_device"):
            object.__setattr__(self, field, as_device(getattr(self, field)))

    @classmethod
    def on(cls, device: torch.device | str = "cpu", ltm_keys: str = "device") -> "Placement":
        """Compute on `device`, the LTM in host memory, its keys on the device (ltm_keys="device") or the host."""
        if ltm_keys not in KEYS:
            raise ValueError(f"ltm_keys must be one of {', '.join(KEYS)}, not {ltm_keys!r}")
        device = as_device(device)
        return cls(device, torch.device("cpu"), device if ltm_keys == "device" else torch.device("cpu"))

    @property
    def pin(self) -> bool:
        """Whether rows gathered on the host for the device go through page-locked memory (an asynchronous copy):
        only from a CPU host to a CUDA device."""
        return self.ltm_device.type == "cpu" and self.device.type == "cuda"

    def __str__(self) -> str:
        if self.device == self.ltm_device == self.keys_device:
            return f"all on {self.device}"
        return f"STM on {self.device}, LTM on {self.ltm_device}, retriever keys on {self.keys_device}"

    # The crossings, one per kind of tensor (docs/placement.md lists when each happens).
    def rows_to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """Retrieved rows [K0, d], gathered on the host, to the device (per question, per layer)."""
        return transfer(rows, self.device)

    def queries_to_keys(self, queries: torch.Tensor) -> torch.Tensor:
        """A prompt's queries [T, d_s] to where the keys are scored (per question, per layer)."""
        return transfer(queries, self.keys_device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Dropped rows [K, d] or ages [K] to the LTM's host (per write, per layer)."""
        return transfer(t, self.ltm_device)

    def to_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [K, d_s] of dropped rows to where the keys live (per write, per layer)."""
        return transfer(keys, self.keys_device)


HOST = Placement()  # everything on the CPU: the default
