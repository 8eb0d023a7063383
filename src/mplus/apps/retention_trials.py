"""The trials of `mplus bench retention` and `mplus demo`, in the data a checkpoint was trained on.

config.json "mplus_task" names it (memory/config.py): "facts" (the tiny model: invented facts, "Q: ...\\nA:") or
"people" (a real model: invented people in plain English, data/people.py). For people, even-numbered trials ask
the plain question and odd ones the same question in the model's chat template, so both forms count equally.

A trial is a dict: paragraph (the chunk that writes the fact), distractors (filler chunks), prompt (the question
as the model reads it), answer, form ("plain" or "chat"), question, and context(n) (the in-context baseline's
prompt with the first n filler chunks).
"""
from __future__ import annotations

import random

from mplus.apps.questions import question_prompt
from mplus.data import facts, people_docs
from mplus.data.prose import passage
from mplus.llama.tokenizer import Tokenizer

FORMS = ("plain", "chat")


def trials(model, tokenizer: Tokenizer, *, seed: int, episodes: int, n_chunks: int, chunk_words: int,
           filler_words: int) -> list[dict]:
    """episodes trials about fresh test-partition people, each with n_chunks filler chunks."""
    rng = random.Random(seed)
    if model.memory_config.task == "facts":
        out = []
        for ep in facts.fresh_test_set(seed, n_episodes=episodes, n_distractor_chunks=n_chunks, chunk_words=chunk_words):
            prompt = question_prompt(model, ep["question"])
            out.append(_trial(facts.fact_paragraph(rng, ep["fact"], filler_words), ep, prompt, "plain"))
        return out
    out = []
    for i, ep in enumerate(people_docs.fresh_test_set(seed, episodes, n_chunks, chunk_words)):
        paragraph = " ".join(x for x in (passage(rng, filler_words), ep["fact"]) if x)
        form = FORMS[i % 2]
        out.append(_trial(paragraph, ep, people_prompt(model, tokenizer, ep["question"], form), form, tokenizer))
    return out


def people_prompt(model, tokenizer: Tokenizer, question: str, form: str, context: str | None = None) -> str:
    """A people question as the model reads it: in its question template, or in its chat template."""
    if form == "plain":
        return question_prompt(model, question) if context is None else f"{context}\n{question_prompt(model, question)}"
    user = question if context is None else f"{context}\n\n{question}"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}])


def _trial(paragraph: str, ep: dict, prompt: str, form: str, tokenizer: Tokenizer | None = None) -> dict:
    def context(n: int) -> str:
        text = " ".join((paragraph, *ep["distractors"][:n]))
        if tokenizer is None or form == "plain":  # facts (and plain people): the paragraph, then the prompt
            return text + "\n" + prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{text}\n\n{ep['question']}"}])

    return dict(paragraph=paragraph, distractors=ep["distractors"], prompt=prompt, answer=ep["answer"], form=form,
                question=ep["question"], context=context)


def is_right(reply_line: str, answer: str, task: str) -> bool:
    """The tiny model's answers must match exactly; people's values case-insensitively (data/people.is_right)."""
    return answer in reply_line if task == "facts" else answer.lower() in reply_line.lower()


def interference_trials(model, tokenizer: Tokenizer, *, seed: int, episodes: int, n_people: int = 5,
                        filler_words: int = 12) -> list[dict]:
    """Five people's values of one attribute, one chunk each (filler, then the statement), then every person
    asked, plain and chat alternating: dict(chunks, questions: [dict(prompt, answer, others, form, in_context)]),
    in_context being the same question with the five chunks before it in the prompt (no memory needed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(episodes):
        ep = people_docs.interference_episode(rng, "test", n_people)
        chunks = [" ".join(x for x in (passage(rng, filler_words), c) if x) for c in ep["chunks"]]
        values = [q["answer"] for q in ep["questions"]]
        questions = [dict(prompt=people_prompt(model, tokenizer, q["question"], FORMS[j % 2]), answer=q["answer"],
                          others=[v for v in values if v != q["answer"]], form=FORMS[j % 2],
                          in_context=people_prompt(model, tokenizer, q["question"], FORMS[j % 2], " ".join(chunks)))
                     for j, q in enumerate(ep["questions"])]
        out.append(dict(chunks=chunks, questions=questions))
    return out
