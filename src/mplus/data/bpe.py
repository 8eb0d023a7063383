"""Train a small byte-level BPE tokenizer on the project's own corpus (mplus.data.facts).

Byte-level means every string encodes (the 256 byte symbols are always in the vocabulary) and decodes back
exactly: no normaliser, no unknown token, no prefix space. Special tokens have fixed ids: <|bos|> 0, <|eos|> 1,
<|pad|> 2; nothing is added on encode, the caller places BOS/EOS itself.

Training has no randomness: given the same texts in the same order, the `tokenizers` BPE trainer produces the
same merges (checked by the tests across processes with different hash seeds), so the corpus seed fixes the
tokenizer.

Vocabulary size: 2048 by default. The corpus's fixed words (filler, templates, attribute values) then become
single tokens and names a few syllable-sized pieces; larger vocabularies mostly add whole train names, which
test names (never in the corpus) cannot use, and cost embedding parameters in a few-million-parameter model.
"""
from __future__ import annotations

import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mplus.data import facts
from mplus.formats.atomic import atomic_write_text

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 0, 1, 2: the trainer adds them first, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> tokenizers.Tokenizer:
    """A byte-level BPE of `vocab_size` ids (special tokens and the 256 byte symbols included)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, f"{special} did not get id {i}"
    return tok


def train_on_corpus(seed: int, n_docs: int = 2000, vocab_size: int = 2048) -> tokenizers.Tokenizer:
    """The tokenizer of facts.corpus(seed, n_docs): what training a model on that corpus should use."""
    return train_tokenizer(facts.corpus(seed, n_docs), vocab_size)


def save_tokenizer(tok: tokenizers.Tokenizer, path: str | os.PathLike) -> None:
    """Write tokenizer.json atomically; it loads with mplus.llama.tokenizer.Tokenizer.from_file (family None)."""
    atomic_write_text(path, tok.to_str())
