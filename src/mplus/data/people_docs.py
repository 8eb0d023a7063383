"""Documents and retention episodes over data/people.py's invented people and data/prose.py's filler.

  * document: several facts about several people in one passage with filler between them, and a question
    on every fact (the task where the memory holds several people's facts and a question must pick one);
  * episode: one fact, D filler chunks, then the question (the retention trial of data/facts.recall_episode,
    measured as in arXiv 2502.00592, section 4, knowledge retention);
  * interference_episode: n people's values of one attribute, one chunk each, then every person asked
    (telling people apart: each answer is one of n distinct values of the same kind).

Every question comes with its short answer (the value), the taught reply, and both prompt forms: plain text
and chat messages for Tokenizer.apply_chat_template. Everything is drawn from a random.Random.
"""
from __future__ import annotations

import random

from mplus.data import people as P
from mplus.data.prose import passage


def ask(rng: random.Random, person: P.Person, attribute: str) -> dict:
    """A question on one attribute: dict(name, attribute, question, answer, reply, plain, messages)."""
    question = P.question(rng, person, attribute)
    return dict(name=person.name, attribute=attribute, question=question, answer=P.answer(person, attribute),
                reply=P.reply(person, attribute), plain=P.plain_prompt(question),
                messages=P.chat_messages(question))


def document(rng: random.Random, split: str = "train", n_people: int = 3, facts_per_person: int = 2,
             gap_words: int = 12) -> dict:
    """One passage stating facts_per_person distinct attributes of each of n_people people, in random order
    with 0..gap_words words of filler before each fact; then a question on every fact, in random order.

    Returns dict(text, people, facts: [(name, attribute, value)], questions: [ask(...)])."""
    if not 1 <= facts_per_person <= len(P.ATTRIBUTES):
        raise ValueError(f"facts_per_person must be 1 to {len(P.ATTRIBUTES)}")
    people = P.draw_people(rng, split, n_people)
    facts = [(person, a) for person in people for a in rng.sample(P.ATTRIBUTES, facts_per_person)]
    rng.shuffle(facts)
    pieces = []
    for person, attribute in facts:
        pieces += [passage(rng, rng.randint(0, gap_words)), P.statement(rng, person, attribute)]
    questions = [ask(rng, person, attribute) for person, attribute in rng.sample(facts, len(facts))]
    return dict(text=" ".join(p for p in pieces if p), people=people, questions=questions,
                facts=[(person.name, a, person.values[a]) for person, a in facts])


def document_text(doc: dict, chat: bool = False) -> str | list[dict[str, str]]:
    """A document as training text: the passage, then each question and reply (plain), or as one chat whose
    first user turn holds the passage and the first question."""
    if not chat:
        return "\n".join((doc["text"], *(f"{q['plain']} {q['reply']}" for q in doc["questions"])))
    messages = []
    for i, q in enumerate(doc["questions"]):
        user = f"{doc['text']}\n\n{q['question']}" if i == 0 else q["question"]
        messages += P.chat_messages(user, q["reply"])
    return messages


def memory_chunk(rng: random.Random, split: str = "train", max_people: int = 3, same_attribute: float = 0.5,
                 filler_words: int = 12, attribute: str | None = None) -> dict:
    """A chunk to write into memory for training: 1..max_people statements about distinct people, each after
    0..filler_words words of filler, and a question on one of them. With probability same_attribute every
    statement states the same attribute, so only the name tells which value answers (telling people apart);
    `attribute` fixes that attribute for every statement.

    Returns ask(...) of the asked fact plus dict(chunk, statement): the chunk's text and the asked statement."""
    people = P.draw_people(rng, split, rng.randint(1, max_people))
    if attribute is not None:
        attributes = [attribute] * len(people)
    elif rng.random() < same_attribute:
        attributes = [rng.choice(P.ATTRIBUTES)] * len(people)
    else:
        attributes = [rng.choice(P.ATTRIBUTES) for _ in people]
    statements = [P.statement(rng, person, a) for person, a in zip(people, attributes)]
    pieces = []
    for s in statements:
        pieces += [passage(rng, rng.randint(0, filler_words)), s]
    i = rng.randrange(len(people))
    return dict(chunk=" ".join(p for p in pieces if p), statement=statements[i], **ask(rng, people[i], attributes[i]))


def episode(rng: random.Random, split: str, n_filler_chunks: int, chunk_words: int = 100,
            fact_filler_words: int = 0) -> dict:
    """One retention trial: a chunk ending in a fact about a fresh person of `split`, n_filler_chunks chunks
    of about chunk_words words of filler, then the question.

    Returns dict(fact, distractors, name, attribute, question, answer, reply, plain, messages)."""
    person = P.draw_people(rng, split, 1)[0]
    attribute = rng.choice(P.ATTRIBUTES)
    fact = " ".join(x for x in (passage(rng, fact_filler_words), P.statement(rng, person, attribute)) if x)
    distractors = [passage(rng, chunk_words) for _ in range(n_filler_chunks)]
    return dict(fact=fact, distractors=distractors, **ask(rng, person, attribute))


def episode_set(seed: int, split: str, n_episodes: int, n_filler_chunks: int, chunk_words: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [episode(rng, split, n_filler_chunks, chunk_words) for _ in range(n_episodes)]


def fresh_test_set(seed: int, n_episodes: int = 200, n_filler_chunks: int = 0, chunk_words: int = 100) -> list[dict]:
    """A test set for any seed: its people come from the test partition, which training never sees."""
    return episode_set(seed, "test", n_episodes, n_filler_chunks, chunk_words)


def interference_episode(rng: random.Random, split: str = "test", n_people: int = 5, attribute: str | None = None,
                         n_filler_chunks: int = 0, chunk_words: int = 100) -> dict:
    """n_people facts of one attribute (distinct values), one chunk each, then D filler chunks and a question
    to every person in random order. Returns dict(attribute, chunks, distractors, questions: [ask(...)])."""
    people = P.draw_people(rng, split, n_people)
    attribute = attribute or rng.choice(P.ATTRIBUTES)
    if attribute not in P.ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; the attributes are {', '.join(P.ATTRIBUTES)}")
    chunks = [P.statement(rng, person, attribute) for person in people]
    distractors = [passage(rng, chunk_words) for _ in range(n_filler_chunks)]
    questions = [ask(rng, person, attribute) for person in rng.sample(people, n_people)]
    return dict(attribute=attribute, chunks=chunks, distractors=distractors, questions=questions)
