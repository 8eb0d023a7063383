"""The memory side at scale, checked on small shapes by counting what PyTorch allocates (tests/allocations.py):

- from_llama draws the memory in its dtype, chunk by chunk, never a whole fp32 copy (same values as before);
- initial_state() hands out the stored memory without copying it, and writes never change the stored memory;
- a write updates the STM in place: no [L, N, d] rebuilt, survivors in order then the block;
- a question gathers only the K0 retrieved rows per layer and scores the keys in bounded blocks, with the same
  picks as scoring the whole pool at once.

Expected values come from the formulas written out here (torch.randn then cast, cat of survivors and block,
top-K0 over the concatenated pool), never from the code under test.
"""
from __future__ import annotations

import pytest
import torch

from allocations import Allocations
from mplus.memory import checkpoint
from mplus.memory.config import MemoryConfig
from mplus.memory.ltm import DroppedRows, LayerLTM, order_by_age
from mplus.memory.mplus import MPlus
from mplus.memory.retriever import pool_relevance, select
from mplus.memory.stm import draw_drop, drop_and_append
from tiny import tiny_llama

L, D = 2, 48  # tiny_llama: 2 layers, d 48, vocab 97
MPLUS = dict(kind="mplus", num_tokens=4, num_blocks=18, num_ltm_blocks=2, lora_r=4, lora_alpha=8.0,
             selector_hidden_dim=64, update_ltm_frequency=2,
             initial_rf_when_moving_stm_to_ltm=1000.0)  # N 64, K 4, K0 8, d_s 64; nothing evicted


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(llama_dir):
    return MPlus.from_llama(llama_dir, MemoryConfig(**MPLUS), seed=1)


def chunk(i: int) -> list[int]:
    return torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(100 + i)).tolist()


# ------------------------------------------------------------------------------------------- 1. drawing the memory

@pytest.mark.parametrize("shape", [(2, 64, 48), (3, 37, 5), (1, 7, 3), (1, 1, 21)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [16, 40, 1000, 2**18])
def test_draw_normal_gives_the_values_of_one_fp32_draw(shape, dtype, chunk_size):
    want = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = checkpoint.draw_normal(shape, dtype, torch.Generator().manual_seed(7), chunk=chunk_size)
    assert got.dtype == dtype and torch.equal(got, want)  # bit-identical, not approximately equal


def test_from_llama_draws_a_bf16_memory_without_an_fp32_copy(llama_dir):
    memory = MemoryConfig(**{**MPLUS, "num_tokens": 64, "num_blocks": 66})  # N 4096: L*N*d = 393k values > chunk
    fp32_memory = L * memory.stm_size * D * 4
    chunk_bytes = 4 * (checkpoint.DRAW_CHUNK + 15)  # a chunk, its last one with a tail of under 16 values
    assert fp32_memory > chunk_bytes
    with Allocations() as a:
        model = MPlus.from_llama(llama_dir, memory, seed=1, dtype=torch.bfloat16)
    assert model.checkpoint_state.stm.dtype == torch.bfloat16
    assert a.largest(torch.float32) <= chunk_bytes  # one chunk of 1 MB, not the memory's 1.5 MB
    fp32 = MPlus.from_llama(llama_dir, memory, seed=1)  # the same draws, fp32 then cast
    assert torch.equal(model.checkpoint_state.stm, fp32.checkpoint_state.stm.bfloat16())


# ------------------------------------------------------------------------------------------- 2. one stored copy

def test_initial_state_copies_nothing_and_writes_leave_the_stored_memory(model):
    stored = model.checkpoint_state
    before = stored.copy()
    stm_bytes = stored.stm.numel() * stored.stm.element_size()
    with Allocations() as a:
        state = model.initial_state(seed=3)
    assert a.largest() < stm_bytes  # no copy of the STM (nor of anything that large)
    independent = before.copy()  # what initial_state gave before: a deep copy
    independent.generator.manual_seed(3)
    for i in range(5):  # past a merge (every 2 updates): the LTM changes too
        model.inject(state, chunk(i))
        model.inject(independent, chunk(i))
    assert torch.equal(stored.stm, before.stm) and torch.equal(stored.stm_ages, before.stm_ages)
    assert all(len(m) == 0 and len(m.cache) == 0 for m in stored.ltm)
    assert torch.equal(state.stm, independent.stm) and torch.equal(state.stm_ages, independent.stm_ages)
    for m, n in zip(state.ltm, independent.ltm):
        assert torch.equal(m.rows, n.rows) and torch.equal(m.keys, n.keys) and torch.equal(m.ages, n.ages)
        assert torch.equal(m.cache.rows, n.cache.rows) and torch.equal(m.cache.ages, n.cache.ages)
    assert torch.equal(model.initial_state(seed=3).stm, before.stm)


def test_a_taken_state_writes_the_stored_memory_in_place_from_the_first_chunk(llama_dir):
    model = MPlus.from_llama(llama_dir, MemoryConfig(**MPLUS), seed=1)
    stm, where = model.checkpoint_state.stm.clone(), model.checkpoint_state.stm.data_ptr()
    state = model.initial_state(seed=3, take=True)
    assert model.checkpoint_state is None and state.stm.data_ptr() == where
    block = model.new_memory_block(state.stm, torch.tensor(chunk(0)))  # [L, K, d]
    with Allocations() as a:
        model.write(state, block, torch.Generator().manual_seed(9))
    assert state.stm.data_ptr() == where  # no second STM, even at the first write
    assert a.largest() <= stm[0].numel() * stm.element_size()
    g = torch.Generator().manual_seed(9)
    for l in range(L):
        kept, _ = draw_drop(stm.shape[1], 4, g)
        assert torch.equal(state.stm[l], torch.cat((stm[l, kept], block[l])))
    with pytest.raises(ValueError, match="holds no stored memory"):
        model.initial_state()


def test_a_model_loaded_without_its_stored_memory_holds_none(model, tmp_path):
    model.save_pretrained(tmp_path)
    bare = MPlus.from_pretrained(tmp_path, stored_memory=False)
    assert bare.checkpoint_state is None
    assert bare.state_spec() == model.state_spec()  # states saved with the full model still load into it
    with pytest.raises(ValueError, match="holds no stored memory"):
        bare.save_pretrained(tmp_path / "again")


# ------------------------------------------------------------------------------------------- 3. in-place STM write

def test_a_write_updates_the_stm_in_place(llama_dir):
    model = MPlus.from_llama(llama_dir, MemoryConfig(kind="memoryllm", num_tokens=4, num_blocks=16), seed=2)
    state = model.initial_state(seed=5)
    model.inject(state, chunk(0))  # the first write gives the state its own STM
    stm, ages, where = state.stm.clone(), state.stm_ages.clone(), state.stm.data_ptr()
    block = model.new_memory_block(state.stm, torch.tensor(chunk(1)))  # [L, K, d]
    g = torch.Generator().manual_seed(9)
    with Allocations() as a:
        model.write(state, block, g)
    assert state.stm.data_ptr() == where
    layer_bytes = stm[0].numel() * stm.element_size()
    assert a.largest() <= layer_bytes  # temporaries of one layer at most, never [L, N, d]
    g = torch.Generator().manual_seed(9)  # the expected update, written out: survivors in order, then the block
    for l in range(L):
        kept, _ = draw_drop(stm.shape[1], 4, g)
        assert torch.equal(state.stm[l], torch.cat((stm[l, kept], block[l])))
        assert state.stm_ages[l].tolist() == ages[l, kept].tolist() + [3, 2, 1, 0]


@pytest.mark.parametrize("per_layer", [True, False])
def test_drop_and_append_in_place_and_into_out_agree(per_layer):
    g = torch.Generator().manual_seed(0)
    stm, ages, block = torch.randn(3, 10, 4, generator=g), torch.randint(0, 50, (3, 10)), torch.randn(3, 2, 4)
    out = torch.empty_like(stm), torch.empty_like(ages)
    a = drop_and_append(stm, ages, block, torch.Generator().manual_seed(1), per_layer=per_layer, out=out)
    original = stm.clone()
    b = drop_and_append(stm, ages, block, torch.Generator().manual_seed(1), per_layer=per_layer)
    assert torch.equal(stm, out[0]) and torch.equal(ages, out[1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all((a[0][l][:, None] == original[l][None]).all(-1).any(-1).all() for l in range(3))  # dropped rows: old


# ------------------------------------------------------------------------------------------- 4. retrieval

def reference_picks(queries, ltm: LayerLTM, k0: int) -> torch.Tensor:
    """Retrieval as it was written before: the pool's keys and ages concatenated, one score over all of them."""
    keys = torch.cat((ltm.keys, ltm.cache.keys.to(ltm.keys.dtype)))
    ages = torch.cat((ltm.ages, ltm.cache.ages))
    picks = torch.sigmoid(queries @ keys.t()).mean(0).topk(k0).indices.sort().values
    return picks[order_by_age(ages[picks])]


def random_ltm(n: int, c: int, d_s: int, dtype, seed: int) -> LayerLTM:
    g = torch.Generator().manual_seed(seed)
    keys = lambda m: (torch.randn(m, d_s, generator=g) * 4).round().to(dtype)  # noqa: E731  coarse: many ties
    ages = lambda m: torch.randint(0, 40, (m,), generator=g)  # noqa: E731  repeated ages: ties in the order
    return LayerLTM(torch.randn(n, 3, generator=g).to(dtype), keys(n), ages(n), torch.ones(n, dtype=torch.float64),
                    DroppedRows(torch.randn(c, 3, generator=g).to(dtype), keys(c), ages(c)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, block", [(1000, 37, 64), (1000, 0, 128), (130, 70, 64), (300, 5, 65536)])
def test_blocked_scoring_picks_exactly_what_one_whole_score_picks(dtype, n, c, block):
    for seed in range(3):
        ltm = random_ltm(n, c, 16, dtype, seed)
        queries = torch.randn(9, 16, generator=torch.Generator().manual_seed(50 + seed)).to(dtype) / 4
        assert torch.equal(select(queries, ltm, 40, block), reference_picks(queries, ltm, 40))


def test_scoring_temporaries_are_bounded_by_the_block():
    ltm = random_ltm(4000, 100, 16, torch.float32, 0)
    queries = torch.randn(5, 16)
    with Allocations() as a:
        pool_relevance(queries, ltm, block=256)
    # the [S + c] scores themselves, and per block at most [256, d_s] keys and [T, 256] products
    assert a.largest() <= max(4100 * 4, 256 * 16 * 4, 5 * 256 * 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        pool_relevance(queries, ltm, block=100)


def test_a_question_gathers_only_the_retrieved_rows(model):
    state = model.initial_state(seed=0)
    for i in range(40):  # 160 rows out of the STM: an LTM of about 150 rows per layer, K0 = 8
        model.inject(state, chunk(i))
    pool_rows = min(len(m) + len(m.cache) for m in state.ltm)
    assert pool_rows > 100
    first = model.forward(state, chunk(99)[:6])  # fills the [bos; STM] keys/values (not a question's cost)
    with Allocations() as a:
        again = model.forward(state, chunk(99)[:6])
    assert torch.equal(again, first)
    # the pool's keys [S + c, d_s] (or rows [S + c, d]) would be larger than anything a question needs here
    assert a.largest() < pool_rows * MPLUS["selector_hidden_dim"] * 4, sorted(a.records, key=lambda r: -r[2])[:3]


def test_a_one_off_answer_keeps_no_prefix_in_the_state(model):
    """keep_prefix=False: the same tokens, and the state holds no [bos; STM] keys/values afterwards."""
    state, ids = model.initial_state(), torch.arange(3, 11)
    kept = model.generate(state.copy(), ids, max_new_tokens=4)
    once = model.initial_state()
    assert model.generate(once, ids, max_new_tokens=4, keep_prefix=False) == kept
    assert once.stm_kv is None
    model.generate(once, ids, max_new_tokens=4)
    assert once.stm_kv is not None and all(kv is not None for kv in once.stm_kv.kv)
