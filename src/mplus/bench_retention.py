"""`mplus bench retention`: the paper's knowledge-retention experiment in miniature (M+ paper, figure 4).

Per episode: a fresh person of the test partition (never seen in training; the seed draws new ones), one fact
about them written into memory at the end of a short chunk, then D filler chunks, then the question. Accuracy
= the answer is contained in the first line of the greedy reply (at most 16 tokens, stopping at end of text;
the model replies with a sentence such as "Talvori Quen lives in Brastow."). The same weights run three ways:

  * mplus      the full model: dropped STM rows move to the LTM, the retriever brings K0 of them back;
  * memoryllm  the same state with the LTM switched off (state.without_ltm(): same STM, same drops);
  * no_context the question asked of the untouched memory: what the model guesses without the fact.

Distances are counted in injected tokens after the fact chunk (mean over episodes). d50 is the distance at
which accuracy first falls to half its distance-0 value (linear interpolation between measured points).
Retriever recall: of the fact's rows that are in the LTM (or the dropped-row cache), the share the question
retrieves, per layer, against the random rate K0 / (LTM + cache rows).
"""
from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

import tokenizers
import torch
from tqdm import tqdm

from . import cli_args as arg
from .chart import line_chart
from .facts import fact_paragraph, fresh_test_set, qa_prompt
from .io import atomic_write_text
from .ltm import copies_of
from .mplus_model import MPlus

MODELS = ("mplus", "memoryllm", "no_context")


def answered(model: MPlus, tokenizer, state, question: str, answer: str) -> bool:
    """Whether the first line of the greedy reply (at most 16 tokens, up to the model's end-of-text token)
    contains the answer."""
    out = model.generate(state, tokenizer.encode(qa_prompt(question)).ids, max_new_tokens=16)
    return answer in tokenizer.decode(out).split("\n")[0]


def recall_counts(model: MPlus, tokenizer, state, question: str, block: torch.Tensor) -> list[tuple[int, int, float]]:
    """Per layer whose LTM (+ cache) holds rows of the fact's block [L, K, d] and is scored (>= K0 rows):
    (fact rows retrieved, fact rows stored, random rate K0 / rows)."""
    record: list[dict] = []
    model.forward(state, tokenizer.encode(qa_prompt(question)).ids, record=record)
    k0, out = model.memory_config.ltm_retrieved, []
    for l, r in enumerate(record):
        n_ltm = state.ltm[l].shape[0]
        pool = torch.cat((state.ltm[l], state.cache_rows[l]))  # [S + c, d]
        fact = copies_of(pool, block[l])  # [S + c]
        if n_ltm >= k0 and fact.any():
            picked = r["index"] + r["source"] * n_ltm  # [K0] pool indices
            out.append((int(fact[picked].sum()), int(fact.sum()), k0 / pool.shape[0]))
    return out


def run(model: MPlus, tokenizer, *, seed: int, episodes: int, distances: list[int], chunk_words: int,
        filler_words: int, progress: bool = True) -> dict:
    """Accuracy per model and distance (in chunks), mean token distance, retriever recall per distance."""
    distances = sorted(set(distances))
    hits = {m: [0] * len(distances) for m in MODELS}
    tokens = [0] * len(distances)
    recall = [[0, 0, 0.0, 0] for _ in distances]  # retrieved, stored, sum of random rates, layer count
    rng = random.Random(seed)
    test = fresh_test_set(seed, n_episodes=episodes, n_distractor_chunks=max(distances), chunk_words=chunk_words)
    for i, ep in enumerate(tqdm(test, desc="retention", unit="episode", disable=not progress)):
        state = model.initial_state(seed=seed * 100_003 + i)
        floor = answered(model, tokenizer, state.copy(), ep["question"], ep["answer"])
        block = model.inject(state, tokenizer.encode(fact_paragraph(rng, ep["fact"], filler_words)).ids,
                             allow_short=True)  # [L, K, d]
        written, c = 0, 0
        for j, d in enumerate(distances):
            for chunk in ep["distractors"][c:d]:
                ids = tokenizer.encode(chunk).ids
                model.inject(state, ids, allow_short=True)
                written += len(ids)
            c = d
            tokens[j] += written
            hits["no_context"][j] += floor
            hits["mplus"][j] += answered(model, tokenizer, state, ep["question"], ep["answer"])
            hits["memoryllm"][j] += answered(model, tokenizer, state.without_ltm(), ep["question"], ep["answer"])
            for got, stored, rate in recall_counts(model, tokenizer, state, ep["question"], block):
                recall[j][0] += got
                recall[j][1] += stored
                recall[j][2] += rate
                recall[j][3] += 1
    return {"distances": distances, "tokens": [t / episodes for t in tokens], "episodes": episodes,
            "accuracy": {m: [h / episodes for h in hits[m]] for m in MODELS}, "recall": recall}


def d50(tokens: list[float], accuracy: list[float]) -> float | None:
    """The distance at which accuracy first falls to half its first (distance-0) value; None if it never does."""
    half = accuracy[0] / 2
    for j in range(1, len(tokens)):
        if accuracy[j] <= half:
            a0, a1, t0, t1 = accuracy[j - 1], accuracy[j], tokens[j - 1], tokens[j]
            return t0 + (t1 - t0) * (a0 - half) / (a0 - a1) if a0 != a1 else t1
    return None


def to_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "distance_tokens", "accuracy", "n"])
    for m in MODELS:
        for t, a in zip(result["tokens"], result["accuracy"][m]):
            writer.writerow([m, round(t), f"{a:.4f}", result["episodes"]])
    return buffer.getvalue()


def summary(result: dict) -> str:
    acc, tokens = result["accuracy"], result["tokens"]
    lines = [f"{'chunks':>6} {'tokens':>7} {'mplus':>6} {'memoryllm':>9} {'no_context':>10} {'recall':>7} {'random':>7}"]
    total = [0, 0, 0.0, 0]
    for j, d in enumerate(result["distances"]):
        got, stored, rates, n = result["recall"][j]
        total = [a + b for a, b in zip(total, result["recall"][j])]
        rec = f"{got / stored:7.3f} {rates / n:7.3f}" if stored else f"{'-':>7} {'-':>7}"
        lines.append(f"{d:6d} {tokens[j]:7.0f} {acc['mplus'][j]:6.3f} {acc['memoryllm'][j]:9.3f} "
                     f"{acc['no_context'][j]:10.3f} {rec}")
    lines.append(f"episodes per point: {result['episodes']} (fresh test-partition people)")
    span = tokens[-1]
    d_m, d_l = d50(tokens, acc["mplus"]), d50(tokens, acc["memoryllm"])
    fmt = lambda d: f"{d:.0f} tokens" if d is not None else f"> {span:.0f} tokens (never halves)"  # noqa: E731
    lines.append(f"d50: mplus {fmt(d_m)}, memoryllm {fmt(d_l)}")
    if d_l:
        ratio = (d_m or span) / d_l
        lines.append(f"d50 ratio mplus / memoryllm: {'>= ' if d_m is None else ''}{ratio:.1f}")
    if total[1]:
        recall, random_rate = total[0] / total[1], total[2] / total[3]
        lines.append(f"retriever recall of the fact's LTM rows: {recall:.3f} vs random {random_rate:.3f} "
                     f"({recall / random_rate:.1f}x), over {total[3]} layer-questions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplus bench retention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, type=arg.model_folder_with_tokenizer, help="M+ folder (default: the shipped tiny model, checkpoints/tiny-mplus)")
    # Episode i's memory drops are seeded with seed * 100_003 + i: seeds below 2^32 keep that within 63 bits.
    p.add_argument("--seed", type=arg.seed_type(2**32 - 1), default=0,
                   help="draws the test people, fillers and drops, 0..2^32-1 (default 0)")
    p.add_argument("--episodes", type=arg.positive_int, default=100, help="episodes per point (default 100)")
    p.add_argument("--distances", type=arg.int_list, default=[0, 1, 2, 4, 8, 16, 32, 64, 128, 192],
                   help="filler chunks after the fact, comma-separated (default 0,1,2,4,8,16,32,64,128,192)")
    p.add_argument("--chunk-words", type=arg.positive_int, default=48, help="words per filler chunk (default 48)")
    p.add_argument("--filler-words", type=arg.non_negative_int, default=12, help="filler words before the fact in its chunk (default 12)")
    p.add_argument("--out", type=arg.output_file, help="write the curve as CSV: model,distance_tokens,accuracy,n")
    p.add_argument("--chart", type=arg.output_file, help="write an SVG chart (default: next to --out, .svg)")
    args = p.parse_args(argv)
    from .paths import tiny_model_path
    folder = args.model or tiny_model_path()
    distances = args.distances
    if min(distances) != 0:
        p.error("--distances must include 0 (d50 is relative to the distance-0 accuracy)")
    model = MPlus.from_pretrained(folder)
    if model.memory_config.kind != "mplus":
        p.error(f"{folder} is a MemoryLLM model; the benchmark needs M+ weights (it switches the LTM off itself)")
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.manual_seed(0)  # nothing should draw from the global generator; this makes sure of it
    result = run(model, tokenizer, seed=args.seed, episodes=args.episodes, distances=distances,
                 chunk_words=args.chunk_words, filler_words=args.filler_words)
    print(summary(result))
    if args.out:
        atomic_write_text(Path(args.out), to_csv(result))
        print(f"wrote {args.out}", file=sys.stderr)
    chart = args.chart or (str(Path(args.out).with_suffix(".svg")) if args.out else None)
    if chart:
        line_chart({m: list(zip(result["tokens"], result["accuracy"][m])) for m in MODELS}, chart,
                   title=f"Knowledge retention (tiny M+, seed {args.seed}, {args.episodes} test facts per point)",
                   x_label="distance: tokens injected after the fact", y_label="accuracy")
        print(f"wrote {chart}", file=sys.stderr)
    return 0
