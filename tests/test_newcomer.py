"""What a new user meets first: the question template, the CLI's hints (short texts, the wrong kind of model
folder), the cache folder rule, signed state files from the CLI, and the tokenizer checks of the demo and the
retention benchmark. On the shipped tiny M+ (checkpoints/tiny-mplus) and a tiny random Llama."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers

from mplus import MPlus
from mplus.apps import paths
from mplus.apps.cli import build_parser, main
from mplus.apps.questions import question_prompt
from mplus.data.facts import qa_prompt
from mplus.llama import convert
from mplus.llama.config import ConfigError
from mplus.memory.config import MemoryConfig
from tiny import tiny_llama

TINY_MPLUS = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-mplus"
FACT = "The old ferry waits near the river. Talvori Quen lives in Brastow.\n"  # the tiny model's training style
QUESTION = "Where does Talvori Quen live?"
BASE = dict(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2)


# --- the question template ---

def test_shipped_model_asks_in_its_training_format():
    model = MPlus.from_pretrained(TINY_MPLUS)
    assert model.memory_config.question_template == "Q: {question}\nA:"
    assert model.memory_config.question_prompt(QUESTION) == qa_prompt(QUESTION) == f"Q: {QUESTION}\nA:"


def test_template_is_saved_and_loaded_back(tmp_path):
    model = MPlus.from_pretrained(TINY_MPLUS)
    model.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["mplus_question_template"] == "Q: {question}\nA:"
    assert MPlus.from_pretrained(tmp_path / "copy").memory_config.question_template == "Q: {question}\nA:"


def test_without_a_template_questions_go_as_they_are():
    memory = MemoryConfig.from_dict({"num_tokens": 4, "num_blocks": 6, "num_ltm_blocks": 2, "selector_hidden_dim": 8})
    assert memory.question_template is None and memory.question_prompt("Who?") == "Who?"
    assert "mplus_question_template" not in memory.to_dict()


def test_template_text_is_not_interpreted():
    """The template comes from a file: only the slot {question} is replaced, no str.format fields."""
    memory = MemoryConfig(**BASE, question_template="{0} {question.__class__} {question}!")
    assert memory.question_prompt("x{question}") == "{0} {question.__class__} x{question}!"


@pytest.mark.parametrize("bad", [3, ["Q: {question}"], "Q: no slot", "{question} {question}", "{question}" + "x" * 5000])
def test_bad_templates_are_refused(bad):
    raw = {"num_tokens": 4, "num_blocks": 6, "num_ltm_blocks": 2, "selector_hidden_dim": 8,
           "mplus_question_template": bad}
    with pytest.raises(ConfigError, match="mplus_question_template"):
        MemoryConfig.from_dict(raw)


def test_demo_and_bench_ask_in_the_checkpoint_template_else_the_training_format():
    model = MPlus.from_pretrained(TINY_MPLUS)
    model.memory_config = MemoryConfig(**BASE, question_template="Question: {question}\nAnswer:")
    assert question_prompt(model, "Who?") == "Question: Who?\nAnswer:"
    model.memory_config = MemoryConfig(**BASE)  # an intermediate training stage, saved without a template
    assert question_prompt(model, "Who?") == "Q: Who?\nA:"


# --- mplus inject / ask ---

@pytest.fixture(scope="module")
def memory_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ask")
    (folder / "fact.txt").write_text(FACT)
    assert main(["inject", "--model", str(TINY_MPLUS), "--state", str(folder / "m.mem"), str(folder / "fact.txt")]) == 0
    return folder / "m.mem"


def test_ask_applies_the_template(memory_file, capsys):
    assert main(["ask", "--model", str(TINY_MPLUS), "--state", str(memory_file), QUESTION]) == 0
    out, err = capsys.readouterr()
    assert repr(f"Q: {QUESTION}\nA:") in err and "--raw" in err
    assert "Brastow" in out.split("\n")[0]  # the first line of the reply names the city written in


def test_ask_raw_sends_the_question_as_is(memory_file, capsys):
    assert main(["ask", "--model", str(TINY_MPLUS), "--state", str(memory_file), "--raw", QUESTION]) == 0
    assert "asked as" not in capsys.readouterr().err


def test_short_text_names_the_cli_flag(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Tola Vim is a baker.")
    state = tmp_path / "m.mem"
    assert main(["inject", "--model", str(TINY_MPLUS), "--state", str(state), str(tmp_path / "short.txt")]) == 2
    err = capsys.readouterr().err
    assert "--allow-short" in err and "allow_short=True" not in err and not state.exists()
    assert main(["inject", "--model", str(TINY_MPLUS), "--state", str(state), "--allow-short",
                 str(tmp_path / "short.txt")]) == 0
    assert state.exists()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "llama"
    tiny_llama(seed=0, vocab_size=2048).save_pretrained(folder)
    shutil.copy(TINY_MPLUS / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_generate_on_a_memory_folder_points_to_ask(capsys):
    assert main(["generate", "--model", str(TINY_MPLUS), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "M+ (or MemoryLLM) checkpoint" in err and "mplus ask" in err and "mplus inject" in err
    assert "missing" not in err


@pytest.mark.parametrize("command", [["ask", "hello"], ["inject", "TEXT"]])
def test_memory_commands_on_a_plain_llama_point_to_generate(llama_dir, tmp_path, capsys, command):
    (tmp_path / "t.txt").write_text(FACT)
    argv = [x if x != "TEXT" else str(tmp_path / "t.txt") for x in command]
    assert main(argv + ["--model", str(llama_dir), "--state", str(tmp_path / "m.mem")]) == 2
    err = capsys.readouterr().err
    assert "plain Llama checkpoint" in err and "mplus generate" in err and "num_tokens" not in err


# --- signed state files ---

def test_key_file_signs_and_checks(tmp_path, capsys):
    (tmp_path / "fact.txt").write_text(FACT)
    key, other, short = tmp_path / "key", tmp_path / "other", tmp_path / "short"
    key.write_bytes(bytes(range(32)))
    other.write_bytes(bytes(range(1, 33)))
    short.write_bytes(b"0123456789")
    state = tmp_path / "m.mem"
    common = ["--model", str(TINY_MPLUS), "--state", str(state)]
    assert main(["inject", *common, "--key-file", str(key), str(tmp_path / "fact.txt")]) == 0
    assert main(["ask", *common, "--key-file", str(key), "--max-new-tokens", "2", QUESTION]) == 0
    capsys.readouterr()
    assert main(["ask", *common, "--key-file", str(other), QUESTION]) == 2
    assert "signature does not match" in capsys.readouterr().err
    assert main(["inject", *common, "--key-file", str(short), str(tmp_path / "fact.txt")]) == 2
    assert "at least 16" in capsys.readouterr().err
    unsigned = tmp_path / "plain.mem"
    assert main(["inject", "--model", str(TINY_MPLUS), "--state", str(unsigned), str(tmp_path / "fact.txt")]) == 0
    capsys.readouterr()
    assert main(["ask", "--model", str(TINY_MPLUS), "--state", str(unsigned), "--key-file", str(key), QUESTION]) == 2
    assert "not signed" in capsys.readouterr().err


# --- the cache folder ---

def test_cache_is_mplus_cache_else_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLUS_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.cache_dir() == tmp_path / ".cache" / "mplus"
    assert paths.smollm2_dir() == tmp_path / ".cache" / "mplus" / "smollm2-135m-instruct"
    monkeypatch.setenv("MPLUS_CACHE", str(tmp_path / "elsewhere"))
    assert paths.cache_dir() == tmp_path / "elsewhere"


def test_fetch_help_states_the_rule():
    fetch = build_parser()._subparsers._group_actions[0].choices["fetch"]
    assert "$MPLUS_CACHE, else .cache/mplus in the current directory" in " ".join(fetch.format_help().split())


# --- the project's own writers and tokenizer checks ---

def test_conversion_writes_through_the_project_writer(tmp_path, monkeypatch):
    """llama/convert.py writes model.safetensors with formats.safetensors.write_file into an atomic temporary
    file (a killed write leaves only a temporary that the next write removes)."""
    from test_fetch_convert import tiny_gguf
    written = []

    def spy(path, tensors, metadata, sha256=False):
        written.append(Path(path).name)
        return convert_write(path, tensors, metadata, sha256)

    convert_write = convert.write_file
    monkeypatch.setattr(convert, "write_file", spy)
    convert.convert_gguf(tiny_gguf(tmp_path)[0], tmp_path / "hf", progress=False)
    assert len(written) == 1 and written[0].startswith(".model.safetensors.") and written[0].endswith(".mplus-tmp")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture(scope="module")
def mismatched_model(tmp_path_factory) -> Path:
    """The shipped tiny M+ with a tokenizer one id larger than its vocabulary (2048 ids)."""
    folder = tmp_path_factory.mktemp("mismatch") / "m"
    shutil.copytree(TINY_MPLUS, folder)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|not in the model|>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("argv", [["demo", "--chunks", "0"],
                                  ["bench", "retention", "--episodes", "1", "--distances", "0"]])
def test_demo_and_bench_refuse_a_tokenizer_that_does_not_fit(mismatched_model, capsys, argv):
    args = argv[:2] + ["--model", str(mismatched_model)] + argv[2:] if argv[0] == "bench" else \
        argv[:1] + ["--model", str(mismatched_model)] + argv[1:]
    assert main(args) == 2
    assert "do not belong together" in capsys.readouterr().err
