"""Can SmolLM2 with small adapters learn to tell five people apart? The interference task, trained directly.

Each example holds five training people's values of one attribute, one chunk each (filler, then the statement,
as the retention benchmark's interference test writes them), and asks one person. Fresh r-8 LoRA adapters on
the frozen SmolLM2-135M-Instruct train on that task alone (the reply's tokens are the targets), then answer
every person of fresh test-partition episodes (greedy, the value in the first line). Two ways to hold the facts:

  prompt  the five chunks in the prompt before the question; the read adapter trains (it also encodes the
          chunks, as they pass through the same layers);
  rows    the memory's way: each chunk passes alone through the write adapter and its last K outputs of
          layer l become layer l's key/value rows, read by the question through the read adapter. Both
          adapters train (--fixed-rows: the rows come from the base and only the read adapter trains).

The first separates what the base plus adapters can learn from what the memory's rows let it learn. In rows
mode, --write memory runs M+'s own write pass (after the BOS row and the last K rows of --model's stored STM;
--write sequence: each chunk after the previous chunk's block, as inference writes them),
--read memory lays the five blocks out as the last writes of that STM, --bos hidden starts the BOS rows from
the base's hidden states at BOS, --stm zeros empties the STM rows: one departure from M+ at a time.

Run: .venv/bin/python bench/probe_binding.py prompt|rows [--steps 300] [--episodes 12] [--fixed-rows]
     [--write alone|memory|sequence] [--read alone|memory] [--bos embedding|hidden] [--stm stored|zeros]
"""
import argparse
import random

import tokenizers
import torch
import torch.nn.functional as F

from mplus import MPlus
from mplus.apps.baselines import in_context_reply
from mplus.apps.paths import smollm2_dir
from mplus.apps.retention_trials import is_right
from mplus.data.people_docs import interference_episode
from mplus.data.prose import passage
from mplus.llama.rope import rope_cos_sin
from mplus.memory.checkpoint import bos_layer_inputs
from mplus.memory.lora import READ, WRITE
from mplus.memory.prefix import stm_positions
from mplus.train.memory import write_in_sequence
from mplus.train.tasks import qa_ids

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("mode", choices=("prompt", "rows"))
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--episodes", type=int, default=12, help="test episodes of five questions each")
p.add_argument("--fixed-rows", action="store_true", help="rows: the base writes the rows, only reading trains")
p.add_argument("--model", default="checkpoints/smollm2-mplus",
               help="its memory settings (K, LoRA r) are used, and its stored STM by --write/--read memory")
p.add_argument("--write", choices=("alone", "memory", "sequence"), default="alone",
               help="rows: each chunk alone (its last K outputs), M+'s write pass after the stored STM, or M+'s "
                    "write pass after the previous chunk's block")
p.add_argument("--read", choices=("alone", "memory"), default="alone",
               help="rows: the five blocks alone, or among the stored STM's rows at M+'s read positions")
p.add_argument("--bos", choices=("embedding", "hidden"), default="embedding",
               help="with --read/--write memory, the memory's BOS row per layer: the BOS embedding (the official "
                    "initialisation) or the base's own hidden state at BOS (mplus.memory.checkpoint.bos_layer_inputs)")
p.add_argument("--stm", choices=("stored", "zeros"), default="stored",
               help="with --write/--read memory, the STM rows: the stored model's, or zeros (keys and values 0)")
args = p.parse_args()
torch.manual_seed(0)
stored = MPlus.from_pretrained(args.model)
model = MPlus.from_llama(smollm2_dir(), stored.memory_config, seed=0)
if args.bos == "hidden":
    with torch.no_grad():
        model.bos_embedding.copy_(bos_layer_inputs(model))
stm = stored.initial_state().stm  # [L, N, d]: rows written from filler by the stored model
if args.stm == "zeros":  # no content: the prefix rows' keys and values are 0 (RMSNorm of 0 is 0)
    stm = torch.zeros_like(stm)
tok = tokenizers.Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json"))
K = model.memory_config.num_tokens
model.requires_grad_(False)
adapters = (READ,) if args.mode == "prompt" or args.fixed_rows else (READ, WRITE)
params = [q for n, q in model.named_parameters() if ".lora_" in n and n.split(".")[-2] in adapters]
for q in params:
    q.requires_grad_(True)
optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def episode(rng: random.Random, split: str) -> tuple[dict, list[str]]:
    ep = interference_episode(rng, split, 5)
    return ep, [" ".join(x for x in (passage(rng, 12), c) if x) for c in ep["chunks"]]


def rows_of(chunks: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer l, the five chunks' rows as --write makes them [5 K, d] (after the BOS and STM rows with --read
    memory), and their positions."""
    if args.write != "alone":
        ids = [torch.tensor(tok.encode(c).ids) for c in chunks]
        blocks = (write_in_sequence(model, stm, ids) if args.write == "sequence"
                  else torch.stack([model.new_memory_block(stm, i) for i in ids]))  # [5, L, K, d]
        if args.read == "memory":  # the last 5 K STM slots, as five consecutive writes leave them
            rows = [torch.cat((model.bos_embedding[l], stm[l, 5 * K:], blocks[:, l].flatten(0, 1))) for l in range(len(stm))]
            return rows, stm_positions(model.memory_config.ltm_retrieved, stm.shape[1])
        rows = [blocks[:, l].flatten(0, 1) for l in range(len(stm))]  # [5 K, d] each
        return rows, torch.arange(rows[0].shape[0])
    per_chunk = []
    for chunk in chunks:
        ids = torch.tensor(tok.encode(chunk).ids)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(ids.shape[0]))
        outs = []
        model.model.run_layers(model.model.embed_tokens(ids)[None], cos, sin, adapter=None if args.fixed_rows else WRITE,
                               on_output=lambda l, o: outs.append(o[0, -K:]))  # [K, d] per layer
        per_chunk.append(outs)
    rows = [torch.cat([outs[l] for outs in per_chunk]) for l in range(len(per_chunk[0]))]  # [5 K, d] each
    if args.read == "memory":
        rows = [torch.cat((model.bos_embedding[l], stm[l, 5 * K:], rows[l])) for l in range(len(rows))]
        return rows, stm_positions(model.memory_config.ltm_retrieved, stm.shape[1])
    return rows, torch.arange(rows[0].shape[0])


def logits(chunks: list[str], ids: torch.Tensor, rows=None) -> torch.Tensor:
    """[1, T, V] next-token logits of ids after the five chunks, held the --mode way (rows: rows_of(chunks))."""
    if args.mode == "prompt":
        full = torch.cat((torch.tensor(tok.encode(" ".join(chunks)).ids), ids))
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(full.shape[0]))
        x = model.model.run_layers(model.model.embed_tokens(full)[None], cos, sin, adapter=READ)  # [1, n + T, d]
        return model.lm_head(model.model.norm(x[:, -ids.shape[0]:])).float()
    rows, positions = rows or rows_of(chunks)
    return model.logits_with_rows(ids, int(positions[-1]) + 1 + torch.arange(ids.shape[0]), rows, positions, READ)


def reply(chunks: list[str], question: str) -> str:
    if args.mode == "prompt":
        return tok.decode(in_context_reply(model, tok.encode(" ".join(chunks) + question).ids, adapter=READ))
    ids, out, rows = torch.tensor(tok.encode(question).ids), [], rows_of(chunks)
    for _ in range(16):
        t = int(logits(chunks, ids, rows)[0, -1].argmax())
        if t in model.config.eos_token_id or "\n" in tok.decode([t]):
            break
        out.append(t)
        ids = torch.cat((ids, torch.tensor([t])))
    return tok.decode(out)


def evaluate() -> tuple[float, float]:
    """(right, another person's value) over every question of --episodes test episodes."""
    rng, right, other = random.Random(99), 0, 0
    with torch.no_grad():
        for _ in range(args.episodes):
            ep, chunks = episode(rng, "test")
            values = [q["answer"] for q in ep["questions"]]
            for q in ep["questions"]:
                line = reply(chunks, "\n" + q["plain"]).split("\n")[0]
                hit = is_right(line, q["answer"], "people")
                right += hit
                other += not hit and any(is_right(line, v, "people") for v in values if v != q["answer"])
    n = 5 * args.episodes
    return right / n, other / n


print(f"before training: right {evaluate()[0]:.3f}", flush=True)
rng, mean = random.Random(0), 0.0
for step in range(args.steps):
    ep, chunks = episode(rng, "train")
    asked = ep["questions"][0]
    sentence, targets = qa_ids(tok, "\n" + asked["plain"], " " + asked["reply"])
    loss = F.cross_entropy(logits(chunks, sentence)[0, :-1][targets[1:]], sentence[1:][targets[1:]])
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    mean = 0.98 * mean + 0.02 * loss.item()
    if (step + 1) % 50 == 0:
        print(f"step {step + 1}: loss {mean / (1 - 0.98 ** (step + 1)):.3f}", flush=True)
right, other = evaluate()
print(f"{args.mode}{' (fixed rows)' if args.fixed_rows else ''}{f', write {args.write}, read {args.read}, bos {args.bos}, stm {args.stm}' if args.mode == 'rows' else ''}, {args.steps} steps: right {right:.3f}, another "
      f"person's value {other:.3f} ({5 * args.episodes} test questions)")
