"""Hostile config.json files: strict value types, declared sizes checked against the checkpoint before
anything is built, and malformed files refused with a ConfigError that names the problem."""
import json
import shutil

import pytest
from torch import nn

from conftest import OFFICIAL_MEMORYLLM_TINY, OFFICIAL_TINY
from mplus import ConfigError, Llama, LlamaConfig, MemoryConfig, MPlus
from mplus.llama.convert import hf_config
from mplus.formats.gguf import GGUFError, GGUFFile
from mplus.memory.lora import LoRALinear
from test_config_weights import LEGACY
from test_fetch_convert import tiny_gguf
from tiny import tiny_llama

MPLUS_CONFIG = json.loads((OFFICIAL_TINY / "checkpoint" / "config.json").read_text())
MEMORYLLM_CONFIG = json.loads((OFFICIAL_MEMORYLLM_TINY / "checkpoint" / "config.json").read_text())
REAL_CONFIGS = [OFFICIAL_TINY / "checkpoint", OFFICIAL_MEMORYLLM_TINY / "checkpoint",
                OFFICIAL_TINY.parents[2] / "checkpoints" / "tiny-mplus"]


# --------------------------------------------------------------------------- every real config still reads

def test_real_configs_are_accepted(artifacts):
    for folder in REAL_CONFIGS + [artifacts.smollm2_dir]:
        raw = json.loads((folder / "config.json").read_text())
        LlamaConfig.from_dict(raw)
        if "num_tokens" in raw:
            MemoryConfig.from_dict(raw)
    new = dict(LEGACY)  # the transformers-5 form
    new["rope_parameters"] = {**new.pop("rope_scaling"), "rope_theta": new.pop("rope_theta")}
    assert LlamaConfig.from_dict(new) == LlamaConfig.from_dict(LEGACY)
    linear = LlamaConfig.from_dict({**LEGACY, "rope_scaling": {"type": "linear", "factor": 2}}).rope_scaling
    assert (linear.rope_type, linear.factor) == ("linear", 2.0)
    assert LlamaConfig.from_dict({**LEGACY, "head_dim": None, "num_key_value_heads": None}).head_dim == 4096 // 32


# --------------------------------------------------------------------------- strict types, no coercion

@pytest.mark.parametrize("change, field", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # was read as True: lm_head dropped
    ({"num_key_value_heads": 0}, "num_key_value_heads"),  # was replaced by num_attention_heads
    ({"head_dim": 0}, "head_dim"),  # was derived from hidden_size
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rms_norm_eps": 1.5}, "rms_norm_eps"),
    ({"hidden_size": 4096.0}, "hidden_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"intermediate_size": "14336"}, "intermediate_size"),
    ({"bos_token_id": "128000"}, "bos_token_id"),
    ({"eos_token_id": [128001, 999999]}, "eos_token_id"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -1}}, "rope_scaling.factor"),
    ({"rope_scaling": {**LEGACY["rope_scaling"], "factor": 0}}, "rope_scaling.factor"),
    ({"rope_scaling": {**LEGACY["rope_scaling"], "high_freq_factor": 1.0}}, "rope_scaling.high_freq_factor"),  # divides by 0
    ({"rope_scaling": {**LEGACY["rope_scaling"], "original_max_position_embeddings": 8192.7}},
     "rope_scaling.original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": None, "rope_theta": None, "rope_parameters": {"rope_type": "linear", "factor": -1,
                                                                     "rope_theta": 1e4}}, "rope_parameters.factor"),
])
def test_llama_fields_are_strict(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        LlamaConfig.from_dict({**LEGACY, **change})


@pytest.mark.parametrize("change, field", [
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "r": 0}}, "lora_config.r"),  # divided by zero
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "lora_alpha": "8"}}, "lora_config.lora_alpha"),
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "lora_dropout": 2}}, "lora_config.lora_dropout"),
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "target_modules": "q_proj"}}, "lora_config.target_modules"),
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "target_modules": ["o_proj"]}}, "lora_config.target_modules"),
    ({"num_tokens": "8"}, "num_tokens"),
    ({"num_tokens": 8.5}, "num_tokens"),
    ({"num_blocks": True}, "num_blocks"),
    ({"num_ltm_blocks": 6}, "num_ltm_blocks"),
    ({"selector_hidden_dim": 0}, "selector_hidden_dim"),
    ({"add_selector": "false"}, "add_selector"),
    ({"drop_memory_per_layer": "false"}, "drop_memory_per_layer"),  # was read as True
    ({"decay_frequency": 0}, "decay_frequency"),  # rows would never leave the LTM
    ({"initial_rf_when_moving_stm_to_ltm": "3"}, "initial_rf_when_moving_stm_to_ltm"),
    ({"update_ltm_frequency": 0}, "update_ltm_frequency"),
])
def test_memory_fields_are_strict(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        MemoryConfig.from_dict({**MPLUS_CONFIG, **change})


def test_lora_rank_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="lora_config.r"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=8.0)


# --------------------------------------------------------------------------- malformed files

@pytest.mark.parametrize("text", [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError
    b'{"hidden_size": 64, "name": "\xff\xfe"}',  # UnicodeDecodeError
    json.dumps({**LEGACY, "rope_scaling": {**LEGACY["rope_scaling"], "original_max_position_embeddings": 1}})
    .replace('"original_max_position_embeddings": 1', '"original_max_position_embeddings": 1e400').encode(),  # OverflowError
    json.dumps(LEGACY).replace('"vocab_size": 128256', '"vocab_size": ' + "9" * 5000).encode(),  # int digit limit
])
def test_malformed_config_file_is_a_config_error(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ConfigError):
        LlamaConfig.from_file(tmp_path)
    with pytest.raises(ConfigError):
        MPlus.from_pretrained(tmp_path)


def test_overflowing_memory_field_is_a_config_error():
    with pytest.raises(ConfigError, match="'num_tokens'"):
        MemoryConfig.from_dict({**MPLUS_CONFIG, "num_tokens": float("inf")})  # json reads 1e400 as inf


# --------------------------------------------------------------------------- declared sizes vs the checkpoint

@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 10**9}, "'hidden_size'"),  # was an allocator error
    ({"vocab_size": 10**9}, "'vocab_size'"),
    ({"intermediate_size": 10**9}, "'intermediate_size'"),
    ({"num_hidden_layers": 10**9}, "'num_hidden_layers'"),  # hung while the module was built
    ({"head_dim": 10**9}, "'head_dim'"),  # 4 GB of RoPE frequencies
    ({"hidden_size": 4096}, r"'hidden_size' = 4096 .*'model.embed_tokens.weight' has shape \(97, 48\)"),
    ({"vocab_size": 50_000}, r"'vocab_size' = 50000 .*has shape \(97, 48\)"),
    ({"intermediate_size": 100_000}, r"'intermediate_size' = 100000 .*mlp.gate_proj.weight' has shape \(96, 48\)"),
    ({"num_hidden_layers": 1000}, "'num_hidden_layers' is 1000, but the checkpoint holds 2 layers"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads x head_dim = 3 x 8 .*has shape \(16, 48\)"),
])
def test_llama_sizes_are_checked_against_the_checkpoint(tmp_path, change, message):
    tiny_llama(seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"lora_config": {**MPLUS_CONFIG["lora_config"], "r": 400}}, r"'lora_config.r' = 400 .*lora_A.default.weight"),
    ({"selector_hidden_dim": 1000}, r"selector_hidden_dim = 2 x 1000 .*query_proj.0.weight' has shape \(32, 64\)"),
    ({"hidden_size": 10**9}, "'hidden_size'"),
    ({"hidden_size": 1024, "head_dim": 16}, r"'hidden_size' = 1024 .*has shape \(256, 64\)"),
])
def test_memory_sizes_are_checked_against_the_checkpoint(tmp_path, change, message):
    shutil.copytree(OFFICIAL_TINY / "checkpoint", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**MPLUS_CONFIG, **change}))
    with pytest.raises(ConfigError, match=message):
        MPlus.from_pretrained(tmp_path / "ckpt")


def test_from_llama_checks_the_llama_sizes(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 4096}))
    memory = MemoryConfig(kind="memoryllm", num_tokens=4, num_blocks=4, lora_r=2, lora_alpha=4.0)
    with pytest.raises(ConfigError, match=r"'intermediate_size' = 4096"):
        MPlus.from_llama(tmp_path, memory)


@pytest.mark.parametrize("key, value, message", [
    ("llama.embedding_length", 10**9, "llama.embedding_length"),  # filled 4 GB of RoPE tables once loaded
    ("llama.embedding_length", 16, r"'hidden_size' = 16 .*\(260, 8\).*llama.embedding_length"),
    ("llama.block_count", 10**9, "llama.block_count"),
    ("llama.feed_forward_length", 24, r"'intermediate_size' = 24 .*llama.feed_forward_length"),
    ("llama.attention.head_count", 0, "llama.attention.head_count"),  # was a ZeroDivisionError
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", 1e300, "layer_norm_rms_epsilon"),
])
def test_gguf_metadata_is_checked_against_the_tensors(tmp_path, key, value, message):
    path, _ = tiny_gguf(tmp_path)
    gguf = GGUFFile(path)
    gguf.metadata[key] = value
    with pytest.raises(GGUFError, match=message):
        hf_config(gguf)


def test_sizes_check_reads_no_tensor_data(tmp_path, monkeypatch):
    """The check runs on header shapes alone: a mismatch is refused before any tensor is read."""
    tiny_llama(seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    import mplus.formats.hf_folder
    import mplus.llama.checkpoint

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(mplus.formats.hf_folder, "read_tensor", no_read)
    monkeypatch.setattr(mplus.llama.checkpoint, "materialize", no_read)
    with pytest.raises(ConfigError, match="'hidden_size' = 96"):
        Llama.from_pretrained(tmp_path)
