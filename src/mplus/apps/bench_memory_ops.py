"""`mplus bench memory`, parts 3 and 4: the cost of each memory operation on a mid-size synthetic M+ (random
weights), and the single-question forward against LTM size.

3. Inject, answer and repeated questions on one memory (default: 6 layers, d 1024, N 2048, K 256, K0 512): ms per
   injected chunk, per first question (the [bos; STM] keys/values computed), per repeated question, and the
   breakdown of a question: [bos; STM] keys/values, retrieval scoring (f_q of the prompt, relevance of every key,
   top K0, oldest-first order), gathering the K0 rows, their keys/values, and one decode step.
4. The first-token forward of a repeated question at K0 = 2560 for growing LTMs: only the key scoring reads the
   whole LTM, so it alone grows with the rows; the rest (gather, prefix, layers) stays flat.

Timings are medians of --repeats runs. LTM rows and keys are random (keys not computed by f_k: the cost is the same).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from mplus.apps import cli_args as arg
from mplus.memory.ltm import LayerLTM
from mplus.memory.prefix import memory_prefix, prefix_cache
from mplus.memory.retriever import nothing_retrieved, select


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def random_ltm(model, state, rows: int, seed: int) -> None:
    """Give every layer of state an LTM of `rows` random rows with random keys, oldest first."""
    d, d_s = model.config.hidden_size, model.memory_config.selector_hidden_dim
    g = torch.Generator().manual_seed(seed)
    ages = torch.arange(rows, 0, -1, dtype=torch.long) * model.memory_config.num_tokens  # [S]
    rf = torch.full((rows,), 10.0, dtype=torch.float64)  # [S]
    state.ltm = [LayerLTM(torch.randn(rows, d, generator=g), torch.randn(rows, d_s, generator=g) / d_s ** 0.5,
                          ages, rf, m.cache) for m in state.ltm]


def question_parts(model, state, question: list[int], repeats: int) -> dict[str, float]:
    """ms of each part of one question, summed over the layers, measured on the layer inputs the question has."""
    record: list = []
    with torch.no_grad():
        model.read_logits(state, question, record=record)
    mem, cfg = model.memory_config, model.config
    inputs = [r["layer_input"] for r in record]  # [T, d] per layer
    picks = [select(model.memory_queries(l, x), state.ltm[l], mem.ltm_retrieved) for l, x in enumerate(inputs)]
    retrieved = [model.retrieve(state, l, x) for l, x in enumerate(inputs)]
    none = nothing_retrieved(cfg.hidden_size, model.dtype)
    layers = range(cfg.num_hidden_layers)
    with torch.no_grad():
        cache = prefix_cache(model, state)
        for l in layers:  # the [bos; STM] keys/values, so the last part times only the retrieved rows'
            memory_prefix(model, state, l, none, cache)
        return {
            "[bos; STM] keys/values (first question only)":
                median_ms(lambda: [memory_prefix(model, state, l, none, None) for l in layers], repeats),
            "retrieval scoring (f_q, every key, top K0, order)":
                median_ms(lambda: [select(model.memory_queries(l, x), state.ltm[l], mem.ltm_retrieved)
                                   for l, x in enumerate(inputs)], repeats),
            "gather the K0 rows":
                median_ms(lambda: [(state.ltm[l].at("rows", p), state.ltm[l].at("ages", p))
                                   for l, p in enumerate(picks)], repeats),
            "K0 rows' keys/values, by the STM's cached":
                median_ms(lambda: [memory_prefix(model, state, l, r, cache) for l, r in enumerate(retrieved)],
                          repeats),
        }


def bench_operations(args: argparse.Namespace, build) -> None:
    """Part 3. build(args) -> (model, state) with random weights and an LTM of args.mid_ltm_rows rows per layer."""
    mid = argparse.Namespace(**{**vars(args), "layers": args.mid_layers, "hidden": args.mid_hidden,
                                "intermediate": args.mid_intermediate, "k": args.mid_k, "stm_blocks": args.mid_stm_blocks,
                                "ltm_blocks": args.mid_ltm_blocks, "ltm_rows": 0})
    model, state = build(mid)
    random_ltm(model, state, args.mid_ltm_rows, args.seed + 4)
    mem = model.memory_config
    g = torch.Generator().manual_seed(args.seed + 5)
    chunks = [torch.randint(3, args.vocab, (args.chunk_len,), generator=g).tolist() for _ in range(args.repeats + 1)]
    question = torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist()
    print(f"\n3) Memory operations on a mid-size M+: {args.mid_layers} layers, d {args.mid_hidden}, ffn "
          f"{args.mid_intermediate}, {args.heads} heads ({args.kv_heads} kv); K {mem.num_tokens}, STM N {mem.stm_size}, "
          f"K0 {mem.ltm_retrieved}, LTM {args.mid_ltm_rows} rows/layer; chunks of {args.chunk_len} tokens, questions "
          f"of {args.prompt_len} tokens and {args.new_tokens} greedy tokens; median of {args.repeats}")
    model.inject(state, chunks[0], allow_short=True)  # the first write copies the stored STM: not counted
    inject = median_ms(lambda it=iter(chunks[1:]): model.inject(state, next(it), allow_short=True), args.repeats)

    def answer(n: int, cold: bool):
        if cold:
            state.stm_kv = None
        model.generate(state, question, max_new_tokens=n, stop_ids=())

    first = median_ms(lambda: answer(args.new_tokens, True), args.repeats)
    again = median_ms(lambda: answer(args.new_tokens, False), args.repeats)
    first_token = median_ms(lambda: answer(1, False), args.repeats)
    decode = (again - first_token) / max(args.new_tokens - 1, 1)
    parts = question_parts(model, state, question, args.repeats)
    print(f"   {'operation':<52}{'ms':>10}")
    for label, ms in (("inject one chunk (write pass, STM update, LTM cache)", inject),
                      ("answer, first question on this memory", first), ("answer, repeated question", again),
                      ("  of which the first token (prompt forward)", first_token),
                      *((f"    {k}", v) for k, v in parts.items()), ("  one decode step", decode)):
        print(f"   {label:<52}{ms:>10.1f}")


def bench_ltm_sweep(args: argparse.Namespace, build) -> None:
    """Part 4: first-token forward of a repeated question at K0 = sweep_k0 against LTM rows per layer."""
    k = args.mid_k
    sweep = argparse.Namespace(**{**vars(args), "layers": args.sweep_layers, "hidden": args.mid_hidden,
                                  "intermediate": args.mid_intermediate, "k": k, "stm_blocks": args.mid_stm_blocks,
                                  "ltm_blocks": args.sweep_k0 // k, "ltm_rows": 0})
    model, state = build(sweep)
    g = torch.Generator().manual_seed(args.seed + 6)
    question = torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist()
    K0 = model.memory_config.ltm_retrieved
    print(f"\n4) First-token forward of a repeated question at K0 {K0} ({args.sweep_layers} layers, d {args.mid_hidden}, "
          f"N {model.memory_config.stm_size}) against the LTM rows per layer; median of {args.repeats}")
    print(f"   {'LTM rows':>10}{'forward ms':>12}{'key scoring ms':>16}{'rest ms':>10}")
    for rows in args.sweep_sizes:
        random_ltm(model, state, max(rows, K0), args.seed + 7)
        state.stm_kv = None
        with torch.no_grad():
            model.read_logits(state, question, last_only=True)  # fills the [bos; STM] keys/values
            total = median_ms(lambda: model.read_logits(state, question, last_only=True), args.repeats)
        scoring = question_parts(model, state, question, args.repeats)["retrieval scoring (f_q, every key, top K0, order)"]
        print(f"   {rows:>10}{total:>12.1f}{scoring:>16.1f}{total - scoring:>10.1f}")
        state.ltm = [LayerLTM.empty(model.config.hidden_size, model.memory_config.selector_hidden_dim, model.dtype)
                     for _ in state.ltm]  # free before the next size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mid-layers", type=int, default=6, help="part 3: decoder layers")
    p.add_argument("--mid-hidden", type=int, default=1024, help="parts 3 and 4: hidden size d")
    p.add_argument("--mid-intermediate", type=int, default=4096, help="parts 3 and 4: MLP size")
    p.add_argument("--mid-k", type=int, default=256, help="parts 3 and 4: memory rows per update K")
    p.add_argument("--mid-stm-blocks", type=int, default=8, help="parts 3 and 4: STM blocks (N = blocks x K)")
    p.add_argument("--mid-ltm-blocks", type=int, default=2, help="part 3: retrieved blocks (K0 = blocks x K)")
    p.add_argument("--mid-ltm-rows", type=int, default=8192, help="part 3: LTM rows per layer")
    p.add_argument("--chunk-len", type=int, default=512, help="part 3: tokens per injected chunk")
    p.add_argument("--sweep-layers", type=int, default=2, help="part 4: decoder layers")
    p.add_argument("--sweep-k0", type=int, default=2560, help="part 4: rows retrieved (a multiple of --mid-k)")
    p.add_argument("--sweep-sizes", type=arg.int_list, default=[10**4, 10**5], help="part 4: LTM rows per layer")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("mid_layers", "mid_hidden", "mid_intermediate", "mid_k", "mid_ltm_blocks", "chunk_len",
                 "sweep_layers", "sweep_k0"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.mid_stm_blocks < 2 or args.sweep_k0 % args.mid_k or args.mid_hidden % args.heads \
            or any(s <= 0 for s in args.sweep_sizes) or args.mid_ltm_rows < 0:
        p.error("need --mid-stm-blocks >= 2, --sweep-k0 a multiple of --mid-k, --mid-hidden divisible by --heads, "
                "positive --sweep-sizes and --mid-ltm-rows >= 0")
