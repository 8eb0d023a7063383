"""03 - The long-term memory and the retriever, on the shipped tiny M+.

A fact is written, then filler chunks push its rows out of the STM into the LTM (via the dropped-row cache,
merged every few updates, each row with an age and a time to live). Asked about the fact, every layer scores
all its LTM rows with the retriever (mean over question tokens of sigmoid(f_q(h) . f_k(m))), takes the top
K0 and feeds them oldest first in front of the STM. The example prints the LTM's growth and, per layer,
where the fact's rows rank among all LTM rows.

Run: .venv/bin/python examples/03_ltm_retrieval.py [MODEL_DIR]   (seconds; uses checkpoints/tiny-mplus)
MODEL_DIR defaults to the shipped checkpoints/tiny-mplus; examples/04 trains one to try these on.
"""
import random
import sys
from pathlib import Path

import tokenizers
import torch

from mplus import MPlus
from mplus.data.facts import fact_paragraph, fresh_test_set, qa_prompt
from mplus.memory.ltm import copies_of
from mplus.apps.paths import tiny_model_path
from mplus.memory.retriever import relevance

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_model_path()  # any M+ folder
model = MPlus.from_pretrained(folder)
tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
K0 = model.memory_config.ltm_retrieved
ep = fresh_test_set(seed=5, n_episodes=1, n_distractor_chunks=60, chunk_words=48)[0]
state = model.initial_state(seed=0)
block = model.inject(state, tok.encode(fact_paragraph(random.Random(0), ep["fact"], 12)).ids, allow_short=True)
print(f"fact: {ep['fact']}")
for i, chunk in enumerate(ep["distractors"], 1):
    model.inject(state, tok.encode(chunk).ids, allow_short=True)
    ltm = state.ltm[0]  # layer 0's long-term memory: rows, keys, ages, time to live, and the dropped-row cache
    if i % 15 == 0 and len(ltm):
        in_stm = int(copies_of(state.stm[0], block[0]).sum())
        print(f"after {i:2d} filler chunks: layer 0 holds {len(ltm):4d} LTM rows (ages {int(ltm.ages.min())}.."
              f"{int(ltm.ages.max())}, time to live {ltm.rf.min().item():g}..{ltm.rf.max().item():g} merges) + "
              f"{len(ltm.cache):3d} cached; the fact keeps {in_stm:2d} of its {block.shape[1]} rows in the STM")

question = tok.encode(qa_prompt(ep["question"])).ids
record = []
model.forward(state, question, record=record)
print(f"\nQ: {ep['question']} (answer {ep['answer']})")
for l, r in enumerate(record):
    ltm = state.ltm[l]
    with torch.no_grad():
        queries = model.memory_queries(l, r["layer_input"])  # [T, d_s]: f_q of the question's layer inputs
        scores = relevance(queries, ltm.pool("keys"))  # [S + c] over [LTM; cache]
    pool = ltm.pool("rows")  # [S + c, d]
    fact = copies_of(pool, block[l])
    rank = (scores[None, :] > scores[fact][:, None]).sum(1) + 1  # 1 = best
    ages = r["retrieved"].ages  # the retrieved rows' ages, in feeding order
    print(f"layer {l}: the fact's {int(fact.sum())} LTM rows rank {sorted(rank.tolist())} among {pool.shape[0]}; "
          f"the top {K0} are fed oldest first (ages {ages[:3].tolist()} ... {ages[-1].item()})")
answer = model.generate(state, question, max_new_tokens=16, stop_ids=())
print(f"M+ answers:        {tok.decode(answer).splitlines()[0]!r}")
out = model.generate(state.without_ltm(), question, max_new_tokens=16, stop_ids=())
print(f"MemoryLLM answers: {tok.decode(out).splitlines()[0]!r}")
