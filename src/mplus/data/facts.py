"""Seeded synthetic data for training and testing memory: facts about invented people, filler text, questions.

An entity is an invented person ("Talvori Quen") with five attributes, drawn afresh for every document and
episode, so an answer can only come from the text at hand, never from weights that memorised a name.

Splits. A person's split is fixed by a hash of the given name (crc32 % 10: 0 test, 1 validation, else train),
a rule that ignores every seed: whatever seed trains, validates or builds a fresh test set, test people never
appear in training. The corpus draws train names from the whole train partition (hundreds of thousands of
names, not a small pool), so the tokenizer learns syllables, not whole train names, and test names tokenize
like train names.

No leaks. Name parts are rejected if they equal a word the generator writes or contain an attribute value;
filler text uses a fixed lowercase vocabulary with no digits, so it never contains a name or an answer.
Answers are single words or 3-digit numbers (a 2-digit answer would be a substring of longer numbers, and
accuracy is "the answer is contained in the output").

Text format of a corpus document (documents are separated by the tokenizer's <|eos|>, added by the caller):
    <story: fact sentences with filler sentences between them, one paragraph>
    Q: <question>
    A: <reply>
    ... (one Q/A pair per line pair, each about a fact stated in the story)
A question is asked as qa_prompt(question) = "Q: <question>\\nA:" and the reply follows after one space. The
reply is the fact sentence from the person's name on ("Where does Talvori Quen live?" -> "Talvori Quen lives
in Brastow."): it contains the answer, and it lets a small model answer by copying what followed the name,
the induction-style copy that small transformers learn in a few hundred steps. A bare answer word needs a
two-hop lookup (name, then value) that a tiny model did not learn within a CPU budget (measured: after 400
base steps its answer loss was the same with the right story as with another document's story).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

RELATIONS = ("city", "number", "pet", "colour", "profession")

# Places: a consonant cluster (never the start of a person's name) + a place-like ending.
CITIES = tuple(stem + end for stem in ("Bra", "Kre", "Dro", "Gla", "Plu", "Fre", "Gri", "Ska", "Stru", "Vro",
                                       "Tre", "Blo")
               for end in ("stow", "mere", "holt", "dell", "wick", "carn"))
COLOURS = ("crimson", "teal", "amber", "violet", "ochre", "indigo", "scarlet", "azure", "magenta", "olive",
           "ivory", "cobalt")
PETS = ("ferret", "parrot", "tortoise", "hamster", "iguana", "gecko", "rabbit", "canary", "lizard", "falcon",
        "donkey", "beagle")
PROFESSIONS = ("baker", "weaver", "potter", "surveyor", "glazier", "tailor", "locksmith", "chemist", "ferryman",
               "cartographer", "beekeeper", "blacksmith")

FACT_TEMPLATES = {
    "city": ("{name} lives in {value}.", "The home of {name} is {value}.", "{name} has a house in {value}.",
             "{name} moved to {value} long ago."),
    "number": ("{name}'s lucky number is {value}.", "The lucky number of {name} is {value}.",
               "{name} believes that {value} is a lucky number."),
    "pet": ("{name} owns {a_value}.", "The pet of {name} is {a_value}.", "{name} keeps {a_value} as a pet."),
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes the colour {value} best.",
               "Of all colours, {name} prefers {value}."),
    "profession": ("{name} works as {a_value}.", "By trade, {name} is {a_value}.",
                   "{name} earns a living as {a_value}."),
}
QUESTION_TEMPLATES = {
    "city": ("Where does {name} live?", "In which town does {name} live?", "What is the home town of {name}?"),
    "number": ("What is {name}'s lucky number?", "Which number is lucky for {name}?"),
    "pet": ("What pet does {name} keep?", "Which animal does {name} own?"),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?"),
    "profession": ("What does {name} do for a living?", "What is {name}'s job?"),
}

# Filler: a small grammar over generic topics (weather, towns, travel, kitchens); lowercase, no digits.
_NOUNS = ("ferry", "bridge", "market", "river", "road", "train", "garden", "kitchen", "library", "window", "clock",
          "wind", "rain", "path", "field", "tower", "harbour", "station", "orchard", "meadow", "hill", "forest",
          "lake", "storm", "kettle", "school", "letter", "song", "boat", "wagon", "fence", "roof", "cloud",
          "square", "bell", "door", "lamp", "valley", "stove", "chimney", "mill", "well", "shore", "village")
_ADJECTIVES = ("old", "quiet", "narrow", "busy", "wooden", "small", "tall", "distant", "empty", "bright", "grey",
               "heavy", "gentle", "crowded", "patient", "tired", "careful", "sleepy", "broad", "simple", "cold",
               "warm", "new", "green", "long", "silent", "muddy", "windy")
_INTRANSITIVE = ("waits", "rests", "sleeps", "shines", "hums softly", "stays open late", "grows quiet",
                 "turns slowly", "creaks", "fills with light", "looks different", "seems calm", "stands still",
                 "drifts along", "wakes early", "echoes for a while")
_TRANSITIVE = ("carries", "watches", "follows", "covers", "remembers", "passes", "reaches", "warms", "hides",
               "faces", "shelters", "joins")
_PLACES = ("near the river", "by the old road", "behind the station", "under the grey sky", "at the edge of the field",
           "beside the harbour", "across the valley", "along the shore", "past the mill", "below the hill")
_TIMES = ("in the morning", "after the rain", "on most days", "every winter", "late at night", "during the long summer",
          "when the wind changes", "now and then", "at dusk", "by midday", "before dawn", "in the evening")
_SENTENCES = ("{Time}, {np} {vi} {place}.", "{Np} {vt} {np} {time}.", "{Np} {vi}, and {np} {vi}.",
              "Nobody knows why {np} {vi} {place}.", "It is said that {np} {vt} {np}.", "Some people say {np} {vi}.",
              "{Np} {vi} {place} {time}.")

# Name syllables: onset + vowel + optional coda. Given names end open, family names closed, so the two never
# coincide; every part starts with a single onset, so no part contains a city (cities start with a cluster).
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("l", "n", "r", "s")

_GENERATOR_TEXT = " ".join((*_NOUNS, *_ADJECTIVES, *_INTRANSITIVE, *_TRANSITIVE, *_PLACES, *_TIMES, *_SENTENCES,
                            *(t for ts in (*FACT_TEMPLATES.values(), *QUESTION_TEMPLATES.values()) for t in ts)))
_GENERATOR_WORDS = frozenset(re.findall(r"[a-z]+", _GENERATOR_TEXT.lower()))
_VALUES_LOWER = tuple(v.lower() for v in (*CITIES, *COLOURS, *PETS, *PROFESSIONS))


@dataclass(frozen=True)
class Entity:
    name: str
    city: str
    number: str  # three digits, as written in the text
    pet: str
    colour: str
    profession: str


def split_of(name: str) -> str:
    """The split a person belongs to, by a seed-independent hash of the given name (the first word)."""
    bucket = zlib.crc32(name.split()[0].encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _syllable(rng: random.Random, closed: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if closed else "")


def _name_part(rng: random.Random, n_syllables: int, ends_closed: bool) -> str:
    """A capitalised syllable string that is no generator word and contains no attribute value."""
    while True:
        inner = "".join(_syllable(rng, rng.random() < 0.4) for _ in range(n_syllables - 1))
        part = (inner + _syllable(rng, ends_closed)).capitalize()
        low = part.lower()
        if low not in _GENERATOR_WORDS and not any(v in low for v in _VALUES_LOWER):
            return part


def draw_name(rng: random.Random, split: str) -> str:
    """A full name ("Talvori Quen") whose given name belongs to `split`."""
    while True:
        given = _name_part(rng, rng.choice((2, 3)), ends_closed=False)
        if split_of(given) == split:
            return f"{given} {_name_part(rng, rng.choice((1, 2)), ends_closed=True)}"


def entity_split(seed: int, n_train: int = 1000, n_validation: int = 100, n_test: int = 100) -> dict[str, list[str]]:
    """Pools of distinct names per split, drawn from each split's fixed partition (disjoint for any seeds)."""
    rng = random.Random(seed)
    pools = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        names: dict[str, None] = {}  # insertion-ordered set: the pool's order depends only on the seed
        while len(names) < n:
            names[draw_name(rng, split)] = None
        pools[split] = list(names)
    return pools


def make_entity(rng: random.Random, name: str) -> Entity:
    return Entity(name=name, city=rng.choice(CITIES), number=str(rng.randint(100, 999)), pet=rng.choice(PETS),
                  colour=rng.choice(COLOURS), profession=rng.choice(PROFESSIONS))


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact_example(rng: random.Random, entity: Entity, relation: str) -> tuple[str, str, str]:
    """(fact sentence, question, answer) for one relation of an entity, in randomly chosen templates."""
    value = getattr(entity, relation)
    fact = rng.choice(FACT_TEMPLATES[relation]).format(name=entity.name, value=value, a_value=_with_article(value))
    question = rng.choice(QUESTION_TEMPLATES[relation]).format(name=entity.name)
    return fact, question, value


def _noun_phrase(rng: random.Random) -> str:
    return "the " + (rng.choice(_ADJECTIVES) + " " if rng.random() < 0.6 else "") + rng.choice(_NOUNS)


def distractor_sentence(rng: random.Random) -> str:
    template = rng.choice(_SENTENCES)
    fields = {"np": _noun_phrase, "vi": lambda r: r.choice(_INTRANSITIVE), "vt": lambda r: r.choice(_TRANSITIVE),
              "place": lambda r: r.choice(_PLACES), "time": lambda r: r.choice(_TIMES)}
    # Fill placeholders left to right so that repeated ones ({np} twice) get independent draws.
    parts = re.split(r"\{(\w+)\}", template)
    text = "".join(p if i % 2 == 0 else fields[p.lower()](rng) for i, p in enumerate(parts))
    return text[0].upper() + text[1:]


def distractor_chunk(rng: random.Random, n_words: int) -> str:
    """Whole filler sentences, at least `n_words` words (at most one sentence more); "" for n_words <= 0."""
    sentences, count = [], 0
    while count < n_words:
        sentences.append(distractor_sentence(rng))
        count += len(sentences[-1].split())
    return " ".join(sentences)


def fact_paragraph(rng: random.Random, fact: str, filler_words: int) -> str:
    """The chunk that writes a fact into memory: filler_words of filler, then the fact sentence.

    The fact comes last because a chunk's new memory rows are the hidden states of its last K tokens (MemoryLLM, arXiv 2402.04624 §3.1.2):
    a tiny model cannot learn, on a CPU budget, to move a fact from the middle of a chunk into them."""
    return " ".join(x for x in (distractor_chunk(rng, filler_words), fact) if x)


def reply(fact: str, name: str) -> str:
    """The answer as the model is taught to say it: the fact sentence from the name on."""
    return fact[fact.index(name):]


def qa_text(question: str, answer: str) -> str:
    return f"{qa_prompt(question)} {answer}"


def qa_prompt(question: str) -> str:
    """The prompt that asks a question; the model should continue with " <answer>"."""
    return f"Q: {question}\nA:"


def recall_episode(rng: random.Random, split: str, n_distractor_chunks: int, chunk_words: int = 100) -> dict:
    """One retention trial: a fact about a fresh person of `split`, filler chunks, then the question.

    Returns dict(fact, distractors, question, answer, reply, name, relation); answer is the value alone."""
    entity = make_entity(rng, draw_name(rng, split))
    relation = rng.choice(RELATIONS)
    fact, question, answer = fact_example(rng, entity, relation)
    distractors = [distractor_chunk(rng, chunk_words) for _ in range(n_distractor_chunks)]
    return dict(fact=fact, distractors=distractors, question=question, answer=answer,
                reply=reply(fact, entity.name), name=entity.name, relation=relation)


def episode_set(seed: int, split: str, n_episodes: int, n_distractor_chunks: int,
                chunk_words: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [recall_episode(rng, split, n_distractor_chunks, chunk_words) for _ in range(n_episodes)]


def fresh_test_set(seed: int, n_episodes: int = 200, n_distractor_chunks: int = 0,
                   chunk_words: int = 100) -> list[dict]:
    """A test set for any seed: its people come from the test partition, which training never sees."""
    return episode_set(seed, "test", n_episodes, n_distractor_chunks, chunk_words)


def single_fact_document(rng: random.Random, gap_words: int = 0) -> str:
    """A filler paragraph ending in one fact about a train person, 0..gap_words more words of filler, then
    the question and reply: the memory stages' task, in context.

    With gap_words 0, copying from context emerges within ~1000 steps of a 2-layer d 128 model (cloze 0.825 on
    test people), long before it does on multi-person stories (measured). But such a model copies only from
    nearby (the fact <= ~40 tokens before the question); memory rows two chunks back in the STM, or retrieved
    from the LTM, sit at larger RoPE distances and were read at the no-context floor. gap_words spreads the
    distance; trained with it from the start, copying had not emerged after 1500 steps, so the base config
    switches it on after copying has formed (train_base's gap_from_step; README, Training)."""
    ep = recall_episode(rng, "train", 0)
    story = " ".join(x for x in (fact_paragraph(rng, ep["fact"], rng.randint(0, 24)),
                                 # no draw at gap 0: the corpus stays the one the near-only base was measured on
                                 distractor_chunk(rng, rng.randint(0, gap_words) if gap_words else 0)) if x)
    return "\n".join((story, qa_text(ep["question"], ep["reply"])))


def document(rng: random.Random, repeat_ratio: float = 0.3) -> str:
    """One training document: 2-5 train people, 1-2 facts each in a story, then questions on every fact in
    random order; or, with probability repeat_ratio, the story followed by "Repeat:" and the story again (the
    recipe's repeat task, here in pretraining: repeated passages grow the induction heads that copying needs,
    measured to form within a few hundred steps on repeats alone). Half the stories have no filler between the facts, the rest up to 8 words per gap: dense in
    questions, so that a small model learns to copy a fact from context (the skill the memory stages build
    on) within minutes of pretraining; filler-free stories make copying the only way to lower the loss."""
    max_gap_words = rng.choice((0, 0, 4, 8))
    entities = [make_entity(rng, draw_name(rng, "train")) for _ in range(rng.randint(2, 5))]
    facts = [(e, r) for e in entities for r in rng.sample(RELATIONS, rng.randint(1, 2))]
    rng.shuffle(facts)
    examples = [(fact, question, reply(fact, e.name))
                for (e, r) in facts for fact, question, _ in [fact_example(rng, e, r)]]
    story = []
    for fact, _, _ in examples:
        story += [distractor_chunk(rng, rng.randint(0, max_gap_words)), fact]
    story.append(distractor_chunk(rng, rng.randint(0, max_gap_words)))
    asked = rng.sample(examples, len(examples))
    text = " ".join(s for s in story if s)
    if rng.random() < repeat_ratio:  # a repeated passage: teaches the copying that answering is made of
        return f"{text}\nRepeat: {text}"
    return "\n".join([text, *(qa_text(q, a) for _, q, a in asked)])


def corpus(seed: int, n_docs: int, repeat_ratio: float = 0.3, single_fact_ratio: float = 0.0,
           gap_words: int = 0) -> Iterator[str]:
    """`n_docs` training documents (format in the module docstring), only ever about train-partition people;
    a share single_fact_ratio of them are single_fact_document(rng, gap_words)s."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield single_fact_document(rng, gap_words) if rng.random() < single_fact_ratio else document(rng, repeat_ratio)
