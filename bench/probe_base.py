"""Can a base Llama read a fact from its context? The check to pass before training the memory stages.

For fresh test-partition facts (never in training), the fact ends a short filler paragraph and the question
follows. Two accuracies (answer in the first line of the greedy output):
  reply  the model writes the whole reply after "A:";
  cloze  the prompt also gives the reply up to the answer ("A: Talvori Quen lives in"), so only the value
         must be copied: what an induction head does.
The memory stages cannot read from memory what the base cannot read in context (README, Training).

Run: .venv/bin/python bench/probe_base.py runs/base-tiny [--episodes 60] [--seed 11] [--gap-words 0]
"""
import argparse
import random

import tokenizers
import torch

from mplus import Llama
from mplus.data.facts import distractor_chunk, fresh_test_set, qa_prompt

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("model", help="a plain Llama folder, e.g. runs/base-tiny")
p.add_argument("--episodes", type=int, default=60)
p.add_argument("--seed", type=int, default=11)
p.add_argument("--gap-words", type=int, default=0, help="filler words between the fact and the question")
args = p.parse_args()
model = Llama.from_pretrained(args.model)
tok = tokenizers.Tokenizer.from_file(f"{args.model}/tokenizer.json")
rng, hits = random.Random(args.seed), {"reply": 0, "cloze": 0}
with torch.no_grad():
    for ep in fresh_test_set(seed=args.seed, n_episodes=args.episodes):
        story = " ".join(x for x in (distractor_chunk(rng, 12), ep["fact"], distractor_chunk(rng, args.gap_words)) if x)
        story += "\n" + qa_prompt(ep["question"])
        cloze = " " + ep["reply"][:ep["reply"].index(ep["answer"])].rstrip()
        for mode, prompt in (("reply", story), ("cloze", story + cloze)):
            out = tok.decode(model.generate(tok.encode(prompt).ids, max_new_tokens=16, stop_ids=()))
            hits[mode] += ep["answer"] in out.split("\n")[0]
print(", ".join(f"{mode} accuracy {h / args.episodes:.3f}" for mode, h in hits.items()),
      f"({args.episodes} fresh test facts, seed {args.seed}, {args.gap_words} filler words after the fact)")
