"""`mplus demo-real`: SmolLM2-135M-Instruct with a trained memory remembers a paragraph under filler.

The shipped checkpoints/smollm2-mplus holds only what training added to SmolLM2 (fetched on first use). A
paragraph (the default: invented people the model never saw in training; or your own with --file) is written
into memory one sentence per chunk, as the model was trained; then --chunks chunks of filler push it out of
the short-term memory. Each question is answered, streaming, by M+ (retrieving from its long-term memory) and
by MemoryLLM (the same weights and short-term memory, the LTM off), in plain form or in the chat template.
"""
from __future__ import annotations

import argparse
import random
import re

from tqdm import tqdm

from mplus.apps import cli_args as arg
from mplus.apps.demo import answer
from mplus.apps.fetch import load_mplus
from mplus.apps.retention_trials import people_prompt
from mplus.data import people as P
from mplus.data.prose import passage
from mplus.llama.tokenizer import Tokenizer

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=arg.model_folder_with_tokenizer, default=None,
                   help="an M+ trained on people (default: the shipped checkpoints/smollm2-mplus)")
    p.add_argument("--file", type=arg.input_file, default=None,
                   help="your own paragraph (UTF-8 text; written one sentence per chunk); give questions with --ask")
    p.add_argument("--ask", action="append", default=None, metavar="QUESTION",
                   help="a question to ask after the filler (repeat for more; default: one per fact of the default "
                        "paragraph)")
    p.add_argument("--chunks", type=arg.non_negative_int, default=60, help="filler chunks after the paragraph (default 60)")
    p.add_argument("--chunk-words", type=arg.positive_int, default=24, help="words per filler chunk (default 24)")
    p.add_argument("--form", choices=("plain", "chat", "both"), default="both",
                   help="ask in plain form, in the chat template, or alternate (default both)")
    p.add_argument("--seed", type=arg.seed, default=0, help="draws the default people, the filler and the drops")


def default_paragraph(rng: random.Random, n_people: int = 2, facts_each: int = 2
                      ) -> tuple[list[str], list[tuple[str, str]]]:
    """Sentences about n_people invented test-partition people, facts_each facts each, every fact of another
    kind (the model tells kinds apart far better than people: see docs/real-model.md), and (question, answer)."""
    sentences, questions = [], []
    kinds = iter(rng.sample(P.ATTRIBUTES, n_people * facts_each))
    for person in P.draw_people(rng, "test", n_people):
        for attribute in (next(kinds) for _ in range(facts_each)):
            sentences.append(P.statement(rng, person, attribute))
            questions.append((P.question(rng, person, attribute), P.answer(person, attribute)))
    return sentences, questions


def sentences_of(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def run(args: argparse.Namespace) -> None:
    from mplus.apps.paths import shipped_model_path
    if args.file is not None and not args.ask:
        raise arg.CliError("with --file, give the questions to ask with --ask \"...\" (one per question)")
    folder = args.model or shipped_model_path("smollm2-mplus", "make train-smol")
    model = load_mplus(folder)
    tokenizer = Tokenizer.from_file(folder)
    tokenizer.check_model_vocab(model.config.vocab_size)
    if model.memory_config.task != "people":
        raise arg.CliError(f"{folder} was not trained on plain-English people (config.json \"mplus_task\"); "
                           "try `mplus demo` for the tiny model")
    rng = random.Random(args.seed)
    if args.file is not None:
        sentences, questions = sentences_of(arg.read_text(args.file)), [(q, None) for q in args.ask]
    else:
        sentences, questions = default_paragraph(rng)
        if args.ask:
            questions = [(q, None) for q in args.ask]
    state = model.initial_state(seed=args.seed)
    print("Written into memory, one sentence per chunk:")
    for s in sentences:
        print("  " + s)
        model.inject(state, tokenizer.encode(s), allow_short=True)
    for _ in tqdm(range(args.chunks), desc="burying it under filler", unit="chunk"):
        model.inject(state, tokenizer.encode(passage(rng, args.chunk_words)), allow_short=True)
    print(f"\n{args.chunks} filler chunks later, e.g. \"{passage(random.Random(args.seed + 1), 16)}\"\n")
    forgot, score = state.without_ltm(), {"M+": 0, "MemoryLLM": 0}
    for i, (question, expected) in enumerate(questions):
        form = args.form if args.form != "both" else ("plain", "chat")[i % 2]
        print(f"Q ({form}): {question}" + (f"   [true answer: {expected}]" if expected else ""))
        prompt = people_prompt(model, tokenizer, question, form)
        for label, s in (("M+", state), ("MemoryLLM", forgot)):
            reply = answer(model, tokenizer, s, prompt, label)
            if expected:
                ok = P.is_right(reply, expected)
                score[label] += ok
                print("   " + ("correct" if ok else "wrong"))
            else:
                print()
    if all(e for _, e in questions):
        n = len(questions)
        print(f"\nM+ answered {score['M+']} of {n}; MemoryLLM (same weights and STM, LTM off) {score['MemoryLLM']} of {n}")
