"""`mplus demo`: a story written into memory, buried under filler, asked back: M+ against MemoryLLM.

The project's main job (`make demo`), on the shipped tiny M+ (checkpoints/tiny-mplus) or any M+ folder (--model).

1. A story about invented people (from the test partition: the model never saw them) is written into memory,
   one fact per chunk and person, one fact of each kind; then many filler chunks push every fact out of the
   short-term memory (STM).
2. Each question is answered by M+: the retriever brings rows back from the long-term memory (LTM); the demo
   shows where the fact's rows are now (STM / LTM) and which of them each layer retrieved, with their ages.
3. The same state with the LTM switched off is MemoryLLM: its STM is identical, and it has forgotten. So has a
   MemoryLLM with as many memory rows as M+ reads (N + K0, built from the same weights by
   baselines.same_size_memoryllm), which was written the same story and filler.
4. When the story and the filler fit the model's positions, the same decoder reads them in its prompt: the
   in-context upper bound (baselines.in_context_reply).
"""
from __future__ import annotations

import argparse
import random

import torch
from tqdm import tqdm

from mplus.apps import cli_args as arg
from mplus.apps.baselines import fits_in_context, in_context_reply, same_size_memoryllm
from mplus.apps.questions import question_prompt
from mplus.data.facts import RELATIONS, distractor_chunk, draw_name, fact_example, fact_paragraph, make_entity
from mplus.memory.ltm import copies_of
from mplus.apps.fetch import load_mplus
from mplus.memory.mplus import MPlus
from mplus.llama.tokenizer import StreamDecoder, Tokenizer


def story(rng: random.Random, facts: int, filler_words: int) -> list[dict]:
    """`facts` (at most 5) facts, each about another fresh test-partition person and each of another kind (city,
    number, ...): the tiny model answers with the remembered value of the asked kind, it does not tell people
    apart (README, Training), so two facts of one kind would test what it cannot do."""
    if not 1 <= facts <= len(RELATIONS):
        raise ValueError(f"--facts must be 1..{len(RELATIONS)} (one fact per kind: {', '.join(RELATIONS)})")
    items = []
    for relation in rng.sample(RELATIONS, facts):
        entity = make_entity(rng, draw_name(rng, "test"))
        fact, question, answer = fact_example(rng, entity, relation)
        items.append(dict(fact=fact, question=question, answer=answer,
                          paragraph=fact_paragraph(rng, fact, filler_words)))
    return items


def where(state, block: torch.Tensor) -> tuple[int, int]:
    """(rows of the block in the STM, rows in the LTM or the dropped-row cache), summed over layers."""
    stm = sum(int(copies_of(state.stm[l], block[l]).sum()) for l in range(state.num_layers))
    ltm = 0 if not state.has_ltm else sum(int(copies_of(m.pool("rows"), block[l]).sum()) for l, m in enumerate(state.ltm))
    return stm, ltm


def answer(model: MPlus, tokenizer: Tokenizer, state, prompt: str, label: str) -> str:
    """Stream the greedy answer to `prompt` (the question as the model reads it) after `label`; returns it (up
    to the first line break)."""
    decoder, text = StreamDecoder(tokenizer), ""
    print(f"  {label:>16}: ", end="", flush=True)
    for token in model.generate_tokens(state, tokenizer.encode(prompt), max_new_tokens=16):
        if token in model.config.eos_token_id:
            break
        piece = decoder.push(token)
        text += piece.split("\n")[0]
        print(piece.split("\n")[0], end="", flush=True)
        if "\n" in piece:
            break
    return text.strip()


def answer_in_context(model: MPlus, tokenizer: Tokenizer, ids: list[int]) -> str:
    """The in-context reply (up to the first line break), printed like answer()."""
    text = tokenizer.decode(in_context_reply(model, ids)).split("\n")[0]
    print(f"  {'in context':>16}: {text}", end="", flush=True)
    return text.strip()


def show_retrieval(model: MPlus, tokenizer: Tokenizer, state, prompt: str, block: torch.Tensor) -> None:
    record: list[dict] = []
    model.forward(state, tokenizer.encode(prompt), record=record)
    for l, r in enumerate(record):
        pool = state.ltm[l].pool("rows")  # [S + c, d]
        picked = r["retrieved"].picks  # [K0] pool rows in feeding order
        fact = copies_of(pool, block[l])
        ages = r["retrieved"].ages[fact[picked]].tolist()
        print(f"    layer {l}: retrieved {len(ages):2d} of this fact's {int(fact.sum()):2d} LTM rows "
              f"(out of {pool.shape[0]} LTM rows; {model.memory_config.ltm_retrieved} retrieved)"
              + (f", ages {min(ages)}..{max(ages)}" if ages else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=arg.model_folder_with_tokenizer,
                   help="M+ folder (default: the shipped tiny model, checkpoints/tiny-mplus)")
    p.add_argument("--seed", type=arg.seed, default=0, help="draws the people, the filler and the drops (default 0)")
    p.add_argument("--facts", type=arg.positive_int, default=2,
                   help="facts in the story, one per kind and person (1..5, default 2)")
    p.add_argument("--chunks", type=arg.non_negative_int, default=100, help="filler chunks after the story (default 100)")
    p.add_argument("--chunk-words", type=arg.positive_int, default=48, help="words per filler chunk (default 48)")


def run(args: argparse.Namespace) -> None:
    from mplus.apps.paths import tiny_model_path
    folder = args.model or tiny_model_path()
    model = load_mplus(folder)
    tokenizer = Tokenizer.from_file(folder)
    tokenizer.check_model_vocab(model.config.vocab_size)
    mem = model.memory_config
    big_name = f"MemoryLLM-{mem.stm_size + mem.ltm_retrieved}"
    try:
        big = same_size_memoryllm(model)
    except ValueError as e:  # a stored memory whose LTM holds fewer than K0 rows
        big = None
        print(f"{big_name} is left out: {e}")
    rng = random.Random(args.seed)
    items = story(rng, args.facts, 12)
    state, big_state = model.initial_state(seed=args.seed), big and big.initial_state(seed=args.seed)
    print(f"Tiny M+ from {folder}: {model.config.num_hidden_layers} layers, d {model.config.hidden_size}; per layer "
          f"an STM of {mem.stm_size} rows, {mem.num_tokens} new rows per chunk, {mem.ltm_retrieved} rows retrieved "
          f"from the LTM. Baselines: MemoryLLM (the same state, LTM off: {mem.stm_size} rows) and {big_name} (the "
          f"same weights with {mem.stm_size + mem.ltm_retrieved} STM rows, as many as M+ reads).\n"
          f"Every model is asked {question_prompt(model, '<question>')!r}"
          + (" (the checkpoint's question template).\n\n" if mem.question_template else
             " (the fact task's format; the checkpoint has no question template).\n\n")
          + "The story (people the model never saw in training), one chunk per fact:")
    texts = []
    for item in items:
        print("  " + item["fact"])
        ids = tokenizer.encode(item["paragraph"])
        item["block"] = model.inject(state, ids, allow_short=True)
        if big:
            big.inject(big_state, ids, allow_short=True)
        texts.append(item["paragraph"])
    written = 0
    for _ in tqdm(range(args.chunks), desc="injecting filler", unit="chunk"):
        texts.append(distractor_chunk(rng, args.chunk_words))
        ids = tokenizer.encode(texts[-1])
        model.inject(state, ids, allow_short=True)
        if big:
            big.inject(big_state, ids, allow_short=True)
        written += len(ids)
    print(f"\n{args.chunks} filler chunks ({written} tokens) written after the story. Example of filler:\n  "
          f"{distractor_chunk(random.Random(args.seed + 1), 24)}\n")
    forgot = state.without_ltm()
    readers = [("M+", model, state), ("MemoryLLM", model, forgot)] + ([(big_name, big, big_state)] if big else [])
    score = {"M+": 0, "MemoryLLM": 0, big_name: 0, "in context": 0}
    fitted = 0
    for item in items:
        stm_rows, ltm_rows = where(state, item["block"])
        print(f"Q: {item['question']}   (true answer: {item['answer']}; this fact's rows now: {stm_rows} in the STM, "
              f"{ltm_rows} in the LTM)")
        prompt = question_prompt(model, item["question"])
        for label, m, s in readers:
            ok = item["answer"] in answer(m, tokenizer, s, prompt, label)
            score[label] += ok
            print("   " + ("correct" if ok else "wrong"))
        ids = tokenizer.encode(" ".join(texts) + "\n" + prompt)
        if fits_in_context(model, len(ids)):
            fitted += 1
            ok = item["answer"] in answer_in_context(model, tokenizer, ids)
            score["in context"] += ok
            print("   " + ("correct" if ok else "wrong"))
        else:
            print(f"  {'in context':>16}: the story and filler ({len(ids)} tokens) do not fit the model's "
                  f"{model.config.max_position_embeddings} positions")
        show_retrieval(model, tokenizer, state, prompt, item["block"])
    n = len(items)
    print(f"\nM+ answered {score['M+']} of {n}; MemoryLLM (the same weights and STM, LTM off) {score['MemoryLLM']} "
          f"of {n}" + (f"; {big_name} (as many memory rows as M+ reads) {score[big_name]} of {n}" if big else "")
          + (f"; in context (the upper bound) {score['in context']} of the {fitted} that fit." if fitted else "."))
