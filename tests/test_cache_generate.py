"""Invariants of the KV cache, the key/value-only prefix and generation, on tiny random models."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mplus.llama.generate import generate, sample_next, top_p_filter
from tiny import tiny_llama

TOL = 1e-4  # fp32: chunked and full forwards sum in different orders
MODEL = tiny_llama(seed=0)


def ids_of(seed, n, batch=1):
    return torch.randint(0, MODEL.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 1000))
def test_cached_chunks_equal_full_forward(n, cuts, seed):
    """Feeding a sequence in arbitrary chunks through the cache gives the full forward's logits."""
    ids = ids_of(seed, n, batch=2)
    full = MODEL(ids)
    bounds = sorted({c for c in cuts if c < n} | {0, n})
    cache = MODEL.new_cache(n, batch_size=2)
    parts = [MODEL(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == n
    assert (torch.cat(parts, dim=1) - full).abs().max() <= TOL


def layer_inputs(model, ids):
    """The hidden states entering every layer in a plain forward, captured with hooks."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0]), with_kwargs=True)
             for layer in model.model.layers]
    model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("offset", [0, 5])
def test_prefix_acts_as_keys_and_values_of_earlier_positions(offset):
    """Running b with prefix[l] = layer l's inputs for a equals the plain forward of [a; b] on b's positions.

    With offset, every position moves by the same amount; RoPE makes attention depend only on differences,
    so the logits stay the same: a check that caller-chosen positions are honoured for prefix and inputs alike.
    """
    a, b = ids_of(1, 7), ids_of(2, 5)
    full = MODEL(torch.cat((a, b), dim=1))
    prefix = [h[:, :7] for h in layer_inputs(MODEL, torch.cat((a, b), dim=1))]
    got = MODEL(b, prefix=prefix, prefix_positions=torch.arange(7) + offset,
                positions=torch.arange(7, 12) + offset)
    assert (got - full[:, 7:]).abs().max() <= 1e-4
    wrong = MODEL(b, prefix=prefix, prefix_positions=torch.arange(7), positions=torch.arange(20, 25))
    assert (wrong - full[:, 7:]).abs().max() > 1e-3  # positions matter: the check above is not vacuous


def test_prefix_is_cached_for_decoding():
    a, b = ids_of(3, 6), ids_of(4, 4)
    prefix = [h[:, :6] for h in layer_inputs(MODEL, torch.cat((a, b), dim=1))]
    full = MODEL(torch.cat((a, b), dim=1))
    cache = MODEL.new_cache(10)
    first = MODEL(b[:, :2], prefix=prefix, cache=cache)
    rest = MODEL(b[:, 2:], cache=cache)
    assert cache.length == 10
    assert (torch.cat((first, rest), 1) - full[:, 6:]).abs().max() <= 1e-4


def test_greedy_generation_equals_argmax_of_full_forwards():
    prompt = ids_of(5, 6)[0].tolist()
    got = generate(MODEL, prompt, max_new_tokens=12, stop_ids=())
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(MODEL(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_generation_stops_at_stop_token_and_streams():
    prompt = ids_of(6, 4)[0].tolist()
    free = generate(MODEL, prompt, max_new_tokens=10, stop_ids=())
    streamed = []
    stopped = generate(MODEL, prompt, max_new_tokens=10, stop_ids=[free[3]], on_token=streamed.append)
    assert stopped == free[:free.index(free[3]) + 1] == streamed


def test_sampling_is_deterministic_given_a_generator():
    prompt = ids_of(7, 4)[0].tolist()
    run = lambda seed: generate(MODEL, prompt, max_new_tokens=15, temperature=1.0, top_p=0.9, stop_ids=(),
                                generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1)
    assert any(run(1) != run(s) for s in (2, 3, 4))


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30), st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_nucleus(weights, top_p):
    probs = torch.tensor(weights, dtype=torch.float64) + 1e-3
    probs /= probs.sum()
    kept = top_p_filter(probs.clone(), top_p)
    assert abs(kept.sum().item() - 1) < 1e-9
    survivors = kept > 0
    assert probs[survivors].max() == probs.max()  # a most likely token survives (ties: any of them)
    ordered = probs.sort(descending=True).values
    n = int(survivors.sum())
    assert ordered[:n - 1].sum() < top_p + 1e-12  # without its least likely member the set falls short
    assert n == len(weights) or ordered[:n].sum() >= top_p - 1e-12


def test_sample_next_greedy_and_temperature():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert sample_next(logits) == 1
    draws = {sample_next(logits, 5.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("bad, error", [
    (torch.tensor([[1, 200]]), "out of range"), (torch.tensor([[-1]]), "out of range"),
    (torch.zeros(1, 0, dtype=torch.long), "length >= 1"), (torch.tensor([1.0, 2.0]), "integer"),
])
def test_bad_token_ids_are_refused_clearly(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        MODEL(bad)


def test_cache_overflow_is_a_clear_error():
    cache = MODEL.new_cache(4)
    with pytest.raises(ValueError, match="KV cache is full"):
        MODEL(ids_of(8, 5), cache=cache)


@pytest.mark.parametrize("with_cache", [False, True])
def test_last_only_equals_last_row_of_full_logits(with_cache):
    ids = ids_of(9, 17, batch=2)
    full = MODEL(ids)
    cache = MODEL.new_cache(18, batch_size=2) if with_cache else None
    got = MODEL(ids, cache=cache, last_only=True)
    assert got.shape == (2, 1, MODEL.config.vocab_size)
    assert (got - full[:, -1:]).abs().max() <= TOL
    if with_cache:  # the last layer still cached every position's keys/values
        step = MODEL(ids_of(10, 1, batch=2), cache=cache)
        assert (step - MODEL(torch.cat((ids, ids_of(10, 1, batch=2)), 1))[:, -1:]).abs().max() <= TOL
