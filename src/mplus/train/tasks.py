"""The two tasks a memory is trained on, behind one interface the stages call.

  * "facts":  the tiny model's invented facts (data/facts.py) in its own tokenizer, asked "Q: ...\\nA:";
  * "people": invented people in plain English (data/people.py, data/prose.py) for a real model such as
              SmolLM2-135M-Instruct, asked either as plain text or, with probability chat_ratio, in the model's
              chat template (the reply then ends with the end-of-turn token, as the model's chats do).

Both give (chunk ids [n], sentence ids [T], targets [T] bool): a chunk ending in one fact, written into memory,
and its question with the taught reply, the reply's tokens being the targets. A Task is fixed by its kind and
options; every draw comes from the caller's random.Random, so the same seed gives the same examples.
"""
from __future__ import annotations

import dataclasses
import random

import tokenizers
import torch

from mplus.data import facts
from mplus.data.people_docs import interference_episode, memory_chunk
from mplus.data.prose import passage
from mplus.llama.tokenizer import chatml_chat

TASKS = ("facts", "people")
CHAT_END = "<|im_end|>"  # ChatML's end of turn: the people task's chat form is SmolLM2's


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str = "facts"
    chat_ratio: float = 0.0  # people: share of questions asked in the chat template
    max_people: int = 1  # people: people stated in one written chunk (1..max_people)

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"unknown task {self.kind!r}; the tasks are {', '.join(TASKS)}")

    def filler(self, rng: random.Random, n_words: int) -> str:
        """A chunk of at least n_words words that holds no fact (the text a memory keeps a fact through)."""
        return facts.distractor_chunk(rng, n_words) if self.kind == "facts" else passage(rng, n_words)

    def example(self, rng: random.Random, tokenizer: tokenizers.Tokenizer, filler_words: int,
                repeat_ratio: float = 0.0, attribute: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chunk [n], sentence [T], targets [T] bool): a chunk ending in one fact, and its question + reply.
        attribute (people only): the attribute the fact states, instead of a random one.

        With probability repeat_ratio the sentence is the recipe's repeat task instead: "Repeat:" and the chunk's
        last sentence (the fact; the memory holds the hidden states of the chunk's last K tokens only)."""
        if self.kind == "facts":
            ep = facts.recall_episode(rng, "train", 0)
            chunk, fact = facts.fact_paragraph(rng, ep["fact"], filler_words), ep["fact"]
            question, reply = facts.qa_prompt(ep["question"]), " " + ep["reply"]
        else:
            ex = memory_chunk(rng, "train", self.max_people, filler_words=filler_words, attribute=attribute)
            chunk, fact = ex["chunk"], ex["statement"]
            question, reply = self.question_form(rng, ex)
        if rng.random() < repeat_ratio:
            question, reply = "Repeat:", " " + fact
        return (torch.tensor(encode(tokenizer, chunk)), *qa_ids(tokenizer, question, reply))

    def rival_example(self, rng: random.Random, tokenizer: tokenizers.Tokenizer, filler_words: int, rivals: int
                      ) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor]:
        """(chunks, i, sentence [T], targets [T] bool): rivals + 1 people's values of one attribute, one chunk each
        (filler, then the statement, as the interference benchmark writes them), and the question and reply
        about chunk i's person. Only the name tells which value answers. People task only."""
        if self.kind != "people":
            raise ValueError("rival examples need the people task")
        ep = interference_episode(rng, "train", rivals + 1)
        chunks = [" ".join(x for x in (passage(rng, rng.randint(0, filler_words)), c) if x) for c in ep["chunks"]]
        asked = ep["questions"][0]
        i = next(j for j, c in enumerate(ep["chunks"]) if asked["name"] in c)
        return ([torch.tensor(encode(tokenizer, c)) for c in chunks], i,
                *qa_ids(tokenizer, *self.question_form(rng, asked)))

    def question_form(self, rng: random.Random, ex: dict) -> tuple[str, str]:
        """(prompt, taught reply) of a people question: chat with probability chat_ratio, else plain."""
        if rng.random() < self.chat_ratio:
            return chatml_chat(ex["messages"]), ex["reply"] + CHAT_END
        return ex["plain"], " " + ex["reply"]


def qa_ids(tokenizer: tokenizers.Tokenizer, question: str, reply: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sentence ids [T], targets [T] bool): the question then the reply, whose tokens are the targets."""
    q, a = encode(tokenizer, question), encode(tokenizer, reply)
    return torch.tensor(q + a), torch.tensor([False] * len(q) + [True] * len(a))


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def task_of(memory) -> Task:
    """The task a checkpoint was trained on, from its memory config (config.json "mplus_task")."""
    return Task(memory.task)
