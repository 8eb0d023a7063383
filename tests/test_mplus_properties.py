"""Properties and invariants of M+ / MemoryLLM memory handling (MemoryLLM §3.1, M+ §3.2; docs/algorithm.md §3-§5), checked with
hypothesis on random chunk sequences.

Models: the tiny official checkpoint (L=3, N=32, K=8, K0=16, d=64, a merge every 2 updates, rf 3) and small
M+ / MemoryLLM models built with MPlus.from_llama around a tiny random Llama (N=16, K=4, K0=8, d=48).

The model-level tests follow every row by its value: STM rows are random floats, so a row is identified by
exact equality. A shadow of the LTM and the dropped-row cache, written here from the algorithm's description (docs/algorithm.md), is advanced with
the rows seen to leave the STM and compared with the state after every update.
"""
from __future__ import annotations

import contextlib
import math
import signal

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import OFFICIAL_TINY
from mplus.memory.ltm import cyclic_candidates, merge, order_by_age
from mplus.memory.stm import draw_drop, write_block
from mplus.memory.config import MemoryConfig
from mplus.memory.mplus import MIN_CHUNK, MPlus
from mplus.memory.retriever import relevance
from tiny import tiny_llama

CHECKPOINT = OFFICIAL_TINY / "checkpoint"
SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def time_limit(seconds: int):
    """Turn a hang (e.g. the official cyclic fill of an empty LTM) into a test failure."""
    def fail(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def official():
    if not CHECKPOINT.is_dir():
        pytest.fail(f"official tiny checkpoint not found at {CHECKPOINT}")
    return MPlus.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=3).save_pretrained(folder)  # vocab 97, d 48, 2 layers, bos 1, eos 2
    return folder


TINY_MPLUS = dict(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2, lora_r=4, lora_alpha=8.0,
                  selector_hidden_dim=8, update_ltm_frequency=2, initial_rf_when_moving_stm_to_ltm=2.0)
TINY_MEMORYLLM = dict(kind="memoryllm", num_tokens=4, num_blocks=4, lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def tiny_mplus(llama_dir):
    return MPlus.from_llama(llama_dir, MemoryConfig(**TINY_MPLUS), seed=1)  # N 16, K 4, K0 8


@pytest.fixture(scope="module")
def tiny_memoryllm(llama_dir):
    return MPlus.from_llama(llama_dir, MemoryConfig(**TINY_MEMORYLLM), seed=2)  # N 16, K 4


@pytest.fixture(scope="module")
def tiny_memoryllm_shared(llama_dir):
    return MPlus.from_llama(llama_dir, MemoryConfig(**TINY_MEMORYLLM, drop_memory_per_layer=False), seed=2)


# ----------------------------------------------------------------------------------------------- pure ltm.py

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))), st.integers(0, 2**32 - 1))
def test_draw_drop_partitions_the_rows(n_k, seed):
    n, k = n_k
    kept, gone = draw_drop(n, k, torch.Generator().manual_seed(seed))
    assert kept.shape == (n - k,) and gone.shape == (k,)
    assert torch.equal(kept, kept.sort().values) and torch.equal(gone, gone.sort().values)
    assert torch.equal(torch.cat((kept, gone)).sort().values, torch.arange(n))  # disjoint and covering
    again = draw_drop(n, k, torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], kept) and torch.equal(again[1], gone)  # the generator alone decides


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))), st.integers(0, 2**32 - 1))
def test_write_block_keeps_survivor_order_and_appends_the_block(n_k, seed):
    n, k = n_k
    g = torch.Generator().manual_seed(seed)
    stm = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i: its identity
    ages = torch.randint(0, 1000, (n,), generator=g)
    new = -1 - torch.arange(k, dtype=torch.float32)[:, None].repeat(1, 3)
    kept, _ = draw_drop(n, k, g)
    rows, row_ages = stm.clone(), ages.clone()
    write_block(rows, row_ages, new, kept)  # in place
    assert rows.shape == stm.shape and row_ages.shape == ages.shape
    assert torch.equal(rows[:n - k, 0].long(), kept)  # survivors, in their old (ascending) order
    assert torch.equal(rows[n - k:], new)
    assert torch.equal(row_ages[:n - k], ages[kept])
    assert row_ages[n - k:].tolist() == list(range(k - 1, -1, -1))


RF_VALUES = (0.25, 0.5, 1.0, 1.005, 1.02, 1.5, 2.0, 3.0, 7.3)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(RF_VALUES), max_size=30), st.integers(0, 20), st.integers(0, 25),
       st.sampled_from((1.0, 2.0, 3.0, 10.0, 0.5)), st.sampled_from((1.0, 0.5, 2.0, 0.25)), st.integers(0, 2**32 - 1))
def test_merge_time_to_live(rf_list, n_cache, min_rows, initial_rf, decay, seed):
    g = torch.Generator().manual_seed(seed)
    S, c = len(rf_list), n_cache
    ident = torch.arange(S + c, dtype=torch.float32)  # rows, keys and ages all encode the row's identity
    rows, keys = ident[:, None].repeat(1, 4), 1000 + ident[:, None].repeat(1, 2)
    ages_all = torch.randint(0, 10**6, (S + c,), generator=g)
    rf = torch.tensor(rf_list, dtype=torch.float64)
    out_rows, out_keys, out_ages, out_rf = merge(rows[:S], keys[:S], ages_all[:S], rf, rows[S:], keys[S:], ages_all[S:],
                                                initial_rf=initial_rf, decay=decay, min_rows=min_rows)
    n = out_rows.shape[0]
    assert out_keys.shape[0] == n and out_ages.shape == (n,) and out_rf.shape == (n,)
    assert out_rf.dtype == torch.float64 and out_ages.dtype == ages_all.dtype
    ids = out_rows[:, 0].long()
    assert torch.equal(ids, ids.sort().values)  # storage order = insertion order, the cache after the LTM
    assert torch.equal(out_rows, rows[ids]) and torch.equal(out_keys, keys[ids]) and torch.equal(out_ages, ages_all[ids])
    before = torch.cat((rf, torch.full((c,), initial_rf, dtype=torch.float64)))  # rf before the decrement
    after = before - decay
    alive = after > 0.01
    if int(alive.sum()) > min_rows:  # eviction: exactly the expired rows go; never down to K0 rows or fewer
        assert torch.equal(ids, alive.nonzero()[:, 0])
        assert torch.equal(out_rf, after[ids])
        assert n >= min_rows + 1
        assert (out_rf[ids >= S] == initial_rf - decay).all()  # new rows: initial rf, decayed once
    else:  # nothing evicted, the decrement undone
        assert n == S + c
        torch.testing.assert_close(out_rf, before, rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 60), st.integers(0, 200))
def test_cyclic_candidates(n, k0):
    with time_limit(5):
        got = cyclic_candidates(n, k0)
    if n == 0:
        assert got.numel() == 0
        return
    assert got.shape == (k0,) and got.dtype == torch.long
    reps = math.ceil(k0 / n) + 1
    assert got.tolist() == [i % n for i in range(reps * n)][reps * n - k0:]  # last k0 of 0..n-1 repeated
    if k0 >= n:
        assert set(got.tolist()) == set(range(n))  # every LTM row is fed
        assert got[-1] == n - 1  # the newest row comes last


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40))
def test_order_by_age(ages_list):
    ages = torch.tensor(ages_list, dtype=torch.long)
    order = order_by_age(ages)
    assert sorted(order.tolist()) == list(range(len(ages_list)))
    ordered = ages[order].tolist()
    for i in range(len(ordered) - 1):
        assert ordered[i] >= ordered[i + 1]  # oldest first
        if ordered[i] == ordered[i + 1]:
            assert order[i] > order[i + 1]  # ties: the later candidate first


# ----------------------------------------------------------------------------------------------- row tracking

def match_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The index in old [N, d] of every row of new [M, d], by exact equality; each must occur exactly once."""
    eq = (new[:, None, :] == old[None, :, :]).all(-1)  # [M, N]
    assert (eq.sum(1) == 1).all(), "an STM row after the update is not exactly one row from before it"
    return eq.long().argmax(1)


def observe_update(model: MPlus, old_stm, old_ages, state, delta) -> list[torch.Tensor]:
    """Check one STM update per layer; returns the dropped row indices per layer (ascending)."""
    K, N = model.memory_config.num_tokens, model.memory_config.stm_size
    assert state.stm.shape == old_stm.shape and state.stm_ages.shape == old_ages.shape
    assert delta.shape == (old_stm.shape[0], K, old_stm.shape[2])
    dropped = []
    for l in range(old_stm.shape[0]):
        kept = match_rows(old_stm[l], state.stm[l, :N - K])
        assert (kept[1:] > kept[:-1]).all(), "the survivors changed order"
        assert torch.equal(state.stm[l, N - K:], delta[l])  # the new block, appended
        assert torch.equal(state.stm_ages[l, :N - K], old_ages[l, kept])  # survivors keep their ages
        assert state.stm_ages[l, N - K:].tolist() == list(range(K - 1, -1, -1))
        gone = torch.tensor(sorted(set(range(N)) - set(kept.tolist())), dtype=torch.long)
        assert gone.numel() == K  # exactly K rows replaced
        dropped.append(gone)
    return dropped


def keys_of(model: MPlus, l: int, rows: torch.Tensor) -> torch.Tensor:
    layer = model.model.layers[l]
    with torch.no_grad():
        return layer.self_attn.key_proj(layer.input_layernorm(rows))


class Shadow:
    """The LTM and dropped-row cache as docs/algorithm.md §4 says they evolve, written independently."""

    def __init__(self, model: MPlus, state):
        self.model, self.mem = model, model.memory_config
        self.ltm = [m.rows.clone() for m in state.ltm]
        self.keys = [m.keys.clone() for m in state.ltm]
        self.ages = [m.ages.tolist() for m in state.ltm]
        self.rf = [m.rf.tolist() for m in state.ltm]
        self.c_rows = [m.cache.rows.clone() for m in state.ltm]
        self.c_keys = [m.cache.keys.clone() for m in state.ltm]
        self.c_ages = [m.cache.ages.tolist() for m in state.ltm]
        self.step = state.update_step
        self.evicted = [False] * len(self.ltm)

    def update(self, old_stm, old_ages, dropped):
        K = self.mem.num_tokens
        for l, gone in enumerate(dropped):
            self.ages[l] = [a + K for a in self.ages[l]]  # everything that left the STM ages by K
            self.c_ages[l] = [a + K for a in self.c_ages[l]] + old_ages[l, gone].tolist()  # the new ones not yet
            self.c_rows[l] = torch.cat((self.c_rows[l], old_stm[l, gone]))
            self.c_keys[l] = torch.cat((self.c_keys[l], keys_of(self.model, l, old_stm[l, gone])))
        self.step += K
        self.evicted = [False] * len(self.ltm)
        if self.step >= self.mem.update_ltm_frequency * K:
            for l in range(len(self.ltm)):
                self._merge(l)
            self.step = 0

    def _merge(self, l):
        rows, keys = torch.cat((self.ltm[l], self.c_rows[l])), torch.cat((self.keys[l], self.c_keys[l]))
        ages = self.ages[l] + self.c_ages[l]
        rf = self.rf[l] + [self.mem.initial_rf_when_moving_stm_to_ltm] * len(self.c_ages[l])
        decayed = [r - self.mem.decay_frequency for r in rf]
        alive = [i for i, r in enumerate(decayed) if r > 0.01]
        if len(alive) > self.mem.ltm_retrieved:
            self.evicted[l] = len(alive) < len(rf)
            rows, keys = rows[alive], keys[alive]
            ages, rf = [ages[i] for i in alive], [decayed[i] for i in alive]
        self.ltm[l], self.keys[l], self.ages[l], self.rf[l] = rows, keys, ages, rf
        self.c_rows[l], self.c_keys[l], self.c_ages[l] = rows[:0], keys[:0], []

    def compare(self, state):
        assert state.update_step == self.step
        for l, m in enumerate(state.ltm):
            assert torch.equal(m.rows, self.ltm[l]), f"layer {l}: LTM rows"
            assert m.ages.tolist() == self.ages[l], f"layer {l}: LTM ages"
            torch.testing.assert_close(m.rf, torch.tensor(self.rf[l], dtype=torch.float64), rtol=0, atol=1e-9)
            torch.testing.assert_close(m.keys, self.keys[l], rtol=1e-5, atol=1e-5)
            assert torch.equal(m.cache.rows, self.c_rows[l]), f"layer {l}: cached rows"
            assert m.cache.ages.tolist() == self.c_ages[l], f"layer {l}: cached ages"
            torch.testing.assert_close(m.cache.keys, self.c_keys[l], rtol=1e-5, atol=1e-5)
            if self.evicted[l]:  # an eviction never leaves K0 rows or fewer
                assert len(m) >= self.mem.ltm_retrieved + 1


def check_retrieval(model: MPlus, state, g: torch.Generator, n_queries: int):
    """retrieve() on random layer inputs: K0 rows (or the cyclic fill), the top K0 by relevance, oldest first."""
    k0, d = model.memory_config.ltm_retrieved, model.config.hidden_size
    for l in range(state.num_layers):
        x = torch.randn(n_queries, d, generator=g)
        with torch.no_grad():
            got = model.retrieve(state, l, x)
        source, index, m = got.source, got.index, state.ltm[l]
        n_ltm = len(m)
        assert source.shape == index.shape
        assert set(source.tolist()) <= {0, 1}
        ages = torch.stack([(m.ages if s == 0 else m.cache.ages)[i]
                            for s, i in zip(source.tolist(), index.tolist())]) if source.numel() else torch.zeros(0)
        assert torch.equal(got.ages, ages)
        assert torch.equal(got.rows, torch.stack([(m.rows if s == 0 else m.cache.rows)[i] for s, i in
                                                  zip(source.tolist(), index.tolist())]) if source.numel() else got.rows)
        assert (ages[:-1] >= ages[1:]).all(), "retrieved rows are not oldest first"
        if n_ltm >= k0:
            assert source.shape == (k0,)
            flat = index + source * n_ltm  # position in [LTM ; cache]
            assert flat.unique().numel() == k0  # no row twice
            assert (index < torch.tensor([n_ltm, len(m.cache)])[source]).all()
            layer = model.model.layers[l]
            with torch.no_grad():
                scores = relevance(layer.self_attn.query_proj(layer.input_layernorm(x)),
                                   torch.cat((m.keys, m.cache.keys)))
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            chosen[flat] = True
            if (~chosen).any():
                assert scores[chosen].min() >= scores[~chosen].max() - 1e-6, "not the top K0 by relevance"
        else:  # cyclic fill of the LTM alone
            assert (source == 0).all()
            assert sorted(index.tolist()) == sorted(cyclic_candidates(n_ltm, k0).tolist())


chunks_strategy = st.lists(st.lists(st.integers(0, 255), min_size=16, max_size=40), min_size=1, max_size=8)


@settings(max_examples=25, **SLOW)
@given(chunks_strategy, st.integers(0, 2**31 - 1))
def test_updates_follow_every_row(official, chunks, seed):
    state = official.initial_state(seed)
    shadow = Shadow(official, state)
    g = torch.Generator().manual_seed(seed)
    K, freq = official.memory_config.num_tokens, official.memory_config.update_ltm_frequency
    for i, chunk in enumerate(chunks, start=1):
        old_stm, old_ages = state.stm.clone(), state.stm_ages.clone()
        delta = official.inject(state, chunk)
        assert state.stm_kv is None  # the cached [bos; STM] keys/values are invalid now
        dropped = observe_update(official, old_stm, old_ages, state, delta)
        shadow.update(old_stm, old_ages, dropped)
        shadow.compare(state)
        if any(shadow.evicted):
            event("a merge evicted rows")
        assert state.update_step == (i % freq) * K  # update_step cycles
        check_retrieval(official, state, g, n_queries=1 + i)


@settings(max_examples=10, **SLOW)
@given(chunks_strategy, st.integers(0, 2**31 - 1), st.integers(0, 15))
def test_small_ltm_uses_the_cyclic_fill(official, chunks, seed, ltm_rows):
    state = official.initial_state(seed)
    for chunk in chunks[:1]:
        official.inject(state, chunk)  # leaves rows in the cache, which the cyclic fill ignores
    for m in state.ltm:
        m.rows, m.keys, m.ages, m.rf = m.rows[:ltm_rows], m.keys[:ltm_rows], m.ages[:ltm_rows], m.rf[:ltm_rows]
    with time_limit(20):
        check_retrieval(official, state, torch.Generator().manual_seed(seed), n_queries=5)
        logits = official(state, chunks[0][:8])
    assert logits.shape == (1, 8, official.config.vocab_size) and torch.isfinite(logits).all()


def snapshot(state):
    fields = [state.stm, state.stm_ages]
    for l, m in enumerate(state.ltm or []):
        fields += list(m.tensors(l).values())
    return [x.clone() for x in fields], state.update_step, state.generator.get_state()


def same_snapshot(a, b) -> bool:
    return (len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
            and torch.equal(a[2], b[2]))


@settings(max_examples=8, **SLOW)
@given(chunks_strategy, st.integers(0, 2**31 - 1))
def test_copied_state_evolves_independently(official, chunks, seed):
    state = official.initial_state(seed)
    official.inject(state, chunks[0])
    before = snapshot(state)
    twin, other = state.copy(), state.copy()
    assert same_snapshot(snapshot(twin), before)
    for chunk in chunks:
        official.inject(twin, chunk)
        official.inject(other, chunk)
    assert same_snapshot(snapshot(state), before), "injecting into a copy changed the original"
    assert same_snapshot(snapshot(twin), snapshot(other)), "the same chunks and seed gave different states"
    official.inject(state, chunks[0])  # and the original evolves without touching its copies
    assert same_snapshot(snapshot(twin), snapshot(other))


# ----------------------------------------------------------------------------------------------- MemoryLLM

def run_memoryllm(model: MPlus, state, chunks) -> list[list[torch.Tensor]]:
    drops = []
    for chunk in chunks:
        old_stm, old_ages = state.stm.clone(), state.stm_ages.clone()
        delta = model.inject(state, chunk)
        drops.append(observe_update(model, old_stm, old_ages, state, delta))
        assert state.ltm is None
        assert state.stm.shape == (model.config.num_hidden_layers, model.memory_config.stm_size, model.config.hidden_size)
        assert not state.has_ltm
    return drops


small_chunks = st.lists(st.lists(st.integers(3, 96), min_size=16, max_size=40), min_size=1, max_size=5)  # no BOS (1) first


@settings(max_examples=10, **SLOW)
@given(small_chunks, st.integers(0, 2**31 - 1))
def test_memoryllm_mode_of_an_mplus_model(tiny_mplus, chunks, seed):
    state = tiny_mplus.initial_state(seed).without_ltm()
    run_memoryllm(tiny_mplus, state, chunks)
    got = tiny_mplus.retrieve(state, 0, torch.randn(3, tiny_mplus.config.hidden_size))
    assert len(got) == 0 and got.rows.shape == (0, tiny_mplus.config.hidden_size)
    assert torch.isfinite(tiny_mplus(state, chunks[0][:5])).all()


def test_memoryllm_from_llama_state_has_no_ltm(tiny_memoryllm):
    state = tiny_memoryllm.initial_state()
    assert not state.has_ltm and state.ltm is None
    assert torch.isfinite(tiny_memoryllm(state, [5, 6, 7])).all()


@settings(max_examples=10, **SLOW)
@given(small_chunks, st.integers(0, 2**31 - 1))
def test_memoryllm_model(tiny_memoryllm, tiny_memoryllm_shared, chunks, seed):
    state = tiny_memoryllm.initial_state(seed)
    run_memoryllm(tiny_memoryllm, state, chunks)
    assert torch.isfinite(tiny_memoryllm(state, chunks[0][:5])).all()
    for drop in run_memoryllm(tiny_memoryllm_shared, tiny_memoryllm_shared.initial_state(seed), chunks):
        assert all(torch.equal(drop[0], d) for d in drop), "drop_memory_per_layer=False must drop the same rows"


def test_memoryllm_drops_per_layer_by_default(tiny_memoryllm):
    drops = run_memoryllm(tiny_memoryllm, tiny_memoryllm.initial_state(7), [list(range(20, 40))] * 4)
    assert any(not torch.equal(d[0], d[1]) for d in drops)  # independent draws: C(16, 4) = 1820 choices each


# ----------------------------------------------------------------------------------------------- STM K/V cache

@settings(max_examples=10, **SLOW)
@given(st.lists(st.integers(0, 255), min_size=16, max_size=30), st.lists(st.integers(0, 255), min_size=1, max_size=12),
       st.integers(0, 2**31 - 1))
def test_stm_kv_cache_is_reused_and_invalidated(official, chunk, prompt, seed):
    state = official.initial_state(seed)
    assert state.stm_kv is None
    first = official(state, prompt)
    assert state.stm_kv is not None and all(kv is not None for kv in state.stm_kv.kv)
    cached = [kv[0] for kv in state.stm_kv.kv]
    second = official(state, prompt)
    assert torch.equal(first, second)
    assert all(kv[0] is k for kv, k in zip(state.stm_kv.kv, cached)), "the cached keys/values were recomputed"
    official.inject(state, chunk)
    assert state.stm_kv is None
    after = official(state, prompt)
    fresh = state.copy()
    assert fresh.stm_kv is None
    torch.testing.assert_close(after, official(fresh, prompt), rtol=0, atol=0)
    assert not torch.equal(after, first)  # the memory did change


def test_stm_kv_cache_belongs_to_the_model_that_computed_it(official):
    """Two models of the same shape with different read adapters read one state: each gets the logits it gets on
    a fresh copy (exactly), whoever read the state before; so does a model whose weights changed in place."""
    other = MPlus.from_pretrained(CHECKPOINT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".lora_B.decoder_adapter." in name:  # the read adapter, which computes the [bos; STM] keys/values
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state, prompt = official.initial_state(0), [5, 6, 7, 8]
    want_official, want_other = official(state.copy(), prompt), other(state.copy(), prompt)
    assert not torch.allclose(want_official, want_other, atol=1e-3)  # the weights matter
    assert torch.equal(official(state, prompt), want_official)  # fills the cache
    assert torch.equal(other(state, prompt), want_other), "another model reused the cached keys/values"
    assert torch.equal(official(state, prompt), want_official)
    assert torch.equal(other(state, prompt), want_other)  # the cache is other's now
    with torch.no_grad():
        other.bos_embedding.add_(0.5)  # an in-place change, as an optimiser step makes
    assert torch.equal(other(state, prompt), other(state.copy(), prompt)), "stale keys/values after a weight change"
    other.requires_grad_(True)
    before = state.stm_kv
    other.read_logits(state, prompt).sum().backward()  # gradients on: computed afresh, not cached
    assert state.stm_kv is before and other.bos_embedding.grad is not None and other.bos_embedding.grad.abs().sum() > 0


def test_text_instead_of_token_ids_says_to_encode_it(tiny_mplus):
    state = tiny_mplus.initial_state()
    for call in (lambda: tiny_mplus.inject(state, "some text"), lambda: tiny_mplus.generate(state, "some text"),
                 lambda: tiny_mplus(state, "some text")):
        with pytest.raises(TypeError, match="encode the text with the model's tokenizer"):
            call()


def test_state_repr_is_one_line(official, tiny_memoryllm):
    state = official.initial_state(0)
    official.inject(state, list(range(20, 40)))  # K = 8 rows dropped into each layer's cache
    text = repr(state)  # the checkpoint stores 20 LTM rows per layer; totals are over the 3 layers
    assert text == "MemoryState(M+, 3 layers, STM 32 rows x d=64, LTM 60 rows + 24 cached, update_step 8)", text
    assert repr(tiny_memoryllm.initial_state()) == "MemoryState(MemoryLLM, 2 layers, STM 16 rows x d=48, update_step 0)"


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_refused(tiny_mplus, tiny_memoryllm, official):
    model, state = tiny_mplus, tiny_mplus.initial_state()
    ok = list(range(3, 3 + MIN_CHUNK))
    with pytest.raises(ValueError, match="empty"):
        model.inject(state, [])
    with pytest.raises(ValueError, match="at least 16"):
        model.inject(state, ok[:10])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.inject(state, ok[:-1] + [97])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(state, [-1, 5])
    with pytest.raises(ValueError, match="starts with BOS"):
        model(state, [1, 5, 6])
    with pytest.raises(ValueError, match="starts with BOS"):
        model.inject(state, [1] + ok)
    with pytest.raises(ValueError, match="starts with BOS"):
        model.generate(state, [1, 5, 6], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        model(state, [1], strip_bos=True)
    with pytest.raises(ValueError, match="another model"):
        model(official.initial_state(), [5, 6])
    with pytest.raises(ValueError, match="another model"):
        official.inject(state, ok)
    with pytest.raises(ValueError, match="long-term memory"):
        tiny_memoryllm(state, [5, 6])  # same STM shape, but an M+ state on a MemoryLLM model
    untouched = snapshot(state)
    torch.testing.assert_close(model(state, [1, 5, 6], strip_bos=True), model(state, [5, 6]), rtol=0, atol=0)
    assert model.inject(state.copy(), ok[:10], allow_short=True).shape == (2, 4, 48)
    assert model.inject(state.copy(), [1] + ok, strip_bos=True).shape == (2, 4, 48)
    assert same_snapshot(snapshot(state), untouched)  # refused calls left the state alone


# ----------------------------------------------------------------------------------------------- generation

def check_greedy_against_forward(model: MPlus, state, prompt: list[int], n_new: int):
    """Greedy decoding with the cache = repeated argmax of a full forward (valid where retrieval does not depend
    on the prompt: no LTM, or the cyclic fill)."""
    new = model.generate(state, prompt, max_new_tokens=n_new, stop_ids=())
    assert len(new) == n_new
    seq = list(prompt)
    for token in new:
        logits = model(state, seq)[0, -1]
        assert logits[token] >= logits.max() - 1e-4, "a greedy token is not the argmax of the uncached forward"
        seq.append(token)


@settings(max_examples=8, **SLOW)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=12), small_chunks, st.integers(0, 2**31 - 1))
def test_generation(official, prompt, chunks, seed):
    state = official.initial_state(seed)
    for chunk in chunks[:3]:
        official.inject(state, [t % 256 for t in chunk])
    before = snapshot(state)
    greedy = official.generate(state, prompt, max_new_tokens=6, stop_ids=())
    first = official(state, prompt)[0, -1]
    assert first[greedy[0]] >= first.max() - 1e-4  # retrieval happens once, from the prompt
    assert official.generate(state, prompt, max_new_tokens=6, stop_ids=()) == greedy
    sample = lambda s: official.generate(state, prompt, max_new_tokens=6, stop_ids=(), temperature=0.9,  # noqa: E731
                                         top_p=0.95, generator=torch.Generator().manual_seed(s))
    assert sample(seed) == sample(seed)
    assert same_snapshot(snapshot(state), before), "generation changed the memory"
    check_greedy_against_forward(official, state.without_ltm(), prompt, 4)
    small = state.copy()
    for m in small.ltm:
        m.rows, m.keys, m.ages, m.rf = m.rows[:12], m.keys[:12], m.ages[:12], m.rf[:12]
    check_greedy_against_forward(official, small, prompt, 4)


def test_empty_ltm_does_not_hang(tiny_mplus):
    state = tiny_mplus.initial_state(3)
    assert all(len(m) == 0 for m in state.ltm)
    d = tiny_mplus.config.hidden_size
    with time_limit(30):
        for step in range(2):  # before any update, then with rows in the cache but none in the LTM
            for l in range(state.num_layers):
                assert len(tiny_mplus.retrieve(state, l, torch.randn(4, d))) == 0
            assert torch.isfinite(tiny_mplus(state, [5, 6, 7])).all()
            check_greedy_against_forward(tiny_mplus, state, [5, 6, 7], 4)
            tiny_mplus.inject(state, list(range(10, 30)))
    # the first merge brought 2K = 8 = K0 rows: not more than K0 survive, so nothing expires and the decay is undone
    assert state.update_step == 0 and all(len(m) == 8 for m in state.ltm)
    assert all((m.rf == 2.0).all() for m in state.ltm)


# ----------------------------------------------------------------------------------------------- bench

def test_bench_memory_runs(capsys):
    from mplus.apps.bench_memory import main

    assert main(["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
                 "--vocab", "64", "--k", "4", "--stm-blocks", "4", "--ltm-blocks", "2", "--ltm-rows", "16",
                 "--selector-dim", "8", "--questions", "2", "--prompt-len", "5", "--new-tokens", "3",
                 "--sizes", "100,1000", "--queries", "4", "--k0", "8", "--repeats", "1",
                 "--mid-layers", "2", "--mid-hidden", "32", "--mid-intermediate", "64", "--mid-k", "4",
                 "--mid-stm-blocks", "4", "--mid-ltm-blocks", "2", "--mid-ltm-rows", "40", "--chunk-len", "16",
                 "--sweep-layers", "1", "--sweep-k0", "16", "--sweep-sizes", "20,200"]) == 0
    out = capsys.readouterr().out
    assert "answers identical on both paths: yes" in out and "speed-up" in out and "ms per 10^6 rows" in out
    assert "answer, repeated question" in out and "gather the K0 rows" in out and "key scoring ms" in out
