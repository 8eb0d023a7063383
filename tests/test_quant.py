"""int8 weight-only quantization (mplus.llama.quant), bfloat16 loading and the CLI's default --dtype."""
import json
from pathlib import Path

import pytest
import torch

from mplus import Llama
from mplus.apps.cli import main
from mplus.apps.paths import smollm2_dir
from mplus.llama.checkpoint import declared_dtype
from mplus.llama.quant import Int8Linear, quantize
from tiny import tiny_llama

NLL_TEXT = Path(__file__).parent.parent / "bench" / "nll_text.txt"


def test_quantize_rounds_each_weight_to_half_a_step():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize(w)
    assert q.dtype == torch.int8 and s.shape == (64,) and q.abs().max() <= 127
    err = (w - q.float() * s.float()[:, None]).abs()  # [64, 48]
    # Half a step, plus the clamp of a row maximum whose bfloat16 scale rounded down (at most 2^-8 of 127 steps).
    assert (err <= s.float()[:, None] * 0.51).all()
    assert torch.equal(q[5], torch.zeros(48, dtype=torch.int8))
    assert (q.abs().amax(dim=1)[torch.arange(64) != 5] >= 126).all()  # each row uses the full range


@pytest.mark.parametrize("tied", [False, True])
def test_int8_logits_follow_fp32_on_a_tiny_llama(tmp_path, tied):
    model = tiny_llama(seed=0, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    q = Llama.from_pretrained(tmp_path, quantize="int8")
    assert isinstance(q.model.layers[0].self_attn.q_proj, Int8Linear)
    assert q.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids)  # [1, 40, V]
        full = q(ids)  # 40 rows: the dequantize + dense matmul path
        cache = q.new_cache(40)
        steps = torch.cat([q(ids[:, t:t + 1], cache=cache) for t in range(40)], dim=1)  # 1 row: the int8 kernel
    # Weights off by up to half a step of max|row|/127 and bfloat16 activations, through 2 random layers with
    # a gain of ~2 each (measured: rms 5-6%, max 27-37% of the logits' std): rms <= 10%, max <= 50%.
    spread = ref.std()
    for got in (full, steps):
        assert (got - ref).pow(2).mean().sqrt() <= 0.1 * spread
        assert (got - ref).abs().max() <= 0.5 * spread
    assert (full - steps).abs().max() <= 0.25 * spread  # the two paths multiply the same int8 values (measured 11-14%)


def test_int8_model_refuses_to_be_saved(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="int8"):
        Llama.from_pretrained(tmp_path / "a", quantize="int8").save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="quantize"):
        Llama.from_pretrained(tmp_path / "a", quantize="int4")


def test_declared_dtype_reads_torch_dtype(tmp_path):
    for raw, want in [({"torch_dtype": "bfloat16"}, torch.bfloat16), ({"dtype": "float16"}, torch.float16),
                      ({}, torch.float32), ({"torch_dtype": "int4"}, torch.float32), ({"torch_dtype": 16}, torch.float32)]:
        (tmp_path / "config.json").write_text(json.dumps(raw))
        assert declared_dtype(tmp_path) == want, raw


def test_saved_bf16_model_declares_bf16_and_the_cli_loads_it_so(tmp_path, monkeypatch, capsys):
    tiny_llama(vocab_size=2048).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    (tmp_path / "tokenizer.json").write_bytes((Path(__file__).parent.parent / "checkpoints" / "tiny-mplus"
                                               / "tokenizer.json").read_bytes())
    loaded = []
    real = Llama.from_pretrained.__func__
    monkeypatch.setattr(Llama, "from_pretrained", classmethod(
        lambda cls, *a, **kw: loaded.append(kw) or real(cls, *a, **kw)))
    for flag, want in [([], (torch.bfloat16, None)), (["--dtype", "float32"], (torch.float32, None)),
                       (["--dtype", "int8"], (torch.bfloat16, "int8"))]:
        assert main(["generate", "--model", str(tmp_path), "--prompt", "a", "--max-new-tokens", "2", *flag]) == 0
        assert (loaded[-1]["dtype"], loaded[-1].get("quantize")) == want, flag
    capsys.readouterr()


@pytest.mark.real
def test_bf16_and_int8_nll_on_smollm2_stay_near_fp32(artifacts):
    from mplus import Tokenizer
    folder = smollm2_dir()
    ids = torch.tensor([Tokenizer.from_file(folder).encode(NLL_TEXT.read_text())])  # [1, 285]

    def nll(model):
        with torch.inference_mode():
            return torch.nn.functional.cross_entropy(model(ids)[0, :-1].double(), ids[0, 1:]).item()

    fp32 = nll(Llama.from_pretrained(folder))
    # Measured: bf16 -0.002, int8 (bf16 activations) -0.004 nats per token; bound 0.02 nats (2% perplexity).
    assert abs(nll(Llama.from_pretrained(folder, dtype=torch.bfloat16)) - fp32) <= 0.02
    assert abs(nll(Llama.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8")) - fp32) <= 0.02
