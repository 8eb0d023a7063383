"""The people data under the real SmolLM2-135M-Instruct tokenizer: the chat form renders with its template, and
names, facts, questions and filler have the token lengths the training and benchmark budgets assume."""
import random
import statistics

import pytest

from mplus import Tokenizer
from mplus.apps.paths import smollm2_dir
from mplus.data import people as P
from mplus.data import people_docs as D
from mplus.data import prose

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tokenizer(artifacts):
    return Tokenizer.from_file(smollm2_dir())


def test_chat_form_renders_with_the_smollm2_template(tokenizer):
    ep = D.episode(random.Random(0), "test", 0)
    text = tokenizer.apply_chat_template(ep["messages"], default_system=False)
    assert text == f"<|im_start|>user\n{ep['question']}<|im_end|>\n<|im_start|>assistant\n"  # ChatML, by hand
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 2 and tokenizer.decode(ids) == text
    chat = D.document_text(D.document(random.Random(1), n_people=2, facts_per_person=1), chat=True)
    full = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
    assert full.count("<|im_start|>assistant\n") == 2 and full.startswith("<|im_start|>system\n")
    assert tokenizer.decode(tokenizer.encode(full)) == full


def test_token_lengths(tokenizer):
    """Mean token counts (printed with -s); the bounds are what the stage-1 budgets were sized for."""
    n = lambda text: len(tokenizer.encode(text))  # noqa: E731
    rng = random.Random(0)
    people = P.draw_people(rng, "test", 12)
    figures = {
        "name (with its leading space)": [n(" " + name) for name in P.names_in("test")],
        "statement": [n(P.statement(rng, p, a)) for p in people for a in P.ATTRIBUTES for _ in range(3)],
        "question": [n(P.question(rng, p, a)) for p in people for a in P.ATTRIBUTES for _ in range(3)],
        "chat prompt, no system": [n(tokenizer.apply_chat_template(D.episode(rng, "test", 0)["messages"],
                                                                   default_system=False)) for _ in range(50)],
        "filler sentence": [n(prose.sentence(rng)) for _ in range(300)],
        "100-word filler passage": [n(prose.passage(rng, 100)) for _ in range(50)],
        "document, 5 people x 2 facts": [n(D.document(rng, n_people=5, facts_per_person=2)["text"])
                                         for _ in range(20)],
    }
    means = {k: statistics.mean(v) for k, v in figures.items()}
    for k, v in figures.items():
        print(f"{k}: mean {means[k]:.1f}, min {min(v)}, max {max(v)} tokens")
    assert means["name (with its leading space)"] <= 5  # real names: a few tokens each (measured 4.3)
    assert 8 <= means["statement"] <= 18 and 6 <= means["question"] <= 15
    assert 100 <= means["100-word filler passage"] <= 140  # about 1.2 tokens per word of plain English
    assert max(figures["chat prompt, no system"]) <= 30
