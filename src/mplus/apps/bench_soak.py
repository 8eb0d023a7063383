"""`mplus bench soak`: many injections into one memory state, watching time, memory and numerics.

The shipped tiny M+ (checkpoints/tiny-mplus) takes 10,000 filler chunks (mplus.data.facts distractor text, seeded) into
one state. Every --every injections it prints a row: elapsed seconds, milliseconds per injection over the last
window, the process RSS, STM rows per layer, LTM and dropped-row cache rows summed over the layers, the state's
size, and the number of non-finite values in the state. M+'s long-term memory evicts rows whose time-to-live runs
out (arXiv 2502.00592, section 3.2), so LTM size, state size and RSS should level off, not grow with the number of
injections.

Exit status 1 if any NaN or infinity appears (in a new memory block or in the state), or if the RSS grows more
than --max-rss-growth-mb past its value at the first row; 0 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mplus.data.facts import distractor_chunk
from mplus.apps.fetch import load_mplus
from mplus.memory.mplus import MPlus
from mplus.memory.state import MemoryState
from mplus.llama.tokenizer import Tokenizer

HEADER = (f"{'injections':>10} {'elapsed s':>9} {'ms/inj':>7} {'RSS MB':>7} {'STM rows':>8} {'LTM rows':>8} "
          f"{'cache rows':>10} {'state MB':>8} {'non-finite':>10}")


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc/self/statm; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**20 if peak > 2**32 else peak / 2**10


def state_tensors(state: MemoryState) -> list[torch.Tensor]:
    records = state.ltm if state.has_ltm else ()
    return [state.stm, *(t for m in records for t in (m.rows, m.keys, m.rf, m.cache.rows, m.cache.keys))]


def nonfinite(state: MemoryState) -> int:
    """Number of NaN or infinite values in the state's float tensors (rows, keys, recall frequencies)."""
    return sum(int((~torch.isfinite(t)).sum()) for t in state_tensors(state))


def row(n: int, elapsed: float, ms: float, state: MemoryState, bad: int) -> str:
    ltm = sum(len(t) for t in state.ltm) if state.has_ltm else 0
    cache = sum(len(m.cache) for m in state.ltm) if state.has_ltm else 0
    size = sum(t.numel() * t.element_size() for t in state_tensors(state)) / 2**20
    return (f"{n:>10} {elapsed:>9.1f} {ms:>7.2f} {rss_mb():>7.1f} {state.stm.shape[1]:>8} {ltm:>8} {cache:>10} "
            f"{size:>8.2f} {bad:>10}")


def soak(model: MPlus, tokenizer: Tokenizer, *, injections: int, every: int, seed: int, chunk_words: int,
         max_rss_growth_mb: float, progress: bool = True) -> int:
    """Run the soak, printing the table; returns the exit status (0 fine, 1 NaN/inf or RSS past the bound)."""
    rng, state = random.Random(seed), model.initial_state(seed=seed)
    print(HEADER, flush=True)
    start, window, window_s, bad_blocks, first_rss, status = time.perf_counter(), 0, 0.0, 0, None, 0
    with tqdm(total=injections, desc="soak", unit="inj", disable=not progress) as bar:
        for n in range(1, injections + 1):
            ids = tokenizer.encode(distractor_chunk(rng, chunk_words))
            t0 = time.perf_counter()
            block = model.inject(state, ids)  # [L, K, d]
            window_s += time.perf_counter() - t0
            window += 1
            bad_blocks += int(not torch.isfinite(block).all())
            bar.update()
            if n % every == 0 or n == injections:
                bad = nonfinite(state) + bad_blocks
                tqdm.write(row(n, time.perf_counter() - start, 1000 * window_s / window, state, bad))
                first_rss = first_rss if first_rss is not None else rss_mb()
                if bad:
                    tqdm.write(f"error: {bad} non-finite values after {n} injections")
                    status = 1
                    break
                if rss_mb() - first_rss > max_rss_growth_mb:
                    tqdm.write(f"error: RSS grew {rss_mb() - first_rss:.0f} MB since the first row, past the bound of "
                               f"{max_rss_growth_mb:.0f} MB: memory is leaking")
                    status = 1
                    break
                window, window_s = 0, 0.0
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplus bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="M+ folder (default: the shipped tiny model, checkpoints/tiny-mplus)")
    p.add_argument("--injections", type=int, default=10_000, help="filler chunks to inject (default 10000)")
    p.add_argument("--every", type=int, default=1000, help="print a row every this many injections (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="draws the filler text and the STM drops (default 0)")
    p.add_argument("--chunk-words", type=int, default=48, help="words per filler chunk (default 48)")
    p.add_argument("--max-rss-growth-mb", type=float, default=100.0,
                   help="fail if the RSS grows more than this past the first row (default 100)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the tiny model's matrices are too small to share out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.injections < 1 or args.every < 1 or args.threads < 1:
        p.error("--injections, --every and --threads must be at least 1")
    if args.chunk_words < 16:
        p.error("--chunk-words must be at least 16 (M+ was trained on chunks of at least 16 tokens)")
    from mplus.apps.paths import tiny_model_path
    folder = Path(args.model) if args.model else tiny_model_path()
    model = load_mplus(folder)
    tokenizer = Tokenizer.from_file(folder)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # nothing should draw from the global generator; this makes sure of it
    return soak(model, tokenizer, injections=args.injections, every=args.every, seed=args.seed,
                chunk_words=args.chunk_words, max_rss_growth_mb=args.max_rss_growth_mb, progress=not args.quiet)
