"""M+ folders that store only what training added and name their frozen base (memory/base_ref.py)."""
import dataclasses
import json
import shutil

import pytest
import torch

from mplus import ConfigError, MemoryConfig, MPlus
from mplus.memory.base_ref import BaseMismatchError, file_sha256, is_base_weight
from tiny import tiny_llama

MEMORY = MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2, selector_hidden_dim=8,
                      lora_r=2, lora_alpha=4, update_ltm_frequency=2, task="people")


def trained(tmp_path):
    """An M+ around a saved tiny Llama, its new weights moved off their initial values as training would."""
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    model = MPlus.from_llama(tmp_path / "base", MEMORY, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_base_weight(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    state = model.initial_state()
    for i in range(5):  # an LTM with rows, ages and recall frequencies
        model.inject(state, torch.arange(10 + i, 30 + i))
    ref = {"name": "tinybase", "sha256": file_sha256(tmp_path / "base" / "model.safetensors")}
    model.save_pretrained(tmp_path / "delta", state, base=ref)
    return model, state


def test_a_delta_folder_loads_onto_its_base(tmp_path):
    model, state = trained(tmp_path)
    back = MPlus.from_pretrained(tmp_path / "delta", base=tmp_path / "base")
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        want = p if is_base_weight(name) else p.bfloat16().float()  # new weights ship in bf16
        assert torch.equal(q, want), name
    assert torch.equal(back.checkpoint_state.stm, state.stm.bfloat16().float())
    for a, b in zip(state.ltm, back.checkpoint_state.ltm):
        assert torch.equal(a.ages, b.ages) and torch.equal(a.rf, b.rf) and len(a) == len(b) > 0
    assert back.memory_config.task == "people"
    saved = (tmp_path / "delta" / "model.safetensors").stat().st_size
    assert saved < 0.6 * (tmp_path / "base" / "model.safetensors").stat().st_size  # no base weights inside


def test_the_base_is_found_by_name_in_the_cache(tmp_path, monkeypatch):
    trained(tmp_path)
    shutil.copytree(tmp_path / "base", tmp_path / "cache" / "tinybase")
    monkeypatch.setenv("MPLUS_CACHE", str(tmp_path / "cache"))
    MPlus.from_pretrained(tmp_path / "delta")
    shutil.rmtree(tmp_path / "cache" / "tinybase")
    with pytest.raises(BaseMismatchError, match="mplus fetch"):
        MPlus.from_pretrained(tmp_path / "delta")


def test_a_base_with_another_hash_is_refused(tmp_path):
    trained(tmp_path)
    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other)  # same shapes, other weights
    with pytest.raises(BaseMismatchError, match="sha256"):
        MPlus.from_pretrained(tmp_path / "delta", base=other)


@pytest.mark.parametrize("ref", [{"name": "../etc", "sha256": "0" * 64}, {"name": "x", "sha256": "12"},
                                 {"name": "x"}, "smollm2", {"name": "x", "sha256": "0" * 64, "url": "http://a"}])
def test_a_bad_base_reference_is_a_config_error(tmp_path, ref):
    trained(tmp_path)
    config = json.loads((tmp_path / "delta" / "config.json").read_text())
    config["mplus_base"] = ref
    (tmp_path / "delta" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="mplus_base"):
        MPlus.from_pretrained(tmp_path / "delta", base=tmp_path / "base")


def test_ship_keeps_the_new_tensors_and_refuses_a_changed_base(tmp_path):
    from mplus.apps.cli_args import CliError
    from mplus.apps.ship import ship
    model, state = trained(tmp_path)
    model.save_pretrained(tmp_path / "full", state)
    (tmp_path / "full" / "tokenizer.json").write_text("{}")
    out = ship(tmp_path / "full", tmp_path / "base", tmp_path / "shipped")
    back = MPlus.from_pretrained(out, base=tmp_path / "base")
    assert torch.equal(back.bos_embedding, model.bos_embedding.bfloat16().float())
    assert not back.memory_config.add_encoder_retriever  # never used at inference, never trained here
    assert not any("encoder_query_proj" in n for n, _ in back.named_parameters())
    ids, kept = torch.arange(5, 12), MPlus.from_pretrained(tmp_path / "delta", base=tmp_path / "base")
    assert kept.memory_config.add_encoder_retriever  # the same weights and memory with the encoder retriever...
    assert torch.equal(back(back.initial_state(), ids), kept(kept.initial_state(), ids))  # ...read the same
    tiny_llama(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(CliError, match="changed"):
        ship(tmp_path / "full", tmp_path / "other", tmp_path / "shipped2")


def test_a_people_model_reads_a_prompt_that_opens_with_the_bos_id(tmp_path):
    """SmolLM2's BOS id is <|im_start|>, the first token of every chat prompt: a people model takes it as is;
    any other model still refuses a leading BOS (a doubled BOS), and strip_bos still strips it."""
    model, state = trained(tmp_path)
    ids = [model.config.bos_token_id, 5, 6, 7]
    assert len(model.generate(state, ids, max_new_tokens=2)) == 2
    facts = MPlus.from_llama(tmp_path / "base", dataclasses.replace(MEMORY, task="facts"))
    with pytest.raises(ValueError, match="starts with BOS"):
        facts.generate(facts.initial_state(), ids, max_new_tokens=2)
    assert facts.generate(facts.initial_state(), ids, max_new_tokens=2, strip_bos=True) == \
        facts.generate(facts.initial_state(), ids[1:], max_new_tokens=2)


def test_a_base_with_tied_embeddings_loads(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: its file has no lm_head.weight, and none is needed."""
    tiny_llama(seed=0, tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    model = MPlus.from_llama(tmp_path / "base", MEMORY, seed=3)
    ref = {"name": "tinybase", "sha256": file_sha256(tmp_path / "base" / "model.safetensors")}
    model.save_pretrained(tmp_path / "delta", base=ref)
    back = MPlus.from_pretrained(tmp_path / "delta", base=tmp_path / "base")
    assert torch.equal(back.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.arange(5, 12)
    got, want = back(back.initial_state(), ids), model(model.initial_state(), ids)
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # the new tensors and memory ship in bf16
