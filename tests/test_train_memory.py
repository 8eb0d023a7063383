"""Stage-1 building blocks: the read path used in training equals inference, gradient reaches both adapters,
and a few optimiser steps on one example lower its loss."""
import pytest
import torch

from conftest import OFFICIAL_TINY
from mplus import MPlus
from mplus.memory.lora import READ
from mplus.memory.prefix import stm_positions
from mplus.train.memory import (Placement, full_memory_prefix, rival_prefix, stage1_loss, trainable_parameters,
                                write_in_sequence)


@pytest.fixture
def model():
    return MPlus.from_pretrained(OFFICIAL_TINY / "checkpoint")


def test_logits_with_rows_reproduce_a_memoryllm_forward(model):
    """Reading [bos, all STM rows] at the generation positions is what forward does without an LTM."""
    state = model.initial_state().without_ltm()
    ids = torch.arange(3, 12)
    k0, n = model.memory_config.ltm_retrieved, model.memory_config.stm_size
    rows = [torch.cat((model.bos_embedding[l], state.stm[l])) for l in range(state.num_layers)]
    positions = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1 + k0, 1 + k0 + n)))
    with torch.no_grad():
        got = model.logits_with_rows(ids, model.memory_config.virtual_prefix + torch.arange(9), rows, positions, READ)
    assert (got - model(state, ids)).abs().max() <= 1e-5


def test_full_memory_prefix_keeps_n_minus_k_rows_in_order(model):
    state = model.initial_state()
    delta = torch.randn(3, 8, 64)
    rows, positions = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(0))
    assert all(r.shape == (1 + 32, 64) for r in rows) and positions.shape == (33,)
    assert torch.equal(rows[1][-8:], delta[1])


def _block_slots(rows, delta):
    """Per layer, the prefix slots holding rows of delta [L, K, d]."""
    return [[i for i in range(r.shape[0]) if (r[i] == delta[l]).all(-1).any()] for l, r in enumerate(rows)]


def test_placement_puts_an_aged_partial_block_among_the_stm_rows(model):
    state = model.initial_state()
    N, K = model.memory_config.stm_size, model.memory_config.num_tokens  # 32, 8
    delta = torch.randn(3, K, 64)
    ages, kept = set(), set()
    for seed in range(40):
        rows, positions = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(seed),
                                             Placement(max_age=2, min_keep=0.5))
        assert all(r.shape == (1 + N, 64) for r in rows) and torch.equal(positions[1:] - positions[1], torch.arange(N))
        slots = _block_slots(rows, delta)
        m = len(slots[0])
        assert all(len(s) == m for s in slots) and K // 2 <= m <= K  # the same share in every layer
        for l, s in enumerate(slots):
            assert s == list(range(s[0], s[0] + m))  # contiguous, in written order
            picked = rows[l][s]  # [m, d]
            order = [int((delta[l] == r).all(-1).nonzero()) for r in picked]
            assert order == sorted(order)
        after = N - slots[0][-1]  # STM rows written after the block
        assert after % K == 0 or after > N - K - m
        ages.add(after // K), kept.add(m)
    assert ages == {0, 1, 2} and len(kept) > 2


def test_placement_in_the_retrieved_zone_uses_the_generation_layout(model):
    state = model.initial_state()
    N, K, k0 = model.memory_config.stm_size, model.memory_config.num_tokens, model.memory_config.ltm_retrieved
    delta = torch.randn(3, K, 64)
    rows, positions = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(0),
                                         Placement(ltm_ratio=1.0))
    assert torch.equal(positions, torch.arange(1 + k0 + N))  # bos, K0 retrieved slots, the STM
    for l, r in enumerate(rows):
        assert r.shape == (1 + k0 + N, 64) and torch.equal(r[1 + k0:], state.stm[l])  # the whole STM after
        assert all(1 <= i <= k0 for i in _block_slots(rows, delta)[l])


def test_a_filled_retrieved_zone_holds_other_rows_and_the_block_stays_in_the_stm(model):
    state = model.initial_state()
    N, K, k0 = model.memory_config.stm_size, model.memory_config.num_tokens, model.memory_config.ltm_retrieved
    delta = torch.randn(3, K, 64)
    rows, positions = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(0),
                                         Placement(filled_ratio=1.0))
    assert torch.equal(positions, torch.arange(1 + k0 + N))  # the generation layout, as with ltm_ratio
    for l, r in enumerate(rows):
        assert r.shape == (1 + k0 + N, 64) and torch.equal(r[-K:], delta[l])  # the block last in the STM
        zone = r[1:1 + k0]
        picked = [int((state.stm[l] == x).all(-1).nonzero()[0]) for x in zone]  # every zone row is an STM row...
        assert picked == sorted(set(picked))  # ...distinct, in the STM's (age) order
    # off by default, and a run without it keeps its draws: the same prefix as before the option existed
    a, _ = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(1), Placement(ltm_ratio=0.5))
    b, _ = full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(1),
                              Placement(ltm_ratio=0.5, filled_ratio=0.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    shares = [full_memory_prefix(model, state.stm, delta, torch.Generator().manual_seed(s),
                                 Placement(filled_ratio=0.5))[1].shape[0] > 1 + N for s in range(60)]
    assert 15 <= sum(shares) <= 45


def test_rival_blocks_are_the_last_writes_in_their_order(model):
    state = model.initial_state()
    N, K, k0 = model.memory_config.stm_size, model.memory_config.num_tokens, model.memory_config.ltm_retrieved
    written = torch.randn(3, 3, K, 64)  # the asked block among R = 2 rivals, in write order
    for seed in range(5):
        rows, positions = rival_prefix(model, state.stm, written, torch.Generator().manual_seed(seed))
        assert torch.equal(positions, stm_positions(k0, N))  # the STM layout
        for l, r in enumerate(rows):
            assert r.shape == (1 + N, 64)
            assert torch.equal(r[1 + N - 3 * K:], written[:, l].flatten(0, 1))  # the last three writes, in order
    rows, positions = rival_prefix(model, state.stm, written, torch.Generator(), filled_ratio=1.0)
    assert rows[0].shape == (1 + k0 + N, 64) and torch.equal(positions, torch.arange(1 + k0 + N))
    with pytest.raises(ValueError, match="do not fit"):
        rival_prefix(model, state.stm, torch.randn(5, 3, K, 64), torch.Generator())


def test_the_asked_chunk_sits_at_a_random_place_among_its_rivals(model, monkeypatch):
    """stage1_loss's rival path shows the R + 1 blocks in write order, with the asked chunk's at every place."""
    import mplus.train.memory as memory
    shown, prefix, seen = [], memory.rival_prefix, []

    def recording(model, stm, written, g, filled_ratio):
        shown.append(written)
        return prefix(model, stm, written, g, filled_ratio)

    monkeypatch.setattr(memory, "rival_prefix", recording)
    stm = model.initial_state().stm
    chunks = [torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(c)) for c in range(3)]
    with torch.no_grad():
        for seed in range(20):
            _, delta = stage1_loss(model, stm, chunks[0], torch.arange(3, 13), torch.arange(10) >= 6,
                                   fresh_only=False, g=torch.Generator().manual_seed(seed), rival_chunks=chunks[1:])
            assert torch.equal(delta, model.new_memory_block(stm, chunks[0]))  # all written from the same STM
            seen.append(next(j for j in range(shown[-1].shape[0]) if torch.equal(shown[-1][j], delta)))
    assert set(seen) == {0, 1, 2}


def test_rivals_in_sequence_are_written_as_inference_writes_them(model):
    """write_in_sequence equals writing the chunks one by one into a state (model.write), each write pass reading
    the previous chunk's block; writing them all from one STM does not."""
    state = model.initial_state()
    chunks = [torch.randint(3, 200, (10 + c,), generator=torch.Generator().manual_seed(c)) for c in range(3)]
    with torch.no_grad():
        got = write_in_sequence(model, state.stm, chunks)  # [3, L, K, d]
        together = torch.stack([model.new_memory_block(state.stm, ids) for ids in chunks])
        for c, ids in enumerate(chunks):
            block = model.new_memory_block(state.stm, ids)
            assert (got[c] - block).abs().max() <= 1e-6
            model.write(state, block, state.generator)
    assert torch.equal(got[0], together[0]) and (got[1:] - together[1:]).abs().max() > 1e-3


def test_placement_in_the_retrieved_zone_needs_retrieved_rows():
    from types import SimpleNamespace
    model = SimpleNamespace(memory_config=SimpleNamespace(stm_size=32, num_tokens=8, ltm_retrieved=0))
    with pytest.raises(ValueError, match="num_ltm_blocks"):
        full_memory_prefix(model, torch.zeros(1, 32, 4), torch.zeros(1, 8, 4), torch.Generator(), Placement(ltm_ratio=0.5))


@pytest.mark.parametrize("fresh_only", [False, True])
def test_gradient_reaches_the_write_adapter_and_the_loss_falls(model, fresh_only):
    params = trainable_parameters(model)
    assert params and not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    optim = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    chunk, sentence = torch.randint(0, 256, (20,), generator=g), torch.randint(0, 256, (10,), generator=g)
    targets = torch.zeros(10, dtype=torch.bool)
    targets[5:] = True  # only the "answer" counts
    stm = model.initial_state().stm
    losses = []
    for step in range(15):
        loss, _ = stage1_loss(model, stm, chunk, sentence, targets, fresh_only=fresh_only,
                              g=torch.Generator().manual_seed(step))
        optim.zero_grad()
        loss.backward()
        if step == 0:
            write_grad = model.model.layers[0].mlp.up_proj.lora_B["default"].weight.grad
            assert write_grad is not None and write_grad.abs().sum() > 0  # through the written block
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_rival_blocks_keep_their_gradient(model, monkeypatch):
    """The rivals' blocks are written inside the loss with their gradient, so the write adapter also learns from
    the blocks the question must not be answered from."""
    blocks, write = [], model.new_memory_block

    def recording(stm, ids, **kwargs):
        blocks.append(write(stm, ids, **kwargs))
        return blocks[-1]

    monkeypatch.setattr(model, "new_memory_block", recording)
    trainable_parameters(model)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, 256, (12,), generator=g) for _ in range(3)]
    sentence, targets = torch.randint(0, 256, (10,), generator=g), torch.arange(10) >= 5
    loss, _ = stage1_loss(model, model.initial_state().stm, chunks[0], sentence, targets, fresh_only=False,
                          g=torch.Generator().manual_seed(1), rival_chunks=chunks[1:])
    grads = torch.autograd.grad(loss, blocks)  # fails outright for a block written without its gradient
    assert len(blocks) == 3 and all(grad.abs().sum() > 0 for grad in grads)

