"""Our Llama against transformers' LlamaForCausalLM on tiny random configs (fp32 within 1e-4, bf16 within 1e-2)."""
import pytest
import torch

from hf_oracle import LLAMA3_SCALING, LlamaForCausalLM, hf_logits, random_hf_llama
from mplus import Llama
from mplus.llama.rope import default_inv_freq

FP32_TOL = 1e-4
# bf16 logits here are of magnitude ~4, where one bf16 ulp is 2**-6 = 0.0156; bf16 itself is off fp32 by ~5e-2.
BF16_TOL = {False: 1e-2,  # plain layout: the same operations as transformers
            True: 2 ** -5}  # packed layout (packing.py): another summation order may move a logit by an ulp

CONFIGS = {
    "gqa1-default-rope": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2-llama3-rope": dict(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "gqa3-tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "head-dim-not-hidden-over-heads": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=2),
    "linear-rope-3-layers": dict(num_hidden_layers=3, rope_scaling=dict(rope_type="linear", factor=1.8125)),
    "gqa3-llama3-untied-head-dim": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                        rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
}
# 300 positions: far beyond the llama3 configs' original_max_position_embeddings of 64.
SEQ = 300


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = random_hf_llama(seed=len(request.param), **CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("packed", [False, True])
def test_fp32_logits_match_transformers(pair, packed):
    hf, folder = pair
    ours = Llama.from_pretrained(folder, packed=packed)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, ids)
    got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_logits_match_transformers_bf16(pair, packed):
    _, folder = pair
    hf16 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = Llama.from_pretrained(folder, dtype=torch.bfloat16, packed=packed)
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(2))
    assert (ours(ids) - hf_logits(hf16, ids)).abs().max().item() <= BF16_TOL[packed]


def test_wrong_rope_would_be_caught(tmp_path):
    """Negative control: the llama3 config with plain (unscaled) frequencies misses the 1e-4 tolerance."""
    hf = random_hf_llama(seed=3, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ours.inv_freq = default_inv_freq(ours.config.head_dim, ours.config.rope_theta)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() > 100 * FP32_TOL
