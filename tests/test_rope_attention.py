"""RoPE, the causal mask and attention against independent references (float64 golden values, float64 math)."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mplus.llama.config import RopeScaling
from mplus.llama.layers import attend, causal_mask, rms_norm
from mplus.llama.rope import apply_rope, default_inv_freq, llama3_scale, rope_cos_sin

LLAMA31 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


def test_llama31_inverse_frequencies_match_spec_golden_values():
    """Golden float64 values of Llama-3.1's scaled RoPE frequencies (d = 128, theta = 500000); fp32 within 1e-6 rel."""
    f = llama3_scale(default_inv_freq(128, 500000.0), LLAMA31).double()
    golden = {0: 1.0, 1: 0.8146172338565447, 28: 0.003211445994752591, 29: 0.002166570763503359,
              32: 0.0005248461609929547, 34: 0.0001785078127679964, 35: 9.556212353964683e-05,
              63: 3.068925988914511e-07}
    for i, value in golden.items():
        assert math.isclose(f[i].item(), value, rel_tol=1e-6), i
    assert math.isclose(f.sum().item(), 5.386058200728573, rel_tol=1e-6)
    base = default_inv_freq(128, 500000.0)
    assert (f[:29] == base[:29].double()).all()  # 29 unchanged high frequencies
    assert torch.allclose(f[35:], base[35:].double() / 8)  # 29 divided by 8


def test_rope_rotation_matches_pairwise_formula():
    """rotate_half form: pair i = (x[i], x[i + D/2]) rotated by angle p * f_i, checked in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 5, 16, generator=g, dtype=torch.float64)
    f = default_inv_freq(16, 10000.0)
    pos = torch.tensor([0, 3, 7, 100, 4000])
    cos, sin = rope_cos_sin(f, pos)
    got = apply_rope(x, cos.double(), sin.double())
    for t, p in enumerate(pos.tolist()):
        for i in range(8):
            a, b, phi = x[0, 0, t, i], x[0, 0, t, i + 8], p * f[i].item()
            assert math.isclose(got[0, 0, t, i], a * math.cos(phi) - b * math.sin(phi), abs_tol=1e-4)
            assert math.isclose(got[0, 0, t, i + 8], a * math.sin(phi) + b * math.cos(phi), abs_tol=1e-4)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g, dtype=torch.float64)
    f = llama3_scale(default_inv_freq(32, 500000.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)).double()

    def score(a, b):
        ca, sa = rope_cos_sin(f, torch.tensor([a]))
        cb, sb = rope_cos_sin(f, torch.tensor([b]))
        return (apply_rope(q, ca.double(), sa.double()) * apply_rope(k, cb.double(), sb.double())).sum().item()

    assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-4, abs_tol=1e-4)


@given(t=st.integers(1, 12), extra=st.integers(0, 12))
def test_causal_mask_is_bottom_right_aligned(t, extra):
    s = t + extra
    mask = causal_mask(t, s)
    for i in range(t):
        for j in range(s):
            assert mask[i, j].item() == (j <= s - t + i)


def naive_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(D) + bottom-right mask) v with kv heads repeated as repeat_interleave."""
    H, H_kv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.double().repeat_interleave(H // H_kv, dim=1)
    v = v.double().repeat_interleave(H // H_kv, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.tensor([[j <= S - T + i for j in range(S)] for i in range(T)])
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ v


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 9), past=st.integers(0, 9), groups=st.sampled_from([(2, 2), (4, 2), (6, 2), (3, 1)]),
       seed=st.integers(0, 2**16))
def test_attend_matches_naive_gqa_attention(t, past, groups, seed):
    H, H_kv = groups
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, t, 8, generator=g)
    k, v = torch.randn(2, 1, H_kv, t + past, 8, generator=g)
    assert torch.allclose(attend(q, k, v).double(), naive_attention(q, k, v), atol=1e-5)


def test_rms_norm_casts_before_weight_multiply():
    """bf16: normalise in fp32, cast to bf16, then multiply by the weight (HF and Meta order)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=g) * 3).bfloat16()
    w = (torch.rand(256, generator=g) + 0.5).bfloat16()
    x32 = x.double()
    normed = (x32 / torch.sqrt((x32 ** 2).mean(-1, keepdim=True) + 1e-5)).float().bfloat16()
    assert torch.equal(rms_norm(x, w, 1e-5), w * normed)
