"""The shipped SmolLM2 M+ (checkpoints/smollm2-mplus): only what training added, its base named by hash, and it
remembers held-out people in plain English, plain and chat questions alike.

Thresholds sit below what this exact run measured on the shipped folder (the same call as `mplus bench retention
--model checkpoints/smollm2-mplus --seed 2027 --episodes 8 --distances 0,16 --chunk-words 24 --skip
memoryllm_nR,in_context --interference 0`): M+ 0.75 at 0 and at 16 chunks (plain 1.0, chat 0.5 at both), MemoryLLM
0.875 and 0.25, no context 0.125. They leave room for another CPU's rounding, not for a memory that stopped working.
"""
import json

import pytest

from mplus.apps.bench_retention import run
from mplus.apps.paths import shipped_model_path, smollm2_dir
from mplus.llama.tokenizer import Tokenizer
from mplus.memory.base_ref import file_sha256
from mplus.memory.mplus import MPlus

pytestmark = pytest.mark.real
FOLDER = shipped_model_path("smollm2-mplus", "make train-smol")


def test_only_new_tensors_ship_and_the_base_is_named_by_hash(artifacts):
    size = sum(f.stat().st_size for f in FOLDER.iterdir() if f.is_file())
    assert size <= 30 * 2**20
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["mplus_base"] == {"name": "smollm2-135m-instruct",
                                    "sha256": file_sha256(smollm2_dir() / "model.safetensors")}
    assert config["mplus_task"] == "people"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {f.name for f in FOLDER.iterdir()}


@pytest.fixture(scope="module")
def result(artifacts):
    model = MPlus.from_pretrained(FOLDER)
    return run(model, Tokenizer.from_file(FOLDER), seed=2027, episodes=8, distances=[0, 16], chunk_words=24,
               filler_words=12, skip=("memoryllm_n192", "in_context"), progress=False)


def test_the_stored_memory_retrieves_from_the_first_question(artifacts):
    """The shipped LTM holds K0 filler rows per layer, so retrieval works before the first merge (an empty LTM
    made M+ read as MemoryLLM for 11 chunks after a fact)."""
    model = MPlus.from_pretrained(FOLDER)
    state = model.initial_state()
    assert all(len(m) >= model.memory_config.ltm_retrieved for m in state.ltm)


def test_it_answers_held_out_people_and_remembers_past_the_stm(result):
    acc = result["accuracy"]
    assert acc["mplus"][0] >= 0.6 and acc["no_context"][0] <= 0.25
    assert acc["mplus"][1] >= 0.5 and acc["memoryllm"][1] <= acc["mplus"][1] - 0.25
    assert set(result["mplus_by_form"]) == {"plain", "chat"}
