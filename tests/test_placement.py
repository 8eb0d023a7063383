"""Where a memory's parts live (mplus.memory.placement, docs/placement.md), checked without an accelerator.

The code is device-generic, so the CPU runs the very path a CUDA device runs; what a GPU would add, the tensors
that cross, is seen through a spy on placement.transfer, the one door between the device and the host. The
"meta" device (shapes, no data) stands in for a second device where only the whereabouts of tensors matter.

Model: the tiny official M+ checkpoint (L=3, N=32, K=8, K0=16, d=64, d_s=16, 20 LTM rows per layer, a merge
every 2 updates).
"""
from __future__ import annotations

import pytest
import torch

from conftest import OFFICIAL_TINY
from mplus.memory import placement as placement_module
from mplus.memory.mplus import MPlus
from mplus.memory.placement import HOST, Placement
from mplus.memory.state import MemoryState

CHECKPOINT = OFFICIAL_TINY / "checkpoint"
L, K, K0, D, D_S = 3, 8, 16, 64, 16
META = torch.device("meta")
PROMPT = list(range(40, 52))  # T = 12
CHUNKS = [list(range(20 + 7 * i, 40 + 7 * i)) for i in range(5)]  # 5 updates: two merges, one batch left cached


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def default():
    return MPlus.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def host_keys():
    return MPlus.from_pretrained(CHECKPOINT, device="cpu", ltm_keys="host")


@pytest.fixture
def moves(monkeypatch):
    """Every crossing through placement.transfer, as (shape, target device, the tensor), in order."""
    seen = []

    def spy(t, device):
        seen.append((tuple(t.shape), device, t))
        return transfer(t, device)

    transfer = placement_module.transfer
    monkeypatch.setattr(placement_module, "transfer", spy)
    return seen


def written(model: MPlus, seed: int = 0) -> MemoryState:
    state = model.initial_state(seed)
    for chunk in CHUNKS:
        model.inject(state, chunk, allow_short=True)
    return state


def parts(state: MemoryState) -> dict[str, torch.Tensor]:
    out = {"stm": state.stm, "stm_ages": state.stm_ages}
    for l, m in enumerate(state.ltm or ()):
        out |= m.tensors(l)
    return out


# ------------------------------------------------------------------------------------------------ the record

def test_placement_record():
    p = Placement.on("cpu", ltm_keys="host")
    assert (p.device, p.ltm_device, p.keys_device) == (torch.device("cpu"),) * 3 and p == HOST and not p.pin
    assert str(p) == "all on cpu"
    split = Placement(device="meta", keys_device="meta")  # strings become devices
    assert (split.device, split.ltm_device, split.keys_device) == (META, torch.device("cpu"), META)
    assert str(split) == "STM on meta, LTM on cpu, retriever keys on meta" and not split.pin
    with pytest.raises(ValueError, match="ltm_keys must be one of device, host"):
        Placement.on("cpu", ltm_keys="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Placement.on("cuda")


def test_model_and_its_new_states_follow_the_placement(host_keys):
    assert host_keys.placement == Placement.on("cpu", "host")
    state = host_keys.initial_state()
    assert state.placement == host_keys.placement and state.copy().placement == host_keys.placement
    assert "all on cpu" in state.describe().splitlines()[0]
    assert "all on" not in repr(state)  # the default placement is not spelled out in the one-line repr


def test_state_to_puts_each_part_where_the_placement_says(default):
    state = written(default)
    for keys in ("device", "host"):
        target = Placement(device=META, keys_device=META if keys == "device" else "cpu")
        moved = state.to(target)
        assert moved.placement == target and moved.stm_kv is None and "STM on meta" in repr(moved)
        assert moved.stm.device == moved.stm_ages.device == META
        for m in moved.ltm:
            assert m.rows.device == m.ages.device == m.rf.device == m.cache.rows.device == m.cache.ages.device \
                == torch.device("cpu")
            assert m.keys.device == m.cache.keys.device == target.keys_device
        assert torch.equal(moved.ltm[1].rows, state.ltm[1].rows)  # the host parts keep their values
    assert state.to(state.placement) is state


def test_a_state_elsewhere_is_refused(default):
    state = written(default)
    with pytest.raises(ValueError, match=r"STM is on meta, the model on cpu: move it with state = state.to"):
        default(state.to(Placement(device=META)), PROMPT)
    state.ltm[0].keys = state.ltm[0].keys.to(META)  # by hand, the placement not told
    with pytest.raises(ValueError, match="LTM keys are on meta, but its placement"):
        default(state, PROMPT)


# ------------------------------------------------------------------------------------------------ what moves

@pytest.mark.parametrize("which", ["default", "host_keys"])
def test_a_question_moves_only_the_k0_retrieved_rows_per_layer(which, request, moves):
    model = request.getfixturevalue(which)
    state = written(model)
    pool = [len(m) + len(m.cache) for m in state.ltm]
    assert min(pool) > K0  # scoring, not the cyclic fill
    moves.clear()
    record = []
    model(state, PROMPT, record=record)
    rows = [(t, r["retrieved"]) for (shape, device, t), r in zip(moves[1::2], record)]
    assert [(shape, device) for shape, device, _ in moves] == [((len(PROMPT), D_S), torch.device("cpu")),
                                                               ((K0, D), torch.device("cpu"))] * L
    for l, (t, got) in enumerate(rows):  # gathered on the host by index: exactly the picked pool rows
        assert torch.equal(t, state.ltm[l].pool()[got.picks])
    moves.clear()
    model.generate(state, PROMPT, max_new_tokens=4)
    assert [shape for shape, _, _ in moves if shape[-1] == D] == [(K0, D)] * L  # one retrieval, none per token


def test_an_injection_sends_the_dropped_rows_to_the_host(default, moves):
    state = written(default)
    moves.clear()
    default.inject(state, CHUNKS[0], allow_short=True)
    cpu = torch.device("cpu")
    assert [(shape, device) for shape, device, _ in moves] == [((K, D), cpu), ((K, D_S), cpu), ((K,), cpu)] * L


# ------------------------------------------------------------------------------------------------ same results

def test_results_equal_the_default_path_bit_for_bit(default, host_keys):
    a, b = written(default, seed=3), written(host_keys, seed=3)
    assert sum(len(m) for m in a.ltm) > L * 20  # merges happened
    for (name, x), y in zip(parts(a).items(), parts(b).values()):
        assert torch.equal(x, y), name
    assert torch.equal(default(a, PROMPT), host_keys(b, PROMPT))
    assert default.generate(a, PROMPT, max_new_tokens=8) == host_keys.generate(b, PROMPT, max_new_tokens=8)


def test_save_and_load_keep_values_and_place_the_parts(host_keys, tmp_path):
    state = written(host_keys)
    path = tmp_path / "state.safetensors"
    state.save(path)
    back = MemoryState.load(path, expect=host_keys.state_spec(), placement=host_keys.placement)
    assert back.placement == host_keys.placement and back.update_step == state.update_step
    for (name, x), y in zip(parts(state).items(), parts(back).values()):
        assert torch.equal(x, y), name
    assert torch.equal(host_keys(back, PROMPT), host_keys(state, PROMPT))
    assert MemoryState.load(path, device="cpu").placement == Placement.on("cpu")
    split = MemoryState.load(path, placement=Placement(device=META, keys_device=META))
    assert split.stm.device == META and split.ltm[2].keys.device == META
    assert torch.equal(split.ltm[2].rows, state.ltm[2].rows) and torch.equal(split.ltm[2].cache.ages,
                                                                             state.ltm[2].cache.ages)
    with pytest.raises(TypeError, match="placement or device, not both"):
        MemoryState.load(path, placement=HOST, device="cpu")
