"""Config reading (both config.json generations) and strict safetensors loading / saving."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mplus import ConfigError, Llama, LlamaConfig, WeightsError
from tiny import tiny_llama

LEGACY = {  # Llama-3.1-8B's config.json fields (meta-llama/Llama-3.1-8B)
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}


def test_llama31_config_both_generations():
    old = LlamaConfig.from_dict(LEGACY)
    assert old.head_dim == 128 and old.group_size == 4 and old.eos_token_id == (128001, 128008, 128009)
    new = dict(LEGACY)
    new["rope_parameters"] = {**new.pop("rope_scaling"), "rope_theta": new.pop("rope_theta")}
    assert LlamaConfig.from_dict(new) == old
    assert LlamaConfig.from_dict(old.to_dict()) == old
    assert LlamaConfig.from_dict({**LEGACY, "rope_scaling": {"type": "linear", "factor": 1.8125}}).rope_scaling.factor == 1.8125


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "'hidden_size'"),
    ({"rope_theta": None, "rope_scaling": None}, "'rope_theta'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 5}, "multiple"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_bad_config_names_the_field(change, message):
    raw = {k: v for k, v in {**LEGACY, **change}.items() if v is not None or k == "rope_scaling"}
    if change.get("rope_theta", 0) is None:
        raw.pop("rope_theta", None)
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(raw)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    model = tiny_llama(seed=1, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in names) != tied
    back = Llama.from_pretrained(tmp_path, packed=False)
    assert back.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 97, (1, 20))
    assert torch.equal(model(ids), back(ids))
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight


@settings(max_examples=8, deadline=None)
@given(shard_bytes=st.integers(2_000, 60_000), seed=st.integers(0, 100))
def test_sharded_round_trip(tmp_path_factory, shard_bytes, seed):
    folder = tmp_path_factory.mktemp("sharded")
    model = tiny_llama(seed=seed)
    model.save_pretrained(folder, max_shard_bytes=shard_bytes)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert not (folder / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 1
    back = Llama.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_a_layer_split_across_two_shards_loads(tmp_path):
    model = tiny_llama(seed=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    layer0 = sorted(k for k in state if k.startswith("model.layers.0."))
    first = {k: state[k] for k in layer0[:3]}  # layer 0 straddles shard 1 and 2
    second = {k: v for k, v in state.items() if k not in first}
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")
    weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(Llama.from_pretrained(tmp_path, packed=False)(ids), model(ids))


def test_bf16_load_casts_per_tensor(tmp_path):
    tiny_llama(seed=3).save_pretrained(tmp_path)
    back = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert back.inv_freq.dtype == torch.float32  # RoPE frequencies are never rounded by the weight dtype


def _edit_checkpoint(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensors: extra"),
    (lambda s: s.update({"model.norm.weight": torch.ones(47)}), r"'model.norm.weight' has shape \(47,\)"),
    (lambda s: s.update({"model.norm.weight": torch.ones(48, dtype=torch.int32)}), "dtype"),
])
def test_checkpoint_that_does_not_fit_names_the_tensor(tmp_path, edit, message):
    tiny_llama(seed=4).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(WeightsError, match=message):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    tiny_llama(seed=5).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(WeightsError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        Llama.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama().config.to_dict()))
    with pytest.raises(WeightsError, match="no model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_packed_layout_keeps_names_values_and_logits(tmp_path):
    model = tiny_llama(seed=6, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "plain")
    packed = Llama.from_pretrained(tmp_path / "plain")  # packed by default
    attn = packed.model.layers[0].self_attn
    assert attn.qkv_weight is not None and attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert not packed.lm_head.weight.is_contiguous()  # stored in-major
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), packed.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 97, (2, 30))
    assert (packed(ids) - model(ids)).abs().max() <= 1e-5
    packed.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again/model.safetensors").read_bytes() == (tmp_path / "plain/model.safetensors").read_bytes()
