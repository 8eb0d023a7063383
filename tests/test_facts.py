"""mplus.data.facts and mplus.data.bpe: seeded synthetic data, leak-free splits, and the trained tokenizer."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time

import pytest

from mplus.data import facts
from mplus.llama.tokenizer import Tokenizer
from mplus.data.bpe import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

FULL_NAME = re.compile(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b")  # filler has no two capitalised words in a row
VALUES = (*facts.CITIES, *facts.COLOURS, *facts.PETS, *facts.PROFESSIONS)


@pytest.fixture(scope="module")
def train_docs() -> list[str]:
    return list(facts.corpus(0, 2000))


@pytest.fixture(scope="module")
def tokenizer(train_docs):
    start = time.perf_counter()
    tok = train_tokenizer(train_docs)
    assert time.perf_counter() - start < 10
    return tok


def test_same_seed_same_data_and_different_seeds_differ():
    assert list(facts.corpus(5, 30)) == list(facts.corpus(5, 30))
    assert list(facts.corpus(5, 30)) != list(facts.corpus(6, 30))
    assert facts.fresh_test_set(5, 20, 2) == facts.fresh_test_set(5, 20, 2)
    assert facts.fresh_test_set(5, 20, 2) != facts.fresh_test_set(6, 20, 2)
    assert facts.entity_split(5) == facts.entity_split(5) != facts.entity_split(6)


def test_entity_pools_are_disjoint_and_follow_the_seed_free_rule():
    seen: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for seed in range(3):
        pools = facts.entity_split(seed, n_train=500, n_validation=100, n_test=100)
        for split, names in pools.items():
            assert len(set(names)) == len(names)
            assert all(facts.split_of(n) == split for n in names)
            seen[split] |= set(names)
    assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


def test_fresh_test_sets_never_meet_the_training_corpus(train_docs):
    corpus_names = {m for doc in train_docs for m in FULL_NAME.findall(doc)}
    assert len(corpus_names) > 3000 and all(facts.split_of(n) == "train" for n in corpus_names)
    corpus_given = {n.split()[0] for n in corpus_names}
    text = "\n".join(train_docs)
    held_out = {n for seed in range(5) for n in facts.entity_split(seed, 10, 100, 100)["test"]}
    held_out |= {n for seed in range(5) for n in facts.entity_split(seed, 10, 100, 100)["validation"]}
    for seed in range(5):
        episodes = facts.fresh_test_set(seed, 100)
        assert all(facts.split_of(e["name"]) == "test" for e in episodes)
        held_out |= {e["name"] for e in episodes}
    assert not {n.split()[0] for n in held_out} & corpus_given
    assert not any(name in text for name in held_out)


def test_distractors_hold_no_name_and_no_answer():
    rng = random.Random(0)
    name_parts = {p for split in ("train", "validation", "test") for _ in range(300)
                  for p in facts.draw_name(rng, split).split()}
    for _ in range(200):
        chunk = facts.distractor_chunk(rng, 100)
        last = re.findall(r"[^.]+\.", chunk)[-1]
        assert len(chunk.split()) >= 100 > len(chunk.split()) - len(last.split())  # at most one sentence more
        assert not re.search(r"\d", chunk) and not set(re.findall(r"\w+", chunk)) & name_parts
        assert not any(v.lower() in chunk.lower() for v in VALUES)
    assert facts.distractor_chunk(rng, 0) == ""


def test_answers_come_from_the_fact_only():
    rng = random.Random(1)
    for split in ("train", "validation", "test"):
        for ep in facts.episode_set(2, split, 300, 2, chunk_words=30):
            assert ep["answer"] in ep["fact"] and ep["name"] in ep["fact"] and ep["name"] in ep["question"]
            assert ep["answer"] not in facts.qa_prompt(ep["question"])
            assert not any(ep["answer"].lower() in d.lower() for d in ep["distractors"])
    entity = facts.make_entity(rng, facts.draw_name(rng, "test"))
    for relation in facts.RELATIONS:
        examples = {facts.fact_example(rng, entity, relation) for _ in range(100)}
        assert {a for _, _, a in examples} == {getattr(entity, relation)}
        assert all(a in f and a not in q for f, q, a in examples)
        # every template is in use
        assert len({f for f, _, _ in examples}) == len(facts.FACT_TEMPLATES[relation])
        assert len({q for _, q, _ in examples}) == len(facts.QUESTION_TEMPLATES[relation])


def test_corpus_questions_are_answered_by_their_own_story(train_docs):
    repeats = 0
    for doc in train_docs[:300]:
        story, *qa = doc.split("\n")
        if qa == [f"Repeat: {story}"]:
            repeats += 1
            continue
        assert qa and len(qa) % 2 == 0
        for q, a in zip(qa[::2], qa[1::2]):
            assert q.startswith("Q: ") and a.startswith("A: ")
            name = FULL_NAME.search(q).group()
            assert any(name in s and a[3:] in s for s in re.split(r"(?<=\.) ", story))
    assert 60 < repeats < 120  # the repeat task: 30 % of documents


def test_tokenizer_round_trips_and_loads(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    tok = Tokenizer.from_file(tmp_path)
    assert tok.family is None and tok.vocab_size == 2048
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    episode = facts.fresh_test_set(9, 1, 1)[0]
    texts = [episode["fact"], *episode["distractors"], facts.qa_text(episode["question"], episode["answer"]),
             "  café 日本語 🙂\n\ttabs\r\n", "<|bos|>Talvori Quen<|eos|><|pad|>", ""]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|bos|>x<|eos|>")[0] == 0 and tok.encode("<|bos|>x<|eos|>")[-1] == 1


def test_tokenizer_training_is_deterministic_across_processes(train_docs):
    # Another process has other hash seeds (Python's and the Rust trainer's): the result must not change.
    script = ("import sys; from mplus.data import facts; from mplus.data.bpe import train_tokenizer; "
              "sys.stdout.write(train_tokenizer(list(facts.corpus(0, 2000))[:300], 512).to_str())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert train_tokenizer(train_docs[:300], 512).to_str() == other.stdout
    assert train_tokenizer(train_docs[:300], 512).to_str() == other.stdout


def test_single_fact_documents_ask_about_their_one_fact():
    docs = list(facts.corpus(3, 300, single_fact_ratio=1.0, gap_words=120))
    gaps = []
    for doc in docs:
        story, question, answer = doc.split("\n")
        names = set(FULL_NAME.findall(story))
        assert len(names) == 1 and facts.split_of(next(iter(names))) == "train"
        name = next(iter(names))
        assert question.startswith("Q: ") and name in question
        value = [v for v in VALUES if re.search(rf"\b{v}\b", story)] or re.findall(r"\b\d{3}\b", story)
        assert answer.startswith(f"A: {name}") and value[0] in answer
        gaps.append(len(story[story.index(value[0]):].split()))  # words from the answer to the question
    assert min(gaps) <= 3 and max(gaps) >= 100  # the fact is sometimes last, sometimes far from the question
    near = [facts.single_fact_document(random.Random(i)) for i in range(50)]  # gap 0: the fact ends the story
    for d in near:
        story, _, answer = d.split("\n")
        last = story.split(". ")[-1]  # the fact sentence ends the story
        assert FULL_NAME.search(last) and answer.split()[-1].rstrip(".") in last
    mixed = list(facts.corpus(3, 300, single_fact_ratio=0.5))
    assert 100 < sum(len(FULL_NAME.findall(d.split("\n")[0])) == 1 and d.count("\nQ: ") == 1 for d in mixed) < 250
