"""M+ / MemoryLLM checkpoints: the official layout loads and saves by identity, plain Llama folders become
memory models as the training recipe says, and bad checkpoints are clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import OFFICIAL_TINY
from mplus import ConfigError, MemoryConfig, MPlus, WeightsError, is_memory_checkpoint
from hf_oracle import random_hf_llama
from tiny import tiny_llama

FIXTURE = OFFICIAL_TINY / "checkpoint"
SMALL_MEMORYLLM = MemoryConfig(kind="memoryllm", num_tokens=4, num_blocks=5, lora_r=2, lora_alpha=4)


def test_official_layout_saves_back_identically(tmp_path):
    model = MPlus.from_pretrained(FIXTURE)
    model.save_pretrained(tmp_path)
    original, saved = load_file(FIXTURE / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(original) == set(saved)
    for name, t in original.items():
        assert torch.equal(t, saved[name]), name
    back = MPlus.from_pretrained(tmp_path)
    ids = torch.arange(3, 12)
    assert torch.equal(back(back.initial_state(), ids), model(model.initial_state(), ids))
    assert is_memory_checkpoint(tmp_path) and back.memory_config == model.memory_config


def test_bf16_rope_option_rounds_the_frequencies():
    plain, rounded = MPlus.from_pretrained(FIXTURE), MPlus.from_pretrained(FIXTURE, rope_bf16=True)
    assert torch.equal(rounded.inv_freq, plain.inv_freq.bfloat16().float())
    assert not torch.equal(rounded.inv_freq, plain.inv_freq)


def test_memoryllm_from_llama_recipe_and_round_trip(tmp_path):
    llama = tiny_llama(seed=0)
    llama.save_pretrained(tmp_path / "llama")
    assert not is_memory_checkpoint(tmp_path / "llama")
    model = MPlus.from_llama(tmp_path / "llama", SMALL_MEMORYLLM, seed=5)
    assert model.memory_config.kind == "memoryllm" and not model.initial_state().has_ltm
    layer = model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.base_layer.weight, llama.model.layers[0].self_attn.q_proj.weight)
    assert torch.count_nonzero(layer.mlp.up_proj.lora_B["default"].weight) == 0  # B = 0: adapters start as no-ops
    assert torch.equal(model.bos_embedding[1, 0], llama.model.embed_tokens.weight[1])  # BOS embedding, every layer
    assert torch.count_nonzero(model.new_memory_positional_emb) == 0
    model.save_pretrained(tmp_path / "memoryllm")
    assert "add_selector" not in json.loads((tmp_path / "memoryllm" / "config.json").read_text())
    state_file = load_file(tmp_path / "memoryllm" / "model.safetensors")
    state_file["initialized"] = torch.ones((), dtype=torch.uint8)  # official MemoryLLM buffer: informational
    save_file(state_file, tmp_path / "memoryllm" / "model.safetensors")
    back = MPlus.from_pretrained(tmp_path / "memoryllm")
    s1, s2 = model.initial_state(), back.initial_state()
    chunk = torch.randint(2, 97, (20,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.inject(s1, chunk), back.inject(s2, chunk))
    assert s2.stm.shape == (2, 20, 48) and not s2.has_ltm


def test_hidden_bos_rows_are_what_the_base_reads_at_bos(tmp_path):
    """bos="hidden": layer l's BOS row is the transformers model's hidden state at a lone BOS entering layer l
    (the embedding for layer 0), not the embedding repeated."""
    llama = random_hf_llama(seed=0)
    llama.save_pretrained(tmp_path / "llama")
    model = MPlus.from_llama(tmp_path / "llama", SMALL_MEMORYLLM, seed=5, bos="hidden")
    with torch.no_grad():
        hidden = llama(torch.tensor([[llama.config.bos_token_id]]), output_hidden_states=True).hidden_states
    expected = torch.stack([h[0] for h in hidden[:-1]])  # [L, 1, d]: the inputs of layers 0 .. L - 1
    torch.testing.assert_close(model.bos_embedding, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.bos_embedding[1], model.bos_embedding[0])
    with pytest.raises(ConfigError, match="BOS initialisation"):
        MPlus.from_llama(tmp_path / "llama", SMALL_MEMORYLLM, bos="random")


def test_mplus_from_llama_starts_with_an_empty_ltm_and_answers(tmp_path):
    tiny_llama(seed=1).save_pretrained(tmp_path)
    model = MPlus.from_llama(tmp_path, MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2,
                                                    selector_hidden_dim=8, update_ltm_frequency=1, lora_r=2, lora_alpha=4))
    state = model.initial_state()
    assert all(len(m) == 0 for m in state.ltm)
    assert len(model.generate(state, [5, 6, 7], max_new_tokens=3, stop_ids=())) == 3  # an empty LTM feeds no rows
    model.inject(state, torch.arange(3, 23))
    assert all(len(m) == 4 for m in state.ltm)  # update_ltm_frequency 1: merged at once


@pytest.mark.parametrize("edit, error, message", [
    (lambda c, t: c.pop("num_tokens"), ConfigError, "num_tokens"),
    (lambda c, t: c.update(update_ltm_mode="decouple"), ConfigError, "update_ltm_mode"),
    (lambda c, t: t.update(memory=torch.zeros(3, 31, 64)), ConfigError, "tensor 'memory' has shape"),
    (lambda c, t: t.pop("model.layers.1.self_attn.key_proj.2.weight"), WeightsError, "key_proj.2.weight"),
    (lambda c, t: t.update({"bos_embedding": torch.zeros(3, 1, 63)}), WeightsError, "bos_embedding"),
    (lambda c, t: t.pop("ltm_ages.2"), WeightsError, "ltm_ages.2"),
])
def test_bad_checkpoint_is_a_clear_error(tmp_path, edit, error, message):
    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    edit(config, tensors)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(error, match=message):
        MPlus.from_pretrained(tmp_path / "ckpt")


def test_a_state_that_does_not_fit_is_refused_clearly():
    model = MPlus.from_pretrained(FIXTURE)
    state = model.initial_state()
    state.ltm[1].keys = state.ltm[1].keys[:, :8]  # keys of another retriever width
    with pytest.raises(ValueError, match="wrong width"):
        model(state, torch.arange(3, 12))
    state = model.initial_state()
    state.ltm.pop()
    with pytest.raises(ValueError, match="one record per layer"):
        model.inject(state, torch.arange(3, 23))
    with pytest.raises(ValueError, match="the chunk must be a non-empty"):
        model.inject(model.initial_state(), [])
    with pytest.raises(ValueError, match="allow_short"):
        model.inject_document(model.initial_state(), torch.arange(3, 10))


def test_sharded_save_holds_the_same_tensors_and_loads(tmp_path):
    model = MPlus.from_pretrained(FIXTURE)
    state = model.initial_state()
    model.inject(state, torch.arange(3, 23))  # a memory that differs from the stored one
    model.save_pretrained(tmp_path / "one", state)
    model.save_pretrained(tmp_path / "sharded", state, max_shard_bytes=1 << 16)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    whole, parts = load_file(tmp_path / "one" / "model.safetensors"), {}
    for shard in shards:
        parts.update(load_file(tmp_path / "sharded" / shard))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    back, one = MPlus.from_pretrained(tmp_path / "sharded"), MPlus.from_pretrained(tmp_path / "one")
    assert torch.equal(back.checkpoint_state.stm, state.stm)
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(back.checkpoint_state.ltm, state.ltm))
    ids = torch.arange(3, 12)
    assert torch.equal(back(back.initial_state(), ids), one(one.initial_state(), ids))
