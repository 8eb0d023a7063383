"""The people task under the real SmolLM2 tokenizer (train/tasks.py), its trials in the retention benchmark and
the demo (apps/retention_trials.py, apps/demo_real.py), and the config field that names a checkpoint's task."""
import random

import pytest
import torch
import tokenizers

from mplus import ConfigError, MemoryConfig, Tokenizer
from mplus.apps.demo_real import sentences_of
from mplus.apps.paths import smollm2_dir
from mplus.apps.retention_trials import interference_trials, is_right, trials
from mplus.data import people as P
from mplus.train.tasks import CHAT_END, Task

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def raw(artifacts):
    return tokenizers.Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json"))


def test_plain_and_chat_examples_target_exactly_the_reply(raw):
    task, rng = Task("people", chat_ratio=0.5), random.Random(0)
    forms = set()
    for _ in range(40):
        chunk, sentence, targets = task.example(rng, raw, filler_words=12)
        question = raw.decode(sentence[~targets].tolist(), skip_special_tokens=False)
        reply = raw.decode(sentence[targets].tolist(), skip_special_tokens=False)
        assert targets.sum() > 0 and not targets[: (~targets).sum()].any()  # question first, then the reply
        if question.startswith("<|im_start|>system"):
            forms.add("chat")
            assert question.endswith("<|im_start|>assistant\n") and reply.endswith(CHAT_END)
        else:
            forms.add("plain")
            assert question.startswith("Q: ") and question.endswith("\nA:") and reply.startswith(" ")
        value = next((v for a in P.ATTRIBUTES for v in P.VALUES[a] if v in reply and v in raw.decode(chunk.tolist())),
                     None)
        assert value is not None, reply  # the reply states a value the written chunk holds
    assert forms == {"plain", "chat"}


def test_examples_are_seeded_and_from_the_training_partition(raw):
    a = [Task("people", 0.5).example(random.Random(7), raw, 12) for _ in range(3)]
    b = [Task("people", 0.5).example(random.Random(7), raw, 12) for _ in range(3)]
    assert all(all((x == y).all() for x, y in zip(u, v)) for u, v in zip(a, b))
    for _ in range(30):
        chunk, _, _ = Task("people").example(random.Random(_), raw, 0)
        text = raw.decode(chunk.tolist())
        assert any(P.split_of(n) == "train" and n in text for n in P.names_in("train"))
        assert not any(n in text for n in P.names_in("test"))


def test_task_field_round_trips_and_is_checked():
    mem = MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2, task="people")
    assert MemoryConfig.from_dict({**mem.to_dict(), "vocab_size": 10}).task == "people"
    facts = MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2)
    assert "mplus_task" not in facts.to_dict()  # the tiny model's config stays as it was
    with pytest.raises(ConfigError, match="mplus_task"):
        MemoryConfig.from_dict({**mem.to_dict(), "mplus_task": "stories"})


class People:
    """What the trials read of a model: its memory config."""
    memory_config = MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2, task="people",
                                 question_template="Q: {question}\nA:")


def test_retention_trials_alternate_plain_and_chat_on_test_people(artifacts):
    tok = Tokenizer.from_file(smollm2_dir())
    test = trials(People(), tok, seed=3, episodes=6, n_chunks=2, chunk_words=20, filler_words=8)
    assert [t["form"] for t in test] == ["plain", "chat"] * 3
    for t in test:
        assert t["answer"].lower() in t["paragraph"].lower() and len(t["distractors"]) == 2
        assert any(n in t["paragraph"] for n in P.names_in("test"))
        if t["form"] == "chat":
            assert t["prompt"].startswith("<|im_start|>system") and t["question"] in t["prompt"]
            assert t["paragraph"] in t["context"](1) and t["context"](1).endswith("<|im_start|>assistant\n")
        else:
            assert t["prompt"] == f"Q: {t['question']}\nA:" and t["context"](0).endswith(t["prompt"])
    assert trials(People(), tok, seed=3, episodes=6, n_chunks=2, chunk_words=20, filler_words=8)[0]["paragraph"] \
        == test[0]["paragraph"]


def test_interference_trials_ask_every_person_with_the_others_values(artifacts):
    tok = Tokenizer.from_file(smollm2_dir())
    (ep,) = interference_trials(People(), tok, seed=1, episodes=1)
    answers = [q["answer"] for q in ep["questions"]]
    assert len(ep["chunks"]) == 5 and len(set(answers)) == 5
    for q in ep["questions"]:
        assert sorted(q["others"] + [q["answer"]]) == sorted(answers)
        assert sum(q["answer"] in c for c in ep["chunks"]) == 1
        # the in-context baseline: the same question, the five chunks before it in the prompt
        assert all(c in q["in_context"] for c in ep["chunks"]) and q["in_context"] != q["prompt"]
        assert q["in_context"].endswith(q["prompt"][-12:])


def test_answers_match_case_insensitively_for_people_only():
    assert is_right("he lives in lisbon.", "Lisbon", "people") and not is_right("he lives in lisbon.", "Lisbon", "facts")


def test_a_paragraph_is_written_sentence_by_sentence():
    assert sentences_of(" Ann lives in Porto.  She was born in 1950! Why? ") == \
        ["Ann lives in Porto.", "She was born in 1950!", "Why?"]


def test_attribute_runs_make_neighbouring_examples_state_one_kind(raw):
    """stage 1's attribute_run: from attribute_run_from_step on, runs of examples state the same attribute."""
    import dataclasses
    from mplus.train.stage1 import Stage1Config
    config = dataclasses.replace(Stage1Config.from_toml("configs/stage1-smol.toml"), attribute_run=4,
                                 attribute_run_from_step=8)
    assert [config.attribute(s) for s in (0, 7)] == [None, None]
    runs = [config.attribute(s) for s in range(8, 24)]
    assert all(a == runs[0] for a in runs[:4]) and runs[4] != runs[0] and set(runs) <= set(P.ATTRIBUTES)
    rng = random.Random(0)
    for _ in range(10):
        chunk, sentence, targets = Task("people").example(rng, raw, 8, attribute="pet")
        reply = raw.decode(sentence[targets].tolist())
        assert any(v in reply for v in P.VALUES["pet"]) or reply.startswith(" Repeat")


def test_rival_examples_ask_one_of_several_people_by_name(raw):
    """The interference task as training data: R + 1 training people's values of one kind, one chunk each, and a
    question whose right value sits in chunk i only."""
    task, rng = Task("people", chat_ratio=0.5), random.Random(3)
    for _ in range(20):
        chunks, i, sentence, targets = task.rival_example(rng, raw, 8, rivals=4)
        texts = [raw.decode(c.tolist()) for c in chunks]
        reply = raw.decode(sentence[targets].tolist(), skip_special_tokens=False)
        question = raw.decode(sentence[~targets].tolist(), skip_special_tokens=False)
        kind = next(a for a in P.ATTRIBUTES if any(v in texts[i] for v in P.VALUES[a]))
        values = [next(v for v in P.VALUES[kind] if v in t) for t in texts]
        assert len(chunks) == 5 and len(set(values)) == 5  # five distinct values of one kind
        assert values[i] in reply and not any(v in reply for j, v in enumerate(values) if j != i)
        name = next(n for n in P.names_in("train") if n in question)  # a training person, named in chunk i only
        assert [name in t for t in texts] == [j == i for j in range(5)]
    with pytest.raises(ValueError, match="people task"):
        Task("facts").rival_example(rng, raw, 8, rivals=4)


def test_rival_examples_start_at_their_step_and_leave_earlier_draws_alone(raw):
    import dataclasses
    from mplus.train.stage1 import Stage1Config
    shipped = Stage1Config.from_toml("configs/stage1-smol.toml")  # rival examples only, half of them emptied
    plain = dataclasses.replace(shipped, rivals=0, rival_ratio=0.0, rival_empty_ratio=0.0)
    rivals = dataclasses.replace(plain, rivals=4, rival_ratio=1.0, rivals_from_step=5)
    a, b = random.Random(0), random.Random(0)
    for step in range(5):  # before rivals_from_step: the very same examples
        (x, fx, ex), (y, fy, ey) = plain.draw(step, a, raw), rivals.draw(step, b, raw)
        assert fx == fy and y[3] == [] and all(torch.equal(u, v) for u, v in zip(x[:3], y[:3])) and not ex | ey
    (chunk, _, _, others), fresh_only, empty = rivals.draw(5, b, raw)
    assert len(others) == 4 and not fresh_only and not empty  # read among the rivals, never from the fresh block alone


def test_rival_empty_ratio_empties_that_share_of_rival_examples_only(raw):
    import dataclasses
    from mplus.train.stage1 import Stage1Config
    config = dataclasses.replace(Stage1Config.from_toml("configs/stage1-smol.toml"), rivals=4, rival_ratio=0.5,
                                 rival_empty_ratio=0.5)
    rng = random.Random(0)
    draws = [config.draw(0, rng, raw) for _ in range(200)]
    rival = [empty for (example, _, empty) in draws if example[3]]
    assert not any(empty for (example, _, empty) in draws if not example[3])  # single facts keep their memory
    assert 60 < len(rival) < 140 and 0.3 < sum(rival) / len(rival) < 0.7
