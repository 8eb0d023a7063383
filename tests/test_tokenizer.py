"""mplus.llama.tokenizer: exact ids from independently recorded references, chat templates, streaming decode, and
the Llama-3.1 tokenizer's authenticity (its ranks rebuilt into Meta's tokenizer.model)."""
from __future__ import annotations

import importlib
import base64

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from mplus.formats.gguf import GGUFFile
from mplus.llama.tokenizer import LLAMA3_DATE_HEADER, StreamDecoder, Tokenizer, TokenizerError, chatml_chat, llama3_chat

# SmolLM2-135M tokenizer ids, written down independently of this code (checked against transformers' own GGUF tokenizer below)
SMOLLM2_IDS = {
    "Hello world! The capital of France is Paris.": [19556, 905, 17, 378, 3575, 282, 4649, 314, 7042, 30],
    "In 2024, 12345 apples cost $3.50.": [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885,
                                          35, 30, 37, 32, 30],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n": [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198],
    "  def f(x):\n\treturn x**2  # café 日本語 🙂": [216, 753, 275, 24, 104, 727, 198, 197, 5406, 1792, 828, 34, 216,
                                                  907, 37366, 17097, 241, 115, 40993, 179, 120, 248, 47526],
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.":
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 2365, 6354, 16438, 27003, 690, 260, 23790,
         2767, 30],
    "The capital of France is": [504, 3575, 282, 4649, 314],
}
# Meta's own Llama-3 tokenizer test vectors (meta-llama/llama3 tests), no specials added
LLAMA31_IDS = {
    "Hello world! The capital of France is Paris.": [9906, 1917, 0, 578, 6864, 315, 9822, 374, 12366, 13],
    "This is a test sentence.": [2028, 374, 264, 1296, 11914, 13],
    "In 2024, 12345 apples cost $3.50.": [644, 220, 2366, 19, 11, 220, 4513, 1774, 41776, 2853, 400, 18, 13, 1135,
                                          13],
    "<|start_header_id|>user<|end_header_id|>\n\n": [128006, 882, 128007, 271],
    "<|start_header_id|>system<|end_header_id|>\n\n": [128006, 9125, 128007, 271],
    "<|start_header_id|>assistant<|end_header_id|>\n\n": [128006, 78191, 128007, 271],
    "<|eot_id|>": [128009],
}
CHATML_FRANCE_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]  # §4.3

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi!\n"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x"}],
    [],
]


# --- without artifacts ---

def test_llama3_template_text():
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"}]
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    assert llama3_chat(msgs) == (head + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                                 "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3_chat(msgs[1:], add_generation_prompt=False) == (
        head + LLAMA3_DATE_HEADER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    assert llama3_chat(msgs[1:], add_generation_prompt=False, default_system=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")


def test_chatml_template_text():
    msgs = [{"role": "user", "content": "Hi\n"}]
    assert chatml_chat(msgs, default_system=False) == "<|im_start|>user\nHi\n<|im_end|>\n<|im_start|>assistant\n"
    assert chatml_chat(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi\n<|im_end|>\n")
    assert chatml_chat([{"role": "system", "content": "S"}] + msgs).startswith("<|im_start|>system\nS<|im_end|>\n<|")


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte, GPT-2's byte-to-unicode alphabet, no merges."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer(tok)


def test_plain_tokenizer_has_no_family(tmp_path):
    tok = byte_level_tokenizer()
    assert (tok.family, tok.bos_id, tok.eos_ids, tok.vocab_size) == (None, None, frozenset(), 256)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(tmp_path).encode("é") == tok.encode("é") and len(tok.encode("é")) == 2


def test_from_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="mplus fetch"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def check_stream(tok: Tokenizer, ids: list[int]) -> None:
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=24))
def test_stream_decoder_on_raw_bytes(ids):
    check_stream(byte_level_tokenizer(), ids)


def test_stream_decoder_holds_split_characters():
    tok = byte_level_tokenizer()
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in tok.encode("a🙂b")] == ["a", "", "", "", "🙂", "b"]
    assert stream.push(tok.encode("é")[0]) == "" and stream.flush() == "\ufffd"


# --- the real tokenizers ---

@pytest.fixture(scope="module")
def smollm(artifacts) -> Tokenizer:
    return Tokenizer.from_file(artifacts.smollm2_dir)


@pytest.fixture(scope="module")
def llama(artifacts) -> Tokenizer:
    return Tokenizer.from_file(artifacts.llama31_tokenizer)


@pytest.mark.real
@pytest.mark.parametrize("text", SMOLLM2_IDS)
def test_smollm2_ids(smollm, text):
    assert smollm.encode(text) == SMOLLM2_IDS[text]
    assert smollm.encode(text, add_special_tokens=True) == SMOLLM2_IDS[text]  # no post-processor: no BOS
    assert smollm.decode(SMOLLM2_IDS[text]) == text


@pytest.mark.real
@pytest.mark.parametrize("text", LLAMA31_IDS)
def test_llama31_ids(llama, text):
    assert llama.encode(text) == LLAMA31_IDS[text]
    assert llama.decode(LLAMA31_IDS[text]) == text


@pytest.mark.real
def test_special_tokens(smollm, llama):
    assert llama.encode("Hello world", add_special_tokens=True) == [128000, 9906, 1917]
    assert llama.encode("This is a test sentence.", add_special_tokens=True) == [128000] + LLAMA31_IDS[
        "This is a test sentence."]
    assert (llama.family, llama.bos_id, llama.eos_ids, llama.vocab_size) == (
        "llama3", 128000, {128001, 128008, 128009}, 128256)
    assert (smollm.family, smollm.bos_id, smollm.eos_ids, smollm.vocab_size) == ("chatml", 1, {2}, 49152)
    assert llama.token_to_id("<|reserved_special_token_247|>") == 128255 and llama.token_to_id("<|image|>") is None
    assert llama.decode([128000, 9906, 1917], skip_special_tokens=True) == "Hello world"


@pytest.mark.real
def test_llama31_chat_ids(llama):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "This is a test sentence."}]
    prompt = llama.apply_chat_template(msgs)
    expected = ([128000] + LLAMA31_IDS["<|start_header_id|>system<|end_header_id|>\n\n"]
                + llama.encode(LLAMA3_DATE_HEADER + "You are terse.") + [128009]
                + LLAMA31_IDS["<|start_header_id|>user<|end_header_id|>\n\n"]
                + LLAMA31_IDS["This is a test sentence."] + [128009]
                + LLAMA31_IDS["<|start_header_id|>assistant<|end_header_id|>\n\n"])
    assert llama.encode(prompt) == expected
    assert llama.decode(expected) == prompt


@pytest.mark.real
def test_chatml_prompt_ids(smollm):
    msgs = CONVERSATIONS[0]
    assert smollm.encode(smollm.apply_chat_template(msgs, default_system=False)) == CHATML_FRANCE_IDS
    system = smollm.encode(smollm.apply_chat_template(msgs))[:-len(CHATML_FRANCE_IDS)]
    assert system[:3] == [1, 9690, 198] and system[-2:] == [2, 198]  # <|im_start|>system\n ... <|im_end|>\n


@pytest.fixture(scope="module")
def gguf_chat_template(artifacts):
    """The chat_template stored in the GGUF, compiled the way transformers does (sandboxed jinja2)."""
    sandbox = importlib.import_module("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(GGUFFile(artifacts.smollm2_gguf).metadata["tokenizer.chat_template"])


@pytest.mark.real
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_the_gguf_template(gguf_chat_template, smollm, conversation, add_generation_prompt):
    msgs = CONVERSATIONS[conversation]
    rendered = gguf_chat_template.render(messages=msgs, add_generation_prompt=add_generation_prompt)
    assert smollm.apply_chat_template(msgs, add_generation_prompt) == rendered


def _gpt2_unicode_to_byte() -> dict[str, int]:
    # Bytes 33-126, 161-172, 174-255 stand for themselves; the other 68, in order, for code points 256, 257, ...
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


@pytest.mark.real
def test_llama31_vocab_rebuilds_metas_tokenizer_model(artifacts, llama):
    to_byte = _gpt2_unicode_to_byte()
    vocab = sorted(llama.tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(128000))
    ranks = b"".join(base64.b64encode(bytes(to_byte[c] for c in token)) + b" %d\n" % i for token, i in vocab)
    assert ranks == artifacts.llama31_tokenizer_model.read_bytes()


@pytest.mark.real
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stream_decoder_on_real_tokenizers(smollm, llama, data):
    tok = data.draw(st.sampled_from([smollm, llama]))
    chunks = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1).map(lambda i: [i]),
                                          st.text(max_size=6).map(tok.encode)), max_size=10))
    check_stream(tok, [i for chunk in chunks for i in chunk])


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(artifacts, smollm):
    """transformers converts the GGUF's tokenizer by its own code (about 9 s): an independent construction."""
    auto = importlib.import_module("transformers").AutoTokenizer.from_pretrained(
        artifacts.smollm2_gguf.parent, gguf_file=artifacts.smollm2_gguf.name)
    texts = [*SMOLLM2_IDS, "Ünïcödé\r\n\r\n  tabs\t\tand 3.14159e-10 <|endoftext|>", "x" * 50 + " 🙂🙂 ok"]
    for text in texts:
        assert smollm.encode(text) == auto.encode(text, add_special_tokens=False), text
