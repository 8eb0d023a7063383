"""The saving side of the kill -9 test in test_atomic_save.py: two contents of one kind, saved alternately over
the same folder, sharded and not, in an endless loop, until the test kills the process.

    python save_worker.py KIND FOLDER        (KIND: llama, mplus or state; prints "ready" once built)

The test imports build() and loaded() from here, so both sides hold the same two contents.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from mplus import Llama, MPlus
from mplus.memory.ltm import LayerLTM
from mplus.memory.state import MemoryState
from tiny import tiny_llama

FIXTURE = Path(__file__).parent / "fixtures" / "official-mplus-tiny" / "checkpoint"
SHARD_BYTES = {"llama": 1 << 20, "mplus": 1 << 16}  # ~11 and ~14 shards
STATE_FILE = "state.safetensors"


def _state(seed: int) -> MemoryState:
    """A 4-layer M+ state of ~16 MB, so a save takes long enough to be killed in the middle."""
    g = torch.Generator().manual_seed(seed)
    n_layers, rows, d, d_s = 4, 3000, 256, 32

    def each(make):
        return [make() for _ in range(n_layers)]

    stm = torch.randn(n_layers, 32, d, generator=g)
    rows_, keys = each(lambda: torch.randn(rows, d, generator=g)), each(lambda: torch.randn(rows, d_s, generator=g))
    ltm = [LayerLTM(r, k, torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=torch.float64),
                    LayerLTM.empty(d, d_s, torch.float32).cache) for r, k in zip(rows_, keys)]
    return MemoryState(stm=stm, stm_ages=torch.zeros(n_layers, 32, dtype=torch.long), ltm=ltm, update_step=0,
                       generator=torch.Generator().manual_seed(seed))


def build(kind: str):
    """(the two contents as {name: tensor}, save(i, folder, sharded) writing content i)."""
    if kind == "llama":
        models = [tiny_llama(seed=s, vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=32) for s in (0, 1)]

        def save(i, folder, sharded):
            models[i].save_pretrained(folder, max_shard_bytes=SHARD_BYTES[kind] if sharded else None)
        return [m.state_dict() for m in models], save
    if kind == "mplus":
        model = MPlus.from_pretrained(FIXTURE)
        states = [model.initial_state(), model.initial_state()]
        model.inject(states[1], torch.arange(3, 23))

        def save(i, folder, sharded):
            model.save_pretrained(folder, states[i], max_shard_bytes=SHARD_BYTES[kind] if sharded else None)
        return [_memory(s) for s in states], save
    states = [_state(0), _state(1)]

    def save(i, folder, sharded):
        states[i].save(Path(folder) / STATE_FILE)
    return [_memory(s) for s in states], save


def loaded(kind: str, folder: Path) -> dict[str, torch.Tensor]:
    """What the folder holds now, as build() describes a content."""
    if kind == "llama":
        return Llama.from_pretrained(folder, packed=False).state_dict()
    if kind == "mplus":
        return _memory(MPlus.from_pretrained(folder).checkpoint_state)
    return _memory(MemoryState.load(folder / STATE_FILE))


def _memory(state: MemoryState) -> dict[str, torch.Tensor]:
    return {"stm": state.stm, **{f"ltm.{l}": m.rows for l, m in enumerate(state.ltm)}}


if __name__ == "__main__":
    kind, folder = sys.argv[1], Path(sys.argv[2])
    _, save = build(kind)
    print("ready", flush=True)
    i = 0
    while True:  # content 0, 1, 0, 1, ...; unsharded twice, sharded twice, ...: every layout change happens
        save(i % 2, folder, sharded=(i // 2) % 2 == 1)
        i += 1
