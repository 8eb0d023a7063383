"""M+ on a CUDA device with the long-term memory in host memory (docs/placement.md), against the CPU path.

Run with `make test-gpu` (pytest -m gpu); skipped where torch sees no CUDA device. A tiny random M+ (from_llama
around a tiny random Llama: L=2, N=16, K=4, K0=8, d=48, d_s=8, a merge every 2 updates) is saved once and loaded
twice, on the CPU and on the GPU; the same chunks go into both (the STM drops come from the same CPU generator),
enough for several LTM merges, then a question is asked.

Tolerances: fp32, 1e-4 on logits and states (CUDA matmuls sum in another order than the CPU's). bf16 keeps 8
significant bits and rounds every matmul differently on each side, so its logits are only held to 10% of their
largest magnitude (bf16 against fp32 on the CPU differs by about 12%), and its retrieval picks, which close
scores may swap (the K0-th and next scores differ by under 0.01 here), are not compared.
"""
from __future__ import annotations

import time

import pytest
import torch

from mplus.memory import placement as placement_module
from mplus.memory.config import MemoryConfig
from mplus.memory.mplus import MPlus
from tiny import tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY_MPLUS = dict(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2, lora_r=4, lora_alpha=8.0,
                  selector_hidden_dim=8, update_ltm_frequency=2, initial_rf_when_moving_stm_to_ltm=2.0)
K0, D = 8, 48
CHUNKS = [list(range(3 + 5 * i, 23 + 5 * i)) for i in range(9)]  # 9 updates, 4 merges
PROMPT = list(range(30, 44))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=3).save_pretrained(base)
    model = MPlus.from_llama(base, MemoryConfig(**TINY_MPLUS), seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # from_llama starts the adapters at B = 0 and the retriever at N(0, 0.02), which scores
        for name, p in model.named_parameters():  # every row about 0.5: near-ties that rounding would reorder
            if ".lora_B." in name or "query_proj" in name or "key_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if ".lora_B." in name else 0.3))
    out = tmp_path_factory.mktemp("tiny-mplus")
    model.save_pretrained(out)
    return out


def run(model: MPlus):
    """The state after CHUNKS, the question's logits [T, V] and what each layer retrieved."""
    state = model.initial_state(seed=0)
    for chunk in CHUNKS:
        model.inject(state, chunk)
    record = []
    logits = model(state, PROMPT, record=record)[0]
    return state, logits, [r["retrieved"] for r in record]


@pytest.mark.parametrize("ltm_keys", ["device", "host"])
def test_cuda_matches_cpu_in_fp32(folder, ltm_keys):
    cpu_state, cpu_logits, cpu_got = run(MPlus.from_pretrained(folder))
    gpu = MPlus.from_pretrained(folder, device="cuda", ltm_keys=ltm_keys)
    state, logits, got = run(gpu)
    assert state.stm.is_cuda and not state.ltm[0].rows.is_cuda and state.ltm[0].keys.is_cuda == (ltm_keys == "device")
    assert sum(len(m) for m in state.ltm) > 2 * K0  # merges happened, and retrieval scored rather than cycled
    assert [len(m) for m in state.ltm] == [len(m) for m in cpu_state.ltm]
    torch.testing.assert_close(state.stm.cpu(), cpu_state.stm, rtol=0, atol=1e-4)
    for m, c in zip(state.ltm, cpu_state.ltm):
        torch.testing.assert_close(m.rows, c.rows, rtol=0, atol=1e-4)
        torch.testing.assert_close(m.keys.cpu(), c.keys, rtol=0, atol=1e-4)
    for g, c in zip(got, cpu_got):
        assert torch.equal(g.picks, c.picks) and g.rows.is_cuda
    print(f"\nfp32 ({ltm_keys} keys): max |logit difference| {(logits.cpu() - cpu_logits).abs().max():.2e}")
    torch.testing.assert_close(logits.cpu(), cpu_logits, rtol=0, atol=1e-4)


def test_cuda_matches_cpu_in_bf16(folder):
    _, cpu_logits, _ = run(MPlus.from_pretrained(folder, dtype=torch.bfloat16))
    state, logits, _ = run(MPlus.from_pretrained(folder, dtype=torch.bfloat16, device="cuda"))
    diff = (logits.cpu() - cpu_logits).abs().max()
    print(f"\nbf16: max |logit difference| {diff:.3g} of max |logit| {cpu_logits.abs().max():.3g}")
    assert state.stm.dtype == torch.bfloat16 and diff <= 0.1 * cpu_logits.abs().max()


def test_only_pinned_retrieved_rows_cross(folder, monkeypatch):
    gpu = MPlus.from_pretrained(folder, device="cuda")
    state = gpu.initial_state()
    for chunk in CHUNKS:
        gpu.inject(state, chunk)
    seen = []
    transfer = placement_module.transfer
    monkeypatch.setattr(placement_module, "transfer", lambda t, device: seen.append(t) or transfer(t, device))
    gpu(state, PROMPT)
    to_device = [t for t in seen if t.shape[-1] == D]
    assert [tuple(t.shape) for t in to_device] == [(K0, D)] * gpu.config.num_hidden_layers
    assert all(t.is_pinned() for t in to_device)


def test_decode_speed(folder):
    for device in ("cpu", "cuda"):
        model = MPlus.from_pretrained(folder, device=device)
        state = model.initial_state()
        for chunk in CHUNKS:
            model.inject(state, chunk)
        model.generate(state, PROMPT, max_new_tokens=4)  # warm-up
        n = 64
        start = time.perf_counter()
        out = model.generate(state, PROMPT, max_new_tokens=n, stop_ids=[])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"\n{device}: {len(out)} tokens in {seconds:.3f} s, {len(out) / seconds:.1f} tok/s (prompt included)")
        assert len(out) == n
