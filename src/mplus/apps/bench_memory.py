"""`mplus bench memory`: what the memory costs at question time, on a synthetic M+ model (random weights).

1. Answering questions on a fixed memory, with the keys/values of the reusable prefix [bos; STM] kept in the
   state between questions (the default: they change only when the memory does) against recomputing them for
   every question (state.stm_kv cleared before each). Both paths retrieve K0 LTM rows per layer per question.
2. Retrieval time against LTM size: retriever.select (relevance of every LTM key for the prompt's queries, top
   K0, oldest-first order) on one layer, for LTM sizes 10^3..10^6 rows: linear in the number of rows.
3. and 4. (mplus.apps.bench_memory_ops): ms per inject, first and repeated question on a mid-size M+ with the
   breakdown of a question; the single-question forward at K0 2560 against LTM size.

Ratios are measured in the same run; timings are medians of --repeats runs.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mplus.apps import cli_args as arg
from mplus.llama.config import LlamaConfig, RopeScaling
from mplus.memory.config import MemoryConfig
from mplus.llama.model import Llama
from mplus.apps import bench_memory_ops as ops
from mplus.memory.ltm import DroppedRows, LayerLTM
from mplus.memory.retriever import select


def synthetic_llama(folder: Path, args: argparse.Namespace) -> None:
    """A plain Llama with random weights (N(0, 0.02) matrices, unit norms), saved as a HF folder."""
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=RopeScaling("default"), max_position_embeddings=131072,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2,))
    model = Llama(config)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    model.save_pretrained(folder)


def build_mplus(args: argparse.Namespace):
    """(model, state): an M+ around the synthetic Llama, its LTM filled with args.ltm_rows random rows per layer."""
    from mplus.memory.mplus import MPlus
    memory = MemoryConfig(kind="mplus", num_tokens=args.k, num_blocks=args.stm_blocks + args.ltm_blocks,
                          num_ltm_blocks=args.ltm_blocks, selector_hidden_dim=args.selector_dim)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_llama(Path(tmp), args)
        model = MPlus.from_llama(tmp, memory, seed=args.seed)
    state = model.initial_state(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    ages = torch.arange(args.ltm_rows, 0, -1, dtype=torch.long) * args.k  # [S], oldest first
    rf = torch.full((args.ltm_rows,), memory.initial_rf_when_moving_stm_to_ltm, dtype=torch.float64)  # [S]
    rows = [torch.randn(args.ltm_rows, args.hidden, generator=g) for _ in state.ltm]  # [S, d] per layer
    with torch.no_grad():
        state.ltm = [LayerLTM(r, model.memory_keys(l, r), ages, rf, m.cache) for l, (r, m) in enumerate(zip(rows, state.ltm))]
    return model, state


def time_questions(model, state, questions: list[list[int]], new_tokens: int, recompute: bool
                   ) -> tuple[float, list[list[int]]]:
    """Seconds per question (mean over the questions) and the answers."""
    answers = []
    t0 = time.perf_counter()
    for q in questions:
        if recompute:
            state.stm_kv = None
        answers.append(model.generate(state, q, max_new_tokens=new_tokens, stop_ids=()))
    return (time.perf_counter() - t0) / len(questions), answers


def bench_generation(args: argparse.Namespace) -> float:
    model, state = build_mplus(args)
    mem = model.memory_config
    g = torch.Generator().manual_seed(args.seed + 2)
    questions = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.questions)]
    print(f"1) Answering {args.questions} questions ({args.prompt_len} random ids, {args.new_tokens} greedy tokens "
          "each) on one fixed memory: the [bos; STM] keys/values kept in the state between questions (default) vs "
          "recomputed for every question. Both retrieve K0 LTM rows per layer per question.")
    print(f"   model: {args.layers} layers, d {args.hidden}, {args.heads} heads ({args.kv_heads} kv), ffn "
          f"{args.intermediate}, vocab {args.vocab}; memory: K {mem.num_tokens}, STM N {mem.stm_size}, "
          f"K0 {mem.ltm_retrieved}, LTM {args.ltm_rows} rows/layer, d_s {mem.selector_hidden_dim}")
    state.stm_kv = None
    t0 = time.perf_counter()
    time_questions(model, state, questions[:1], args.new_tokens, recompute=False)  # warm-up; fills state.stm_kv
    first = time.perf_counter() - t0
    times = {(n, recompute): [] for n in (args.new_tokens, 1) for recompute in (False, True)}
    same = True
    for _ in range(args.repeats):  # the two paths alternate, so that a busy machine slows both alike
        for n in (args.new_tokens, 1):
            t, a = time_questions(model, state, questions, n, recompute=False)
            times[n, False].append(t)
            t, b = time_questions(model, state, questions, n, recompute=True)
            times[n, True].append(t)
            same &= a == b
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    print(f"   {'ms per question':<34}{f'answer ({args.new_tokens} tokens)':>20}{'first token only':>18}")
    for label, recompute in (("cached [bos; STM] K/V (default)", False), ("recomputed before every question", True)):
        print(f"   {label:<34}{ms[args.new_tokens, recompute]:>20.1f}{ms[1, recompute]:>18.1f}")
    speedup = ms[args.new_tokens, True] / ms[args.new_tokens, False]
    print(f"   {'speed-up':<34}{speedup:>19.2f}x{ms[1, True] / ms[1, False]:>17.2f}x")
    print(f"   answers identical on both paths: {'yes' if same else 'NO'}; first question on an empty cache "
          f"(warm-up, computes the STM K/V): {first * 1e3:.1f} ms")
    return speedup


def bench_retrieval(args: argparse.Namespace) -> None:
    print(f"\n2) Retrieval vs LTM size: retriever.select on one layer ({args.queries} query tokens, d_s "
          f"{args.selector_dim}, top K0 {args.k0}, oldest-first order), median of {args.repeats} runs; the "
          "scoring reads every key, so the time grows linearly with the rows.")
    print(f"   {'LTM rows':>10}{'ms':>12}{'ms per 10^6 rows':>20}")
    g = torch.Generator().manual_seed(args.seed + 3)
    d_s = args.selector_dim
    queries = torch.randn(args.queries, d_s, generator=g) / d_s ** 0.5  # [T, d_s]
    for size in args.sizes:
        keys = torch.randn(size, d_s, generator=g)  # [S, d_s]
        ages = torch.randint(0, 10**6, (size,), generator=g)  # [S]
        ltm = LayerLTM(torch.zeros(size, 0), keys, ages, torch.ones(size, dtype=torch.float64),
                       DroppedRows(torch.zeros(0, 0), keys[:0], ages[:0]))  # `size` rows (no hidden states), no cache
        with torch.inference_mode():
            select(queries, ltm, args.k0)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                select(queries, ltm, args.k0)
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(f"   {size:>10}{ms:>12.2f}{ms / size * 1e6:>20.1f}")
        del keys, ages, ltm


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mplus bench memory", description=__doc__, formatter_class=_HelpFormatter)
    # One wide layer: the saving is per layer, and its size relative to decoding grows with d (the 8B has
    # d = 4096, N = 10240); d = 1024 keeps the run under a minute on 2 cores.
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the synthetic model")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size d")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--intermediate", type=int, default=2048, help="MLP size")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--k", type=int, default=64, help="memory rows written per update (num_tokens)")
    p.add_argument("--stm-blocks", type=int, default=128, help="STM blocks: N = stm_blocks * K")
    p.add_argument("--ltm-blocks", type=int, default=8, help="retrieved LTM blocks: K0 = ltm_blocks * K")
    p.add_argument("--ltm-rows", type=int, default=2048, help="LTM rows per layer in the generation benchmark")
    p.add_argument("--selector-dim", type=int, default=256, help="retriever key size d_s")
    p.add_argument("--questions", type=int, default=10, help="questions per timing")
    p.add_argument("--prompt-len", type=int, default=24, help="tokens per question")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per answer")
    p.add_argument("--sizes", type=arg.int_list, default=[10**3, 10**4, 10**5, 10**6],
                   help="comma-separated LTM sizes (rows) for the retrieval benchmark")
    p.add_argument("--queries", type=int, default=32, help="query tokens in the retrieval benchmark")
    p.add_argument("--k0", type=int, default=512, help="rows retrieved in the retrieval benchmark")
    p.add_argument("--repeats", type=int, default=3, help="runs per timing (the median is printed)")
    p.add_argument("--threads", type=arg.positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=arg.seed_type(2**63 - 3), default=0, help="seeds the weights and the inputs")
    ops.add_arguments(p)
    p.add_argument("--skip", choices=("generation", "retrieval", "operations", "sweep"), action="append", default=[],
                   help="leave out one of the four measurements (repeatable)")
    args = p.parse_args(argv)
    ops.check_arguments(p, args)
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "k", "stm_blocks", "ltm_blocks",
                 "selector_dim", "questions", "prompt_len", "queries", "k0", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.vocab <= 3 or args.hidden % args.heads or (args.hidden // args.heads) % 2 or args.heads % args.kv_heads:
        p.error("need vocab > 3, hidden divisible by heads into an even head size, heads divisible by kv-heads")
    if args.stm_blocks < 2:
        p.error("--stm-blocks must be at least 2 (the STM must be larger than one block)")
    if args.new_tokens < 1 or args.ltm_rows < 0 or any(s <= 0 for s in args.sizes):
        p.error("--new-tokens must be >= 1, --ltm-rows >= 0 and every --sizes entry positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"mplus bench memory: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print()
    if "generation" not in args.skip:
        bench_generation(args)
    if "retrieval" not in args.skip:
        bench_retrieval(args)
    if "operations" not in args.skip:
        ops.bench_operations(args, build_mplus)
    if "sweep" not in args.skip:
        ops.bench_ltm_sweep(args, build_mplus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
