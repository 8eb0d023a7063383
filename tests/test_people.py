"""Invented people for the real model (data/people.py, data/prose.py, data/people_docs.py): seeded, split by a
hash of the name whatever the seed, every attribute stated and asked several ways, answers that occur once per
document and never in filler, names, templates or other values."""
import random
import re
import zlib

import pytest

from mplus.data import people as P
from mplus.data import people_docs as D
from mplus.data import prose

WORD_VALUES = [v.lower() for a in P.ATTRIBUTES if a not in ("birth_year", "number") for v in P.VALUES[a]]
BRANDS = [v.split()[0].lower() for v in P.VALUES["employer"]]
NAME_PARTS = [n.lower() for n in (*P.FIRST_NAMES, *P.SURNAMES)]


def test_same_seed_same_data_other_seed_other_data():
    assert D.episode_set(7, "train", 20, 2) == D.episode_set(7, "train", 20, 2)
    assert D.episode_set(7, "train", 20, 2) != D.episode_set(8, "train", 20, 2)
    assert D.document(random.Random(3)) == D.document(random.Random(3))
    assert D.interference_episode(random.Random(3)) == D.interference_episode(random.Random(3))


def test_splits_are_fixed_by_the_name_hash_and_never_leak():
    parts = {s: set(P.names_in(s)) for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == len(P.FIRST_NAMES) * len(P.SURNAMES)  # a partition of all names
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["validation"])
    assert all(zlib.crc32(n.encode()) % 10 == 0 for n in parts["test"])  # the rule, recomputed here
    assert len(parts["test"]) > 1000  # enough held-out people for a 1,000-episode test
    for seed in range(20):
        assert all(ep["name"] in parts["test"] for ep in D.fresh_test_set(seed, 30))
        rng = random.Random(seed)
        assert all(p.name in parts["train"] for _ in range(10) for p in D.document(rng)["people"])
    with pytest.raises(ValueError, match="unknown split"):
        P.names_in("dev")


def test_every_attribute_is_stated_and_asked_three_ways_at_least():
    assert len(P.ATTRIBUTES) >= 8
    person = P.draw_people(random.Random(0), "train", 1)[0]
    for a in P.ATTRIBUTES:
        assert len(set(P.STATEMENTS[a])) >= 3 and len(set(P.QUESTIONS[a])) >= 3 and len(P.VALUES[a]) >= 12
        for t in P.STATEMENTS[a]:
            text = t.format(name=person.name, value=person.values[a], a_value=P.with_article(person.values[a]))
            assert person.name in text and P.is_right(text, P.answer(person, a))
        for t in P.QUESTIONS[a]:
            asked = t.format(name=person.name)
            assert person.name in asked and not P.is_right(asked, P.answer(person, a))
        assert P.is_right(P.reply(person, a), P.answer(person, a))


def test_values_are_never_inside_names_templates_or_other_values():
    templates = " ".join(t for d in (P.STATEMENTS, P.QUESTIONS) for ts in d.values() for t in ts).lower()
    for v in WORD_VALUES:
        assert not any(v in n for n in NAME_PARTS), v
        assert v not in templates, v
        assert not any(v != w and v in w for w in WORD_VALUES), v
    years = P.VALUES["birth_year"]
    assert not any(n in y for n in P.VALUES["number"] for y in years)  # a lucky number never scores as a year
    assert all(len(set(P.VALUES[a])) == len(P.VALUES[a]) for a in P.ATTRIBUTES)
    assert len(set(P.FIRST_NAMES)) == len(P.FIRST_NAMES) and not set(P.FIRST_NAMES) & set(P.SURNAMES)


def test_filler_never_holds_a_name_or_an_answer():
    for seed in range(5):
        rng = random.Random(seed)
        text = " ".join(prose.passage(rng, 200) for _ in range(100))
        low = text.lower()
        assert not re.search(r"\d", text)
        assert not [v for v in (*WORD_VALUES, *BRANDS) if v in low]
        assert not set(NAME_PARTS) & set(re.findall(r"[a-z]+", low))
    assert not set(NAME_PARTS) & prose.WORDS
    sentences = {prose.sentence(random.Random(s)) for s in range(300)}
    assert len(sentences) > 250  # varied: a few hundred draws rarely repeat a sentence


def test_answers_are_unambiguous_within_a_document():
    rng = random.Random(11)
    for _ in range(200):
        doc = D.document(rng, n_people=rng.randint(2, 5), facts_per_person=rng.randint(1, 4))
        firsts, lasts = [p.first for p in doc["people"]], [p.last for p in doc["people"]]
        assert len(set(firsts)) == len(firsts) and len(set(lasts)) == len(lasts)
        assert len(doc["questions"]) == len(doc["facts"])
        for q in doc["questions"]:
            assert doc["text"].lower().count(q["answer"].lower()) == 1  # stated once, by the asked person's fact
            others = [p.values[q["attribute"]] for p in doc["people"] if p.name != q["name"]]
            assert not any(P.is_right(q["reply"], o) for o in others)


def test_interference_episode_asks_every_person_about_distinct_values():
    ep = D.interference_episode(random.Random(5), n_people=5, attribute="job", n_filler_chunks=2, chunk_words=50)
    answers = [q["answer"] for q in ep["questions"]]
    assert len(ep["chunks"]) == 5 and len(set(answers)) == 5 and len(ep["distractors"]) == 2
    assert all(q["attribute"] == "job" for q in ep["questions"])
    assert sorted(answers) == sorted(a for a in P.VALUES["job"] if any(a in c for c in ep["chunks"]))
    with pytest.raises(ValueError, match="distinct"):
        P.draw_people(random.Random(0), "test", 13)  # only 12 colours: 13 people cannot differ in all


def test_question_forms():
    ep = D.episode(random.Random(2), "test", 3, chunk_words=40)
    assert ep["plain"] == f"Q: {ep['question']}\nA:" and len(ep["distractors"]) == 3
    assert ep["messages"] == [{"role": "user", "content": ep["question"]}]
    assert P.chat_messages("q?", "r.", system="s") == [{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "q?"},
                                                        {"role": "assistant", "content": "r."}]
    doc = D.document(random.Random(4), n_people=2, facts_per_person=1)
    chat = D.document_text(doc, chat=True)
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2 and chat[0]["content"].startswith(doc["text"])
    assert D.document_text(doc).count("\nQ: ") == 2
