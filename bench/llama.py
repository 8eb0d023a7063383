"""Speed and loading-memory benchmark: mplus's hand-written Llama against transformers, same weights, same run.

    python bench/llama.py [--model DIR] [--threads N] [--prefill 512] [--decode 128] [--repeats 7]

Prints prefill and decode speed of mplus in fp32, bf16 and int8 (weight-only, per-channel scales, bf16
activations; mplus.llama.quant) and of transformers in fp32 (same thread count), the speed-ups over
transformers, each decode speed as a fraction of this machine's memory-bandwidth roofline (measured streaming
read bandwidth / bytes of that variant's weights: the speed if a decode step did nothing but read every weight
once), the change in mean NLL on a fixed text (bench/nll_text.txt) against mplus fp32, and the peak RSS while
loading as a multiple of the weights' bytes above the interpreter's baseline. Timings are medians of
--repeats runs, interleaved across the variants. transformers is the reference here, so this script lives
outside src/.
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

from mplus import Llama, Tokenizer  # noqa: E402
from mplus.apps.paths import smollm2_dir  # noqa: E402

NLL_TEXT = Path(__file__).with_name("nll_text.txt")
VARIANTS = {"mplus fp32": {}, "mplus bf16": {"dtype": torch.bfloat16},
            "mplus int8": {"dtype": torch.bfloat16, "quantize": "int8"}}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and buffers (packed views and ties counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:]).item()


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
if which.startswith("mplus"):
    from mplus import Llama
    before = status("VmRSS")
    model = Llama.from_pretrained(folder, **({{"dtype": torch.bfloat16, "quantize": "int8"}} if which == "mplus int8" else {{}}))
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

    models = {name: Llama.from_pretrained(folder, **kw) for name, kw in VARIANTS.items()}
    models["transformers fp32"] = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = models["mplus fp32"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    short = ids[:, :16]
    sizes = {name: weight_bytes(m) for name, m in models.items()}
    text_ids = torch.tensor([Tokenizer.from_file(folder).encode(NLL_TEXT.read_text())])  # [1, T]
    with torch.inference_mode():
        nll = {name: mean_nll(m(text_ids).float() if name.startswith("mplus") else m(text_ids).logits, text_ids)
               for name, m in models.items()}

    # Interleaved (one variant after another, repeat after repeat) so that a slow spell of this shared machine
    # hits all alike.
    runs = {name: (ours_runs(m, ids, args.decode)[0], ours_runs(m, short, args.decode)[1]) if name.startswith("mplus")
            else (hf_runs(m, ids, args.decode)[0], hf_runs(m, short, args.decode)[1]) for name, m in models.items()}
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
    rss = {name: load_rss(name, folder, args.threads) for name in ("mplus fp32", "mplus int8", "transformers")}
    rss["transformers fp32"] = rss.pop("transformers")

    print(f"model {folder}, {args.threads} threads, medians of {args.repeats}; prefill {args.prefill} tokens, "
          f"decode {args.decode} tokens after 16")
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (streaming sum over 512 MiB, best of {args.repeats})")
    print(f"{'':18}{'weights':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'roofline':>10}{'of it':>7}"
          f"{'NLL - fp32':>12}{'load RSS/weights':>18}")
    for name, r in results.items():
        tps, roofline = args.decode / r["decode_s"], bandwidth / sizes[name]
        load = f"{(rss[name]['peak'] - rss[name]['before']) / sizes[name]:.2f}x" if name in rss else "-"
        print(f"{name:18}{sizes[name] / 1e6:>7.0f}MB{args.prefill / r['prefill_s']:>15.0f}{tps:>14.1f}"
              f"{roofline:>10.1f}{tps / roofline:>7.0%}{nll[name] - nll['mplus fp32']:>+12.4f}{load:>18}")
    print(f"(mean NLL of mplus fp32 on {NLL_TEXT.name}, {text_ids.shape[1]} tokens: {nll['mplus fp32']:.4f}; "
          "transformers memory-maps the file and reads weights lazily, so its RSS right after loading is small)")
    t = samples["transformers fp32"]
    for name in VARIANTS:
        pair = {k: statistics.median(a / b for a, b in zip(t[k], samples[name][k])) for k in ("prefill_s", "decode_s")}
        print(f"{name} over transformers fp32 (median of paired runs): prefill {pair['prefill_s']:.2f}x, "
              f"decode {pair['decode_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
