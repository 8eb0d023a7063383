"""Scale benchmark: peak memory of every M+ operation at the released mplus-8b shape, on random weights.

    python bench/scale.py [--shape 8b|mid|small] [--out /tmp/mplus-scale] [--max-rss-gb 23] [--keep]

Writes a random bf16 checkpoint of the chosen shape shard by shard (never the whole model in memory), then runs
each step in a fresh Python process, so that each step's peak RSS (the child's VmHWM) is its own:

  write     generate the checkpoint, one shard at a time (each tensor from its own seeded generator)
  load      MPlus.from_pretrained(bf16) and initial_state()
  inject    the stored memory taken as a state; 512-token chunks injected until an LTM merge has happened
            (checked: the caches are empty and every layer's LTM grew); the state is saved for the next steps
  answer    the state loaded (model without its stored memory); a question retrieving K0 rows per layer
            (the pool holds more than K0 rows, so the K0 are picked by score), a few greedy tokens
  save_load the state saved to a file and loaded back, a few tensors compared

The update_step shortcut: merges happen every update_ltm_frequency (60) chunks, and 60 chunks of an 8B forward
take hours on a small CPU; so `inject` starts its state with update_step = (60 - 1) x K, as if 59 chunks had been
written since the last merge, and the first chunk merges. The cache of those 59 chunks is not there: a real run
holds (60 - 1) x K cached rows with keys per layer just before its merge, 4.2 GB more at 8B (printed below).
The stored LTM holds K0 rows per layer (--ltm-rows), so the question scores a pool of K0 + K rows.

One table row per step: wall time, peak RSS (GB). Exit 1 if a step's peak RSS exceeds --max-rss-gb.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mplus.formats.hf_folder import save_shards
from mplus.llama.config import LlamaConfig
from mplus.memory.checkpoint import config_dict, draw_normal
from mplus.memory.config import MemoryConfig
from mplus.memory.mplus import MPlus
from mplus.memory.state import MemoryState

LLAMA_31_8B = {  # meta-llama/Llama-3.1-8B's config.json, the backbone of mplus-8b
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
MPLUS_8B = {  # mplus-8b: N = (50 - 10) x 256 = 10240, K0 = 10 x 256 = 2560, retriever 4096 -> 512 -> 256
    "num_tokens": 256, "num_blocks": 50, "num_ltm_blocks": 10, "selector_hidden_dim": 256, "num_selector_layers": 2,
    "add_selector": True, "add_encoder_retriever": True, "update_ltm_frequency": 60, "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10, "lora_config": {"r": 16, "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"]}}
SHAPES = {  # the same structure, scaled down: N = 40 K and K0 = 10 K as in the 8B
    "8b": ({}, {}),
    "mid": ({"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 16,
             "num_attention_heads": 16, "num_key_value_heads": 4, "bos_token_id": 1, "eos_token_id": [2]},
            {"num_tokens": 128}),
    "small": ({"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "bos_token_id": 1,
               "eos_token_id": [2]}, {"num_tokens": 32, "selector_hidden_dim": 64}),
}
STEPS = ("write", "load", "inject", "answer", "save_load")
CHUNK, QUESTION, NEW_TOKENS, SHARD_BYTES, STD = 512, 32, 4, 2 << 30, 0.02
STATE_FILE = "state-after-merge.safetensors"


def configs(shape: str) -> tuple[dict, LlamaConfig, MemoryConfig]:
    llama, memory = SHAPES[shape]
    raw = {**LLAMA_31_8B, **llama, **MPLUS_8B, **memory}
    return raw, LlamaConfig.from_dict(raw), MemoryConfig.from_dict(raw)


def tensor_specs(config: LlamaConfig, memory: MemoryConfig, ltm_rows: int) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every tensor of the official layout, from a model built on the meta device."""
    with torch.device("meta"):
        model = MPlus(config, memory)
    specs = [(n, tuple(t.shape), torch.bfloat16) for n, t in model.state_dict().items()]
    L, N, d = config.num_hidden_layers, memory.stm_size, config.hidden_size
    specs.append(("memory", (L, N, d), torch.bfloat16))
    for l in range(L):
        specs += [(f"ltm.{l}", (ltm_rows, d), torch.bfloat16), (f"ltm_keys.{l}", (ltm_rows, memory.selector_hidden_dim),
                  torch.bfloat16), (f"ltm_ages.{l}", (ltm_rows,), torch.float32),
                  (f"ltm_recall_frequencies.{l}", (ltm_rows,), torch.float32)]
    return specs


def make_tensor(i: int, name: str, shape: tuple, dtype: torch.dtype, memory: MemoryConfig) -> torch.Tensor:
    """Tensor i of the checkpoint, from its own generator: weights N(0, 0.02^2), norms 1, memory rows and keys N(0, 1)
    (hidden states), LTM ages S-1..0 (whole numbers, oldest first) and recall frequencies at their initial value."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.startswith("ltm_ages."):
        return torch.arange(shape[0] - 1, -1, -1, dtype=dtype)  # [S]
    if name.startswith("ltm_recall_frequencies."):
        return torch.full(shape, memory.initial_rf_when_moving_stm_to_ltm, dtype=dtype)  # [S]
    t = draw_normal(shape, dtype, torch.Generator().manual_seed(1000 + i))  # chunk by chunk, no fp32 copy
    return t if name == "memory" or name.startswith(("ltm.", "ltm_keys.")) else t.mul_(STD)


def shard_plan(specs: list, max_bytes: int) -> list[list[int]]:
    """Spec indices grouped into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def step_write(args) -> dict:
    raw, config, memory = configs(args.shape)
    specs = tensor_specs(config, memory, args.ltm_rows or memory.ltm_retrieved)
    plan = shard_plan(specs, args.shard_bytes)
    shards = ({specs[i][0]: make_tensor(i, *specs[i], memory) for i in ids} for ids in plan)  # one at a time
    save_shards(shards, len(plan), args.out)
    cfg = config_dict(config, memory, ltm_size=args.ltm_rows or memory.ltm_retrieved)
    (args.out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}, indent=2) + "\n")
    gb = sum(f.stat().st_size for f in args.out.glob("*.safetensors")) / 1e9
    return {"note": f"{len(plan)} shards, {gb:.2f} GB on disk"}


def step_load(args) -> dict:
    model = MPlus.from_pretrained(args.out, dtype=torch.bfloat16)
    state = model.initial_state()
    return {"note": f"weights {_gb(model.parameters())} GB, STM {_gb([state.stm])} GB, "
                    f"LTM {_gb(t for m in state.ltm for t in (m.rows, m.keys))} GB"}


def step_inject(args) -> dict:
    model = MPlus.from_pretrained(args.out, dtype=torch.bfloat16)
    mem, g = model.memory_config, torch.Generator().manual_seed(7)
    state = model.initial_state(seed=0, take=True)  # the only STM: written in place from the first chunk
    state.update_step = (mem.update_ltm_frequency - 1) * mem.num_tokens  # the shortcut (module docstring)
    before, chunks = [len(m) for m in state.ltm], 0
    while state.update_step or not chunks:
        model.inject(state, _ids(CHUNK, model.config.vocab_size, g))
        chunks += 1
        if chunks > 2:
            raise SystemExit("no LTM merge after 2 chunks: the update_step shortcut did not work")
    after = [len(m) for m in state.ltm]
    if any(len(m.cache) for m in state.ltm) or not all(a > b for a, b in zip(after, before)):
        raise SystemExit(f"the merge did not move the cache into the LTM: LTM rows {before[0]} -> {after[0]}")
    state.save(args.out / STATE_FILE)
    return {"note": f"{chunks} chunk(s) of {CHUNK} tokens, merged: LTM rows per layer {before[0]} -> {after[0]}; "
                    "state saved"}


def step_answer(args) -> dict:
    model = MPlus.from_pretrained(args.out, dtype=torch.bfloat16, stored_memory=False)
    state = MemoryState.load(args.out / STATE_FILE, expect=model.state_spec())
    k0, g = model.memory_config.ltm_retrieved, torch.Generator().manual_seed(8)
    pool = min(len(m) + len(m.cache) for m in state.ltm)
    if pool <= k0:
        raise SystemExit(f"the LTM pool has {pool} rows per layer, not more than K0 = {k0}: nothing to choose")
    question = _ids(QUESTION, model.config.vocab_size, g)
    with torch.no_grad():
        picked = len(model.retrieve(state, 0, model.model.embed_tokens(torch.tensor(question))))
    if picked != k0:
        raise SystemExit(f"layer 0 retrieved {picked} rows, not K0 = {k0}")
    out = model.generate(state, question, max_new_tokens=NEW_TOKENS, stop_ids=(), keep_prefix=False)
    return {"note": f"{QUESTION}-token question, {k0} of {pool} pool rows retrieved per layer, {len(out)} tokens"}


def step_save_load(args) -> dict:
    model = MPlus.from_pretrained(args.out, dtype=torch.bfloat16, stored_memory=False)
    spec, path = model.state_spec(), args.out / "state-saved.safetensors"
    state = MemoryState.load(args.out / STATE_FILE, expect=spec)
    state.save(path)
    some = {"stm[0]": state.stm[0].clone(), "stm[-1]": state.stm[-1].clone(), "ltm[0]": state.ltm[0].rows.clone(),
            "ltm_keys[-1]": state.ltm[-1].keys.clone(), "ltm_ages[0]": state.ltm[0].ages.clone(),
            "generator": state.generator.get_state()}
    step = state.update_step
    del state  # one state in memory at a time
    back = MemoryState.load(path, expect=spec)
    again = {"stm[0]": back.stm[0], "stm[-1]": back.stm[-1], "ltm[0]": back.ltm[0].rows,
             "ltm_keys[-1]": back.ltm[-1].keys, "ltm_ages[0]": back.ltm[0].ages, "generator": back.generator.get_state()}
    differ = [k for k in some if not torch.equal(some[k], again[k])] + (["update_step"] if back.update_step != step else [])
    if differ:
        raise SystemExit(f"the state loaded back differs from the saved one in {', '.join(differ)}")
    return {"note": f"state file {path.stat().st_size / 1e9:.2f} GB; {len(some) + 1} fields equal after the round trip"}


def _ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()  # above the usual special ids, none of them BOS


def _gb(tensors) -> str:
    return f"{sum(t.numel() * t.element_size() for t in tensors) / 1e9:.2f}"


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def run_step(args) -> None:
    """The child: one step, then one JSON line with its wall time and peak RSS."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = globals()[f"step_{args.step}"](args)
    print(json.dumps({"step": args.step, "seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb(), **out}))


def cache_note(shape: str) -> str:
    _, config, mem = configs(shape)
    rows = (mem.update_ltm_frequency - 1) * mem.num_tokens * config.num_hidden_layers
    return (f"update_step shortcut: the state starts {mem.update_ltm_frequency - 1} chunks into its merge period, "
            f"without those chunks' cache; a real run would hold {rows * (config.hidden_size + mem.selector_hidden_dim) * 2 / 1e9:.2f} "
            "GB more of cached rows and keys just before its merge")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="8b")
    p.add_argument("--out", type=Path, default=Path("/tmp/mplus-scale"), help="checkpoint and state files go here")
    p.add_argument("--max-rss-gb", type=float, default=23.0, help="fail if a step's peak RSS exceeds this")
    p.add_argument("--ltm-rows", type=int, default=0, help="stored LTM rows per layer (default K0)")
    p.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--keep", action="store_true", help="keep an existing checkpoint in --out (skip the write step)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    if args.step:
        run_step(args)
        return 0
    print(f"scale bench, shape {args.shape}, {args.threads} thread(s), out {args.out}\n{cache_note(args.shape)}")
    print("| step | wall s | peak RSS GB | |\n|---|---|---|---|", flush=True)
    failed = False
    for step in STEPS[1:] if args.keep else STEPS:
        cmd = [sys.executable, __file__, "--step", step, "--shape", args.shape, "--out", str(args.out),
               "--ltm-rows", str(args.ltm_rows), "--shard-bytes", str(args.shard_bytes), "--threads", str(args.threads)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"| {step} | - | - | failed (exit {done.returncode}) |")
            return 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        over = r["peak_rss_gb"] > args.max_rss_gb
        failed |= over
        print(f"| {step} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f}{' OVER' if over else ''} | {r['note']} |",
              flush=True)
    if failed:
        print(f"a step's peak RSS exceeded --max-rss-gb {args.max_rss_gb}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
