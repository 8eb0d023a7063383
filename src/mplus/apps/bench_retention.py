"""`mplus bench retention`: the paper's knowledge-retention experiment in miniature (M+ paper, figure 4).

Per episode: a fresh person of the test partition (never seen in training; the seed draws new ones), one fact
about them written into memory at the end of a short chunk, then D filler chunks, then the question. Accuracy
= the answer is contained in the first line of the greedy reply (at most 16 tokens, stopping at end of text;
the model replies with a sentence such as "Talvori Quen lives in Brastow."). The same weights run five ways:

  * mplus           the full model: dropped STM rows move to the LTM, the retriever brings K0 of them back;
  * memoryllm       the same state with the LTM switched off (state.without_ltm(): same N STM rows, same drops);
  * memoryllm_nR    a MemoryLLM with as many memory rows as M+ reads, R = N + K0 (baselines.same_size_memoryllm);
  * in_context      the plain decoder with the fact's chunk, the filler and the question in its prompt
                    (baselines.in_context_reply): the upper bound, at the distances that fit its positions;
  * no_context      the question asked of the untouched memory: what the model guesses without the fact.

Where M+ forgets: a dropped row waits in a cache until the next merge (every update_ltm_frequency chunks),
enters the LTM with rf = initial_rf_when_moving_stm_to_ltm and is evicted when the per-merge decay has
brought rf to 0 (ltm_lifetime). The default distances run to twice that lifetime, and the benchmark prints the
setting, since the released M+ uses rf 10 and the shipped tiny model 20 (--initial-rf changes it).

Distances are counted in injected tokens after the fact chunk (mean over episodes). d50 is the distance at
which accuracy first falls to half its distance-0 value, by linear interpolation in tokens between the two
measured points around it. Retriever recall: of the fact's rows that are in the LTM (or the dropped-row cache),
the share the question retrieves, per layer, against the random rate K0 / (LTM + cache rows).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import sys
from pathlib import Path

import torch

from mplus.apps import cli_args as arg
from mplus.apps.chart import line_chart
from mplus.apps.fetch import load_mplus
from mplus.apps.retention_episodes import count_hits, in_processes, interference, model_names
from mplus.apps.retention_trials import FORMS, trials
from mplus.formats.atomic import atomic_write_text
from mplus.llama.tokenizer import Tokenizer
from mplus.memory.config import MemoryConfig
from mplus.memory.mplus import MPlus

OFFICIAL_INITIAL_RF = 10.0  # initial_rf_when_moving_stm_to_ltm of the released M+ (its config.json)


def ltm_lifetime(mem: MemoryConfig) -> int | None:
    """Chunks (updates) from the merge that moves a dropped row into the LTM to the merge that evicts it; None
    if rows never expire. The row enters with rf = initial_rf_when_moving_stm_to_ltm, every merge (its own
    included) subtracts decay_frequency, and the merge that leaves rf <= 0.01 evicts it (ltm.merge); merges come
    every update_ltm_frequency updates. Shipped tiny model: rf 20, a merge every 12 updates, 19 * 12 = 228."""
    if mem.kind != "mplus" or mem.decay_frequency <= 0:
        return None
    rf, merges = mem.initial_rf_when_moving_stm_to_ltm - mem.decay_frequency, 0
    while rf > 0.01:
        rf, merges = rf - mem.decay_frequency, merges + 1
    return merges * mem.update_ltm_frequency


def default_distances(lifetime: int | None) -> list[int]:
    """Powers of two up to 128 chunks, then 1x to 2x the LTM lifetime (denser just after it, where M+ forgets)."""
    near = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    if lifetime is None:
        return near + [192]
    return sorted(set(near + [round(f * lifetime) for f in (1.0, 1.05, 1.1, 1.2, 1.5, 2.0)]))


def run(model: MPlus, tokenizer: Tokenizer, *, seed: int, episodes: int, distances: list[int], chunk_words: int,
        filler_words: int, progress: bool = True, in_context_tokens: int | None = None,
        skip: tuple[str, ...] = (), jobs: int = 1, folder: str | Path | None = None) -> dict:
    """Accuracy per model and distance (in chunks), mean token distance, retriever recall per distance, and
    M+'s accuracy per question form (plain / chat; the tiny model's questions are all plain).

    accuracy["in_context"][j] is None where some episode's prompt does not fit the model's positions, or is
    longer than in_context_tokens. skip leaves out baselines (memoryllm_nR, in_context) to save time. jobs > 1
    runs the episodes in that many processes (each loads the model from `folder`, one thread each): episodes
    are independent and seeded by their index, so the result is the same."""
    distances = sorted(set(distances))
    names = model_names(model)
    big_name, skipped = names[2], {m: "left out (--skip)" for m in skip}
    test = trials(model, tokenizer, seed=seed, episodes=episodes, n_chunks=max(distances), chunk_words=chunk_words,
                  filler_words=filler_words)
    job = dict(seed=seed, distances=distances, in_context_tokens=in_context_tokens, skip=tuple(skip),
               chunk_words=chunk_words, filler_words=filler_words, episodes=episodes)
    if jobs > 1:
        counts = in_processes(folder, model.memory_config.to_dict(), job, jobs)
    else:
        counts = count_hits(model, tokenizer, test, range(episodes), job, progress)
    if counts["big_error"]:
        skipped[big_name] = counts["big_error"]
    hits, fits = counts["hits"], counts["fits"]
    accuracy = {m: [h / episodes for h in hits[m]] for m in names}
    accuracy["in_context"] = [a if f == episodes else None for a, f in zip(accuracy["in_context"], fits)]
    for m in skipped:
        accuracy[m] = [None] * len(distances)
    mem = model.memory_config
    forms = {f: sum(ep["form"] == f for ep in test) for f in FORMS}
    return {"distances": distances, "tokens": [t / episodes for t in counts["tokens"]], "episodes": episodes,
            "models": names, "accuracy": accuracy, "recall": counts["recall"], "skipped": skipped,
            "mplus_by_form": {f: [h / forms[f] for h in counts["by_form"][f]] for f in FORMS if forms[f]},
            "ltm": {"initial_rf": mem.initial_rf_when_moving_stm_to_ltm, "decay": mem.decay_frequency,
                    "merge_every": mem.update_ltm_frequency, "lifetime": ltm_lifetime(mem)}}


def d50(tokens: list[float], accuracy: list[float]) -> float | None:
    """The distance at which accuracy first falls to half its first (distance-0) value; None if it never does."""
    half = accuracy[0] / 2
    for j in range(1, len(tokens)):
        if accuracy[j] <= half:
            a0, a1, t0, t1 = accuracy[j - 1], accuracy[j], tokens[j - 1], tokens[j]
            return t0 + (t1 - t0) * (a0 - half) / (a0 - a1) if a0 != a1 else t1
    return None


def to_csv(result: dict) -> str:
    """model,distance_tokens,accuracy,n: one row per model and measured distance (in_context where it fits)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "distance_tokens", "accuracy", "n"])
    for m in result["models"]:
        for t, a in zip(result["tokens"], result["accuracy"][m]):
            if a is not None:
                writer.writerow([m, round(t), f"{a:.4f}", result["episodes"]])
    return buffer.getvalue()


def measured(result: dict, m: str) -> tuple[list[float], list[float]]:
    """(tokens, accuracy) of model m at the distances where it was measured."""
    pairs = [(t, a) for t, a in zip(result["tokens"], result["accuracy"][m]) if a is not None]
    return [t for t, _ in pairs], [a for _, a in pairs]


def lifetime_tokens(result: dict) -> float | None:
    """The LTM lifetime in tokens: lifetime chunks times the measured mean tokens per filler chunk."""
    life, chunks = result["ltm"]["lifetime"], result["distances"][-1]
    return None if life is None or chunks == 0 else life * result["tokens"][-1] / chunks


def setting(result: dict) -> str:
    ltm, life = result["ltm"], result["ltm"]["lifetime"]
    official = "" if ltm["initial_rf"] == OFFICIAL_INITIAL_RF else f" (the released M+ uses {OFFICIAL_INITIAL_RF:g})"
    text = (f"LTM: initial_rf_when_moving_stm_to_ltm {ltm['initial_rf']:g}{official}, decay {ltm['decay']:g} per "
            f"merge, a merge every {ltm['merge_every']} chunks: ")
    if life is None:
        return text + "rows never expire"
    tokens = lifetime_tokens(result)
    return text + (f"a dropped row leaves the LTM {life} chunks" + (f" (~{tokens:.0f} tokens)" if tokens else "")
                   + f" after the merge that stored it, which comes 0-{ltm['merge_every'] - 1} chunks after the drop")


def summary(result: dict) -> str:
    acc, tokens, names = result["accuracy"], result["tokens"], result["models"]
    width = [max(6, len(m)) for m in names]
    lines = [f"{'chunks':>6} {'tokens':>7} " + " ".join(f"{m:>{w}}" for m, w in zip(names, width))
             + f" {'recall':>7} {'random':>7}"]
    total = [0, 0, 0.0, 0]
    for j, d in enumerate(result["distances"]):
        got, stored, rates, n = result["recall"][j]
        total = [a + b for a, b in zip(total, result["recall"][j])]
        rec = f"{got / stored:7.3f} {rates / n:7.3f}" if stored else f"{'-':>7} {'-':>7}"
        cells = [f"{acc[m][j]:{w}.3f}" if acc[m][j] is not None else f"{'-':>{w}}" for m, w in zip(names, width)]
        lines.append(f"{d:6d} {tokens[j]:7.0f} " + " ".join(cells) + f" {rec}")
    lines.append(f"episodes per point: {result['episodes']} (fresh test-partition people); in_context only where "
                 "fact, filler, question and reply fit the model's positions")
    for form, acc_form in result.get("mplus_by_form", {}).items():
        if len(result["mplus_by_form"]) > 1:
            lines.append(f"mplus, {form} questions only: " + " ".join(f"{a:.3f}" for a in acc_form))
    lines.append(setting(result))
    lines += [f"{m} not measured: {why}" for m, why in result.get("skipped", {}).items()]
    found = {}
    for m in names[:-1]:
        t, a = measured(result, m)
        if t:
            found[m] = (d50(t, a), t[-1])
    fmt = lambda d, span: f"{d:.0f} tokens" if d is not None else f"> {span:.0f} tokens (never halves)"  # noqa: E731
    lines.append("d50 (linear interpolation in tokens between the measured points around half the distance-0 "
                 "accuracy): " + ", ".join(f"{m} {fmt(*v)}" for m, v in found.items()))
    d_m, span = found["mplus"]
    for base in names[1:3]:
        d_b = found.get(base, (None,))[0]
        if d_b:
            lines.append(f"d50 ratio mplus / {base}: {'>= ' if d_m is None else ''}{(d_m or span) / d_b:.1f}")
    if total[1]:
        recall, random_rate = total[0] / total[1], total[2] / total[3]
        lines.append(f"retriever recall of the fact's LTM rows: {recall:.3f} vs random {random_rate:.3f} "
                     f"({recall / random_rate:.1f}x), over {total[3]} layer-questions")
    return "\n".join(lines)


def chart(result: dict, path: str | Path, title: str) -> None:
    """The curves on a log distance axis, with a vertical line at the LTM lifetime."""
    life = lifetime_tokens(result)
    markers = {f"LTM lifetime ({result['ltm']['lifetime']} chunks)": life} if life else {}
    series = {m: list(zip(*measured(result, m))) for m in result["models"]}
    line_chart({m: pts for m, pts in series.items() if pts}, path, title=title,
               x_label="distance: tokens injected after the fact", y_label="accuracy", markers=markers)


def skip_list(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names or not set(names) <= {"memoryllm_nR", "in_context"}:
        raise argparse.ArgumentTypeError(f"{value!r}: name memoryllm_nR and/or in_context, comma-separated")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplus bench retention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, type=arg.model_folder_with_tokenizer, help="M+ folder (default: the shipped tiny model, checkpoints/tiny-mplus)")
    # Episode i's memory drops are seeded with seed * 100_003 + i: seeds below 2^32 keep that within 63 bits.
    p.add_argument("--seed", type=arg.seed_type(2**32 - 1), default=0,
                   help="draws the test people, fillers and drops, 0..2^32-1 (default 0)")
    p.add_argument("--episodes", type=arg.positive_int, default=100, help="episodes per point (default 100)")
    p.add_argument("--distances", type=arg.int_list, default=None,
                   help="filler chunks after the fact, comma-separated (default: 0,1,2,4,...,128, then 1x to 2x "
                        "the LTM lifetime: 0,1,2,4,8,16,32,64,128,228,239,251,274,342,456 for the shipped model)")
    p.add_argument("--initial-rf", type=arg.positive_float, default=None,
                   help="override the model's initial_rf_when_moving_stm_to_ltm, the LTM time-to-live in merges "
                        f"(default: the model's config; the released M+ uses {OFFICIAL_INITIAL_RF:g})")
    p.add_argument("--chunk-words", type=arg.positive_int, default=48, help="words per filler chunk (default 48)")
    p.add_argument("--filler-words", type=arg.non_negative_int, default=12, help="filler words before the fact in its chunk (default 12)")
    p.add_argument("--in-context-tokens", type=arg.positive_int, default=None,
                   help="measure the in-context bound only where its prompt has at most this many tokens (default: "
                        "wherever it fits the model's positions; long prompts are slow on a CPU)")
    p.add_argument("--skip", type=skip_list, default=(),
                   help="baselines to leave out, comma-separated: memoryllm_nR (the same-size MemoryLLM) and/or "
                        "in_context (each costs time on a real model)")
    p.add_argument("--jobs", type=arg.positive_int, default=1,
                   help="run the episodes in this many processes, one thread each (same result; default 1)")
    p.add_argument("--interference", type=arg.non_negative_int, default=None,
                   help="episodes of five people's facts of one kind, each person then asked (default: 20 for a "
                        "model trained on people, 0 for the tiny model, whose data has no such test)")
    p.add_argument("--out", type=arg.output_file, help="write the curve as CSV: model,distance_tokens,accuracy,n")
    p.add_argument("--chart", type=arg.output_file, help="write an SVG chart (default: next to --out, .svg)")
    args = p.parse_args(argv)
    from mplus.apps.paths import tiny_model_path
    folder = args.model or tiny_model_path()
    model = load_mplus(folder)
    if model.memory_config.kind != "mplus":
        p.error(f"{folder} is a MemoryLLM model; the benchmark needs M+ weights (it switches the LTM off itself)")
    if args.initial_rf is not None:
        model.memory_config = dataclasses.replace(model.memory_config,
                                                  initial_rf_when_moving_stm_to_ltm=args.initial_rf)
    distances = args.distances or default_distances(ltm_lifetime(model.memory_config))
    if min(distances) != 0:
        p.error("--distances must include 0 (d50 is relative to the distance-0 accuracy)")
    tokenizer = Tokenizer.from_file(folder)
    tokenizer.check_model_vocab(model.config.vocab_size)
    torch.manual_seed(0)  # nothing should draw from the global generator; this makes sure of it
    result = run(model, tokenizer, seed=args.seed, episodes=args.episodes, distances=distances,
                 chunk_words=args.chunk_words, filler_words=args.filler_words, in_context_tokens=args.in_context_tokens,
                 skip=tuple(model_names(model)[2] if m == "memoryllm_nR" else m for m in args.skip), jobs=args.jobs,
                 folder=folder)
    print(summary(result))
    people = model.memory_config.task == "people"
    n_interference = args.interference if args.interference is not None else 20 if people else 0
    if n_interference and not people:
        p.error("--interference needs a model trained on people (config.json \"mplus_task\": \"people\")")
    if n_interference:
        r = interference(model, tokenizer, seed=args.seed, episodes=n_interference, filler_words=args.filler_words)
        print(f"interference ({r['people']} people's facts of one kind in memory, {r['questions']} questions): "
              f"mplus right {r['mplus_right']:.3f} (another person's value {r['mplus_other_person']:.3f}), "
              f"memoryllm right {r['memoryllm_right']:.3f} ({r['memoryllm_other_person']:.3f}); the base model with "
              f"the chunks in its prompt instead, no memory: right {r['base_in_context_right']:.3f} "
              f"({r['base_in_context_other_person']:.3f})")
    if args.out:
        atomic_write_text(Path(args.out), to_csv(result))
        print(f"wrote {args.out}", file=sys.stderr)
    svg = args.chart or (str(Path(args.out).with_suffix(".svg")) if args.out else None)
    if svg:
        chart(result, svg, f"Knowledge retention ({Path(folder).name}, seed {args.seed}, {args.episodes} test facts per point)")
        print(f"wrote {svg}", file=sys.stderr)
    return 0
