"""Speed and loading-memory benchmark: mplus's hand-written Llama against transformers, same weights, same run.

    python bench/llama.py [--model DIR] [--threads N] [--prefill 512] [--decode 128] [--repeats 5]

Prints prefill and decode speed of both (fp32, same thread count), their ratio, the decode speed as a fraction
of this machine's memory-bandwidth roofline (bytes of weights read per token / measured read bandwidth), and
the peak RSS while loading as a multiple of the weights' bytes above the interpreter's baseline. Timings are
medians of --repeats runs. transformers is the reference here, so this script lives outside src/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from mplus import Llama  # noqa: E402
from mplus.apps.paths import smollm2_dir  # noqa: E402


def read_bandwidth(repeats: int) -> float:
    """Bytes/s of a streaming read (sum over 512 MiB of fp32) with the current thread count; best of repeats."""
    x = torch.ones(128 << 20)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times)


def ours_runs(model: Llama, ids: torch.Tensor, n_decode: int):
    def prefill():
        with torch.inference_mode():
            model(ids, cache=model.new_cache(ids.shape[1]), last_only=True)

    def decode():
        cache = model.new_cache(ids.shape[1] + n_decode)
        with torch.inference_mode():
            token = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(n_decode):
                token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0
    return prefill, decode


def hf_runs(model, ids: torch.Tensor, n_decode: int):
    def prefill():
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)

    def decode():
        with torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(n_decode):
                out = model(token, past_key_values=past, use_cache=True, logits_to_keep=1)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0
    return prefill, decode


LOAD_PROBE = """
import json, sys, torch
torch.set_num_threads({threads})
def status(key):  # VmHWM, unlike ru_maxrss, is not inherited from the parent across fork + exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
which, folder = sys.argv[1], sys.argv[2]
if which == "mplus":
    from mplus import Llama
    before = status("VmRSS")
    model = Llama.from_pretrained(folder)
else:
    from transformers import LlamaForCausalLM
    before = status("VmRSS")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
peak = status("VmHWM")
print(json.dumps({{"before": before, "peak": peak}}))
"""


def load_rss(which: str, folder: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE.format(threads=threads), which, str(folder)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF Llama folder (default: the fetched SmolLM2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    folder = args.model or smollm2_dir()
    if not (folder / "config.json").is_file():
        sys.exit(f"no model at {folder}; run `mplus fetch` first (or pass --model)")
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    ours = Llama.from_pretrained(folder)
    theirs = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    short = ids[:, :16]
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights counted once

    # Interleaved (ours, theirs, ours, ...) so that a slow spell of this shared machine hits both alike.
    runs = {"mplus": (ours_runs(ours, ids, args.decode)[0], ours_runs(ours, short, args.decode)[1]),
            "transformers": (hf_runs(theirs, ids, args.decode)[0], hf_runs(theirs, short, args.decode)[1])}
    samples = {name: {"prefill_s": [], "decode_s": []} for name in runs}
    for prefill, decode in runs.values():  # warm-up
        prefill(), decode()
    for _ in range(args.repeats):
        for name, (prefill, decode) in runs.items():
            t0 = time.perf_counter()
            prefill()
            samples[name]["prefill_s"].append(time.perf_counter() - t0)
            samples[name]["decode_s"].append(decode())
    results = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    bandwidth = read_bandwidth(args.repeats)
    roofline = bandwidth / weight_bytes  # tokens/s if every decode step only streamed the weights once
    rss = {name: load_rss(name, folder, args.threads) for name in ("mplus", "transformers")}

    print(f"model {folder} ({weight_bytes / 1e6:.0f} MB fp32 weights), {args.threads} threads, "
          f"medians of {args.repeats}")
    print(f"{'':14}{'prefill ' + str(args.prefill) + ' tok':>20}{'decode tok/s':>14}{'roofline':>10}{'load RSS/weights':>18}")
    for name, r in results.items():
        tps = args.decode / r["decode_s"]
        load = (rss[name]["peak"] - rss[name]["before"]) / weight_bytes
        print(f"{name:14}{r['prefill_s']:>18.3f} s{tps:>14.1f}{tps / roofline:>10.0%}{load:>17.2f}x")
    print("(transformers memory-maps the file and reads weights lazily, so its RSS right after loading is small)")
    m, t = results["mplus"], results["transformers"]
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s -> decode roofline {roofline:.1f} tok/s")
    print(f"speed-up over transformers (ratio of medians): prefill {t['prefill_s'] / m['prefill_s']:.2f}x, "
          f"decode {t['decode_s'] / m['decode_s']:.2f}x")
    pair = {k: statistics.median(a / b for a, b in zip(samples["transformers"][k], samples["mplus"][k]))
            for k in ("prefill_s", "decode_s")}
    print(f"speed-up over transformers (median of paired runs): prefill {pair['prefill_s']:.2f}x, "
          f"decode {pair['decode_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
