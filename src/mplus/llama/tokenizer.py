"""A thin wrapper on `tokenizers.Tokenizer`: explicit special-token handling, stop ids, chat templates, streaming.

Two families are recognised from the special tokens present:
  * "llama3": Llama-3.1 (<|begin_of_text|>, <|start_header_id|>, <|eot_id|>, ...). Its post-processor adds BOS
    only on `encode(..., add_special_tokens=True)`; chat prompts already contain BOS as text.
  * "chatml": SmolLM2 (<|im_start|>, <|im_end|>). Nothing is ever added on encode.
Any other tokenizer.json still encodes and decodes; it has family None and no chat template.
"""
from __future__ import annotations

import os
from pathlib import Path

import tokenizers

LLAMA3_DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# family -> (bos token, stop tokens)
_FAMILIES = {
    "llama3": ("<|begin_of_text|>", ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    "chatml": ("<|im_start|>", ("<|im_end|>",)),
}
_FAMILY_MARKERS = {"llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                   "chatml": ("<|im_start|>", "<|im_end|>")}


MAX_FILE_BYTES = 256 << 20  # Llama-3.1's tokenizer.json is 9 MB


class TokenizerError(ValueError):
    """A tokenizer file that is missing or malformed, or a tokenizer that does not fit the model or the ids."""


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok  # the underlying `tokenizers` object
        self.family = next((f for f, marks in _FAMILY_MARKERS.items()
                             if all(tok.token_to_id(m) is not None for m in marks)), None)
        bos, stops = _FAMILIES.get(self.family, (None, ()))
        self.bos_id: int | None = tok.token_to_id(bos) if bos else None
        self.eos_ids: frozenset[int] = frozenset(i for i in map(tok.token_to_id, stops) if i is not None)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json, or the tokenizer.json inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path} (run `mplus fetch` to create the real ones)")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TokenizerError(f"{path} has {path.stat().st_size} bytes, more than a tokenizer.json's "
                                 f"{MAX_FILE_BYTES >> 20} MB; is it the right file?")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown schema
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (128256 for Llama-3.1, 49152 for SmolLM2)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a tokenizer that can produce ids the model has no embedding row for (they would be fed to the
        model as out-of-range ids). A tokenizer with fewer ids than the model is fine (embedding tables are often
        padded); decode() refuses any id it lacks, so a padded id that the model emits is never dropped silently."""
        top = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= model_vocab_size:
            raise TokenizerError(f"the tokenizer produces ids up to {top}, but the model's vocabulary has only "
                             f"{model_vocab_size} ids (0..{model_vocab_size - 1}): they do not belong together; "
                             "use the model's own tokenizer.json (--tokenizer, or the one in the model folder)")

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are always recognised; with
        add_special_tokens=True the post-processor may add more (Llama-3.1: a leading BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor/array). An id without a token is refused: the
        `tokenizers` library would drop it without a word."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < 2**32 or self.tok.id_to_token(i) is None:  # tokenizers ids are u32
                raise TokenizerError(f"token id {i} has no token in this tokenizer ({self.vocab_size} ids): the ids "
                                 "come from a model with a larger vocabulary; use the model's own tokenizer.json")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            default_system: bool = True) -> str:
        """The prompt text for a conversation of {"role", "content"} messages; encode it with
        add_special_tokens=False (it already holds every special token, BOS included).

        Reproduces the official templates for text-only chats. With default_system=False, a conversation
        without a system message gets no system block at all (no date header for Llama-3.1, no default
        SmolLM system message)."""
        if self.family == "llama3":
            return llama3_chat(messages, add_generation_prompt, default_system)
        if self.family == "chatml":
            return chatml_chat(messages, add_generation_prompt, default_system)
        raise ValueError("this tokenizer has no chat template (neither Llama-3 nor ChatML special tokens)")


def llama3_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True,
                default_system: bool = True) -> str:
    """Meta's Llama-3.1 Instruct template without tools: BOS, a system block that always starts with the
    knowledge-cutoff and date lines (date fixed at the template's default, 26 Jul 2024), then every turn with
    its content stripped of surrounding whitespace, as the official template's `| trim` does."""
    parts = ["<|begin_of_text|>"]
    has_system = bool(messages) and messages[0]["role"] == "system"
    if has_system or default_system:
        system = messages[0]["content"].strip() if has_system else ""
        parts.append(_llama3_turn("system", LLAMA3_DATE_HEADER + system))
    for m in messages[1:] if has_system else messages:
        parts.append(_llama3_turn(m["role"], m["content"].strip()))
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _llama3_turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def chatml_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True,
                default_system: bool = True) -> str:
    """SmolLM2's template, as stored in its GGUF (`tokenizer.chat_template`): ChatML turns, contents kept
    verbatim, and a default system message before a first message that is not a system one."""
    parts = []
    if default_system and messages and messages[0]["role"] != "system":
        parts.append(_chatml_turn("system", SMOLLM_DEFAULT_SYSTEM))
    parts += [_chatml_turn(m["role"], m["content"]) for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _chatml_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


class StreamDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals `decode(all ids)`.

    A character can be split across tokens (byte-level BPE), so pending ids are decoded together and held back
    while their text ends in U+FFFD, the replacement for an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly empty)."""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        # The text ends on a complete character, so later bytes cannot change it: start afresh.
        self.pending = []
        return text

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD)."""
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens)
        self.pending = []
        return text
