"""The memory commands end to end (inject, ask, inspect) on a tiny M+ with the real SmolLM2 tokenizer, and
save -> load -> continue equal to never having saved."""
import shutil

import pytest
import torch

from mplus import MemoryConfig, MemoryState, MPlus
from mplus.apps.cli import main
from mplus.apps.paths import smollm2_dir
from tiny import tiny_llama

pytestmark = pytest.mark.real  # uses the real SmolLM2 tokenizer
TEXT = ("Ada Quill lives in Port Varna and keeps forty-two lanterns. " * 12).strip()
SMALL = MemoryConfig(kind="mplus", num_tokens=8, num_blocks=6, num_ltm_blocks=2, selector_hidden_dim=16,
                     update_ltm_frequency=2, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, artifacts):
    root = tmp_path_factory.mktemp("mplus")
    tiny_llama(seed=0, vocab_size=49152).save_pretrained(root / "llama")
    MPlus.from_llama(root / "llama", SMALL, seed=1).save_pretrained(root / "mplus")
    shutil.copy(smollm2_dir() / "tokenizer.json", root / "mplus" / "tokenizer.json")
    return root / "mplus"


def test_inject_ask_inspect(model_dir, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    state = tmp_path / "memory.safetensors"
    assert main(["inject", "--model", str(model_dir), "--state", str(state), "--chunk-size", "32", str(text)]) == 0
    saved = MemoryState.load(state)
    assert saved.has_ltm and sum(map(len, saved.ltm)) > 0  # several updates: rows reached the LTM
    assert main(["ask", "--model", str(model_dir), "--state", str(state), "--max-new-tokens", "5",
                 "Where does Ada live?"]) == 0
    assert main(["inspect", str(state), "--model", str(model_dir), "--question", "Where does Ada live?"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "@" in out  # retrieved rows with their ages


def test_bad_state_file_is_a_clear_cli_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a state")
    assert main(["ask", "--model", str(model_dir), "--state", str(bad), "hello"]) == 2
    assert "error" in capsys.readouterr().err


def test_save_load_continue_equals_never_saving(model_dir, tmp_path):
    model = MPlus.from_pretrained(model_dir)
    chunks = [torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    a = model.initial_state(seed=3)
    for c in chunks[:3]:
        model.inject(a, c)
    a.save(tmp_path / "mid.safetensors")
    b = MemoryState.load(tmp_path / "mid.safetensors", expect=model.state_spec())
    for c in chunks[3:]:  # drops drawn from each state's own generator
        model.inject(a, c), model.inject(b, c)
    prompt = chunks[0][:7]
    assert torch.equal(a.stm, b.stm) and all(torch.equal(x.rows, y.rows) for x, y in zip(a.ltm, b.ltm))
    assert model.generate(a, prompt, max_new_tokens=6, stop_ids=()) == model.generate(b, prompt, max_new_tokens=6, stop_ids=())
