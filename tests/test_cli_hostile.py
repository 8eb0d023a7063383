"""Bad input to the CLI and to the generation API: one clear line and a non-zero exit, never a traceback, never a
silent exit 0. Models: a tiny random Llama (tests/tiny.py, cut to 48 positions to keep decoding short) with the
shipped tiny M+'s tokenizer, and the shipped tiny M+ itself (checkpoints/tiny-mplus, 4096 positions)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

import mplus
from mplus import MPlus
from mplus.apps.cli import main
from mplus.llama.generate import generate
from mplus.llama.kv_cache import KVCache
from mplus.llama.tokenizer import Tokenizer
from tiny import tiny_llama

TINY_MPLUS = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-mplus"
POSITIONS = 48  # max_position_embeddings of the tiny Llama


def word_tokenizer(path: Path, words: list[str]) -> Path:
    """A word-level tokenizer.json whose ids are 0..len(words)-1 (word 0 is the unknown token)."""
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "llama"
    tiny_llama(seed=0, vocab_size=2048, max_position_embeddings=POSITIONS).save_pretrained(folder)  # the tiny M+ tokenizer's 2048 ids
    shutil.copy(TINY_MPLUS / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("state") / "memory.safetensors"
    MPlus.from_pretrained(TINY_MPLUS).initial_state(0).save(path)
    return path


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the CLI run in-process; a SystemExit counts as its status."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------- argument validation

@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"), ("--top-p", "nan"),
    ("--top-p", "0"), ("--seed", str(2**70)), ("--seed", "-1"), ("--max-new-tokens", "-3"),
    ("--max-new-tokens", "0"), ("--prompt-file", "."),
])
def test_generate_refuses_bad_arguments(llama_dir, capsys, flag, value):
    source = [] if flag == "--prompt-file" else ["--prompt", "hello"]
    code, err = cli(["generate", "--model", llama_dir, *source, flag, value], capsys)
    assert code == 2 and f"argument {flag}" in err, err


@pytest.mark.parametrize("question", ["", "   "])
def test_blank_question_is_refused(state_file, capsys, question):
    # found by the long CLI fuzz: wrapped in the question template, a blank question was answered with exit 0
    code, err = cli(["ask", question, "--state", str(state_file), "--model", str(TINY_MPLUS)], capsys)
    assert code == 2 and "argument question: is empty" in err, err


def test_model_that_is_not_a_folder_is_refused(llama_dir, capsys):
    code, err = cli(["generate", "--model", llama_dir / "config.json", "--prompt", "hi"], capsys)
    assert code == 2 and "argument --model" in err, err


def test_argparse_errors_are_returned_not_raised(llama_dir):
    assert main(["generate", "--model", str(llama_dir), "--prompt", "hi", "--temperature", "nan"]) == 2


def test_inspect_show_must_be_positive(state_file, capsys):
    code, err = cli(["inspect", state_file, "--show", "-5"], capsys)
    assert code == 2 and "argument --show" in err, err


@pytest.mark.parametrize("argv, flag", [
    (["--episodes", "-1"], "--episodes"), (["--seed", str(2**60)], "--seed"),  # drops seeded seed * 100_003 + i
    (["--distances=-1,0"], "--distances"), (["--chunk-words", "0"], "--chunk-words"),
])
def test_bench_retention_refuses_bad_arguments(capsys, argv, flag):
    short = ["--episodes", "1", "--distances", "0"]  # a short run, should the bad value (given last) be accepted
    code, err = cli(["bench", "retention", "--model", TINY_MPLUS, *short, *argv], capsys)
    assert code == 2 and f"argument {flag}" in err, err


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # The benchmark would run its episodes first, then fail to create a folder inside a file.
    code, err = cli(["bench", "retention", "--model", TINY_MPLUS, "--episodes", "1", "--distances", "0",
                     "--out", a_file / "curve.csv"], capsys)
    assert code == 2 and "argument --out" in err and "is a file" in err, err
    code, err = cli(["convert-gguf", a_file, a_file], capsys)  # the output folder is an existing file
    assert code == 2 and "argument out" in err, err


def test_inject_refuses_folders_for_files(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("Ada lives in Port Varna.")
    code, err = cli(["inject", "--model", TINY_MPLUS, "--state", tmp_path, text], capsys)
    assert code == 2 and "argument --state" in err, err
    code, err = cli(["inject", "--model", TINY_MPLUS, "--state", tmp_path / "m.safetensors", tmp_path], capsys)
    assert code == 2 and "argument TEXTFILE" in err and "folder" in err, err


def test_prompt_file_that_is_not_utf8_is_named(llama_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    code, err = cli(["generate", "--model", llama_dir, "--prompt-file", bad], capsys)
    assert code == 2 and str(bad) in err and "UTF-8" in err, err


# ------------------------------------------------------------------------------------- position budget

def test_huge_max_new_tokens_is_capped_by_the_positions():
    model = tiny_llama(seed=0, max_position_embeddings=POSITIONS)
    prompt = list(range(3, 13))  # 10 ids
    out = generate(model, prompt, max_new_tokens=10**12, stop_ids=())  # a cache of 10^12 rows would not fit
    assert len(out) == POSITIONS - len(prompt)


def test_huge_max_new_tokens_on_the_cli_runs(llama_dir, capsys):
    code, err = cli(["generate", "--model", llama_dir, "--prompt", "hello", "--max-new-tokens", 10**12], capsys)
    assert code == 0, err


def test_cache_of_no_rows_is_refused():
    config = tiny_llama(seed=0).config
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_length"):
            KVCache(config, bad)


def test_prompt_past_the_positions_is_refused():
    model = tiny_llama(seed=0, max_position_embeddings=POSITIONS)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [3] * (POSITIONS + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [3] * POSITIONS, max_new_tokens=1)  # fills every position: no room for a new token
    assert len(generate(model, [3] * (POSITIONS - 1), max_new_tokens=5, stop_ids=())) == 1


def test_mplus_prompt_past_the_positions_is_refused():
    model = MPlus.from_pretrained(TINY_MPLUS)
    room = model.config.max_position_embeddings - model.memory_config.virtual_prefix  # 4096 - 193 prompt tokens
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(model.initial_state(0), [5] * (room + 1), max_new_tokens=1)
    assert len(model.generate(model.initial_state(0), [5] * (room - 2), max_new_tokens=10, stop_ids=())) == 2


def test_cli_prompt_past_the_positions_is_an_error(llama_dir, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("hello " * 100)
    code, err = cli(["generate", "--model", llama_dir, "--prompt-file", long], capsys)
    assert code == 2 and "max_position_embeddings" in err, err


# ------------------------------------------------------------------------------------- sampling settings

@pytest.mark.parametrize("settings", [dict(temperature=float("nan")), dict(temperature=-1.0),
                                      dict(temperature=float("inf"))])
def test_bad_sampling_settings_are_refused_at_the_call(settings):
    model = tiny_llama(seed=0, max_position_embeddings=POSITIONS)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([3, 4], max_new_tokens=2, generator=torch.Generator().manual_seed(0), **settings)


def test_mplus_refuses_nan_temperature():
    model = MPlus.from_pretrained(TINY_MPLUS)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(model.initial_state(0), [5, 6], max_new_tokens=2, temperature=float("nan"),
                       generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------- tokenizer against model

def test_decode_refuses_an_id_the_tokenizer_lacks(tmp_path):
    tok = Tokenizer.from_file(word_tokenizer(tmp_path / "t.json", ["[UNK]", "hello", "world"]))
    assert tok.decode([1, 2]) == "hello world"
    for bad in (3, 2047, -1, 2**40):
        with pytest.raises(ValueError, match=f"token id {bad} has no token"):
            tok.decode([1, bad])


def test_smaller_tokenizer_fails_loudly_when_the_model_emits_an_id_it_lacks(llama_dir, tmp_path, capsys):
    small = word_tokenizer(tmp_path / "small.json", ["[UNK]", "hello"])  # ids 0, 1; the model has 2048
    code, err = cli(["generate", "--model", llama_dir, "--tokenizer", small, "--prompt", "hello",
                     "--max-new-tokens", "3"], capsys)
    assert code == 2 and "has no token in this tokenizer" in err, err


def test_larger_tokenizer_is_refused_at_load_for_memory_models(state_file, tmp_path, capsys):
    big = word_tokenizer(tmp_path / "big.json", [f"w{i}" for i in range(3000)])  # ids up to 2999; the model has 2048
    code, err = cli(["inspect", state_file, "--model", TINY_MPLUS, "--tokenizer", big], capsys)
    assert code == 2 and "ids up to 2999" in err and "2048" in err, err


def test_chat_skips_a_line_that_is_not_text(llama_dir, tmp_path, capsys, monkeypatch):
    chatml = word_tokenizer(tmp_path / "chatml.json", ["[UNK]", "<|im_start|>", "<|im_end|>", "hello"])
    lines = iter(["caf\udce9"])  # what Python makes of the non-UTF-8 byte 0xe9 on stdin under a C locale

    def fake_input(prompt=""):
        for line in lines:
            return line
        raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    code, err = cli(["chat", "--model", llama_dir, "--tokenizer", chatml], capsys)
    assert code == 0 and "not valid UTF-8" in err, err


# ------------------------------------------------------------------------------------- the top-level handler

def test_unexpected_error_is_one_line_and_exit_1(state_file, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr("mplus.apps.cli.cmd_inspect", broken)
    monkeypatch.delenv("MPLUS_DEBUG", raising=False)
    code, err = cli(["inspect", state_file], capsys)
    assert code == 1 and err.count("\n") == 1 and "RuntimeError" in err and "something inside broke" in err, err


def test_failed_download_is_one_line(tmp_path, capsys, monkeypatch):
    from mplus.apps.fetch import FetchError

    def offline(cache, progress):
        raise FetchError("cannot reach pypi.org")

    monkeypatch.setattr("mplus.apps.fetch.fetch_all", offline)
    code, err = cli(["fetch", "--cache", tmp_path], capsys)
    assert code == 2 and err == "mplus fetch: error: cannot reach pypi.org\n", err


def _run_cli(args: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(mplus.__file__).resolve().parents[1])}
    env.pop("MPLUS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mplus", *args], capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize("case", ["non-utf8 prompt", "folder as prompt file"])
def test_no_traceback_in_a_real_process(llama_dir, tmp_path, case):
    source = ["--prompt", b"caf\xe9"] if case == "non-utf8 prompt" else ["--prompt-file", str(tmp_path)]
    result = _run_cli(["generate", "--model", str(llama_dir), *source])
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("mplus generate: error: argument --prompt"), err
