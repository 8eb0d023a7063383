"""02 - One memory update (MemoryLLM's self-update), step by step, on the shipped tiny M+.

A chunk goes through the write pass (model.new_memory_block, write adapter): per layer, the prefix [bos, last K STM rows] is followed by the
chunk, and the outputs at the chunk's last K positions are the new memory block. Then K random STM rows per
layer are dropped (forgotten by MemoryLLM, moved to the LTM cache by M+) and the block is appended.
The example does the update by hand with the library's pure functions (mplus.memory.stm) and checks it equals
model.inject.

Run: .venv/bin/python examples/02_memory_update.py [MODEL_DIR]   (seconds; uses checkpoints/tiny-mplus)
MODEL_DIR defaults to the shipped checkpoints/tiny-mplus; examples/04 trains one to try these on.
"""
import random
import sys
from pathlib import Path

import tokenizers
import torch

from mplus import MPlus
from mplus.memory import stm
from mplus.data.facts import fact_paragraph, fresh_test_set
from mplus.apps.paths import tiny_model_path

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_model_path()  # any M+ folder
model = MPlus.from_pretrained(folder)
tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
mem = model.memory_config
N, K = mem.stm_size, mem.num_tokens
print(f"STM: {model.config.num_hidden_layers} layers x {N} rows x d {model.config.hidden_size}; K = {K} new rows per chunk")

episode = fresh_test_set(seed=3, n_episodes=1)[0]
chunk = fact_paragraph(random.Random(0), episode["fact"], 12)
ids = tok.encode(chunk).ids
print(f"chunk ({len(ids)} tokens): {chunk!r}")
print(f"its last {K} tokens, whose hidden states become the memory: {tok.decode(ids[-K:])!r}")

state = model.initial_state(seed=0)
by_hand = state.copy()
with torch.no_grad():
    # 1. the write pass: the new block [L, K, d] (write adapter, prefix [bos, STM[l][N-K:]], positions 0..K+n)
    block = model.new_memory_block(by_hand.stm, torch.tensor(ids))
    print(f"1. new_memory_block -> new block {tuple(block.shape)}")
    # 2. per layer: a random permutation decides which K rows leave; survivors keep their order
    kept, gone = stm.draw_drop(N, K, by_hand.generator)
    print(f"2. layer 0 drops rows {gone.tolist()}")
    rows, ages = stm.write_block(by_hand.stm[0], by_hand.stm_ages[0], block[0], kept)
    print(f"3. layer 0 STM after the write {tuple(rows.shape)}: survivors then the block; new ages "
          f"{ages[-K:].tolist()}")
# the library does the same for every layer (stm.drop_and_append, one permutation each); M+ caches the dropped rows
model.inject(state, ids, allow_short=True)
same = torch.equal(state.stm[0], rows) and torch.equal(state.stm_ages[0], ages)
print(f"model.inject gives the same layer-0 STM: {same}")
assert same
print(f"M+ moved the dropped rows to the LTM cache: {len(state.ltm[0].cache)} rows in layer 0, merged into the "
      f"LTM every {mem.update_ltm_frequency} updates")
