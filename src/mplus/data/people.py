"""Invented people for a real model's memory: realistic names, eight attributes, statements and questions.

The data for M+ on a pretrained model (SmolLM2-135M-Instruct; arXiv 2502.00592 trains and tests on facts
it must carry through memory). Unlike data/facts.py (syllable names for the tiny model's own tokenizer),
names here are real first names and surnames from curated lists, so they tokenize as names do under a real
tokenizer; the person is invented by the combination and the attributes, drawn per person.

Splits. A person's split is fixed by a hash of the full name (crc32 % 10: 0 test, 1 validation, else train),
a rule that ignores every seed: each split is a fixed partition of the ~15,000 name combinations, and a draw
for one split picks only from its partition, so no seed ever puts a test person into training.

Answers. Each attribute's answer is its value ("Lisbon", "1987", "a parrot" answers "parrot"); a reply is
right when it contains the value, case-insensitively. So no value is part of another value, of any name, of
any template word or of any filler text (tests/test_people.py checks all four), numbers never overlap birth
years (lucky numbers are 300..899: no 3-digit piece of a year 1940..1999), and people in one document have
distinct first names, surnames and values (data/people_docs.py).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import zlib

from mplus.data.facts import qa_prompt

FIRST_NAMES = (
    "Amelia", "Oliver", "Priya", "Mateo", "Hannah", "Tobias", "Yuki", "Nadia", "Samuel", "Ingrid", "Rafael", "Chloe",
    "Dmitri", "Fatima", "Lucas", "Eleanor", "Kwame", "Sofia", "Henrik", "Aisha", "Julian", "Mei", "Gabriel", "Leila",
    "Connor", "Anya", "Marcus", "Zara", "Felix", "Imogen", "Omar", "Clara", "Tomas", "Freya", "Arjun", "Beatrix",
    "Diego", "Helena", "Kofi", "Lena", "Nathan", "Elif", "Vikram", "Marta", "Jonas", "Camille", "Hugo", "Ines",
    "Malik", "Greta", "Andrei", "Noor", "Patrick", "Esther", "Kenji", "Lucia", "Rowan", "Sienna", "Idris", "Maeve",
    "Thea", "Emil", "Daria", "Ravi", "Astrid", "Caleb", "Naomi", "Bruno", "Elena", "Farid", "Harriet", "Ivan",
    "Josephine", "Lorenzo", "Miriam", "Nikolai", "Ophelia", "Pedro", "Quentin", "Rania", "Stefan", "Tamsin",
    "Valentina", "Yusuf", "Zoltan", "Agnes", "Bernard", "Cecilia", "Desmond", "Edith", "Florian", "Gwen", "Hamid",
    "Isla", "Jasper", "Keira", "Leon", "Margot", "Nils", "Orla", "Pablo", "Silas", "Talia", "Viktor", "Wanda",
    "Adrian", "Beatriz", "Cyrus", "Dalia", "Ezra", "Femi", "Gideon", "Hana", "Ismail", "Juno", "Kasia", "Luca",
    "Matilda", "Nico", "Oskar", "Paloma", "Renata", "Soren", "Tariq", "Uma", "Vera", "Wilbur", "Yara")
SURNAMES = (
    "Okafor", "Lindqvist", "Moreau", "Castellanos", "Nakamura", "Petrov", "Haddad", "Fitzgerald", "Kowalski",
    "Mendes", "Delacroix", "Varga", "Novak", "Horvath", "Eriksen", "Takahashi", "Gallagher", "Romano", "Bianchi",
    "Schneider", "Hoffmann", "Dubois", "Fernandes", "Mensah", "Abernathy", "Whitfield", "Kaczmarek", "Lindgren",
    "Sorensen", "Ivanova", "Brennan", "Castillo", "Alvarez", "Pereira", "Rahman", "Chowdhury", "Kimura", "Nguyen",
    "Mwangi", "Kamau", "Adeyemi", "Osei", "Halvorsen", "Bergstrom", "Jansen", "Visser", "Dekker", "Kovacs",
    "Popescu", "Georgiou", "Papadopoulos", "Yilmaz", "Demir", "Ozturk", "Farouk", "Nasser", "Quintero", "Serrano",
    "Moretti", "Ricci", "Marchetti", "Weber", "Richter", "Brandt", "Gauthier", "Fontaine", "Beaumont", "Thornton",
    "Ashworth", "Pemberton", "Hargreaves", "Holloway", "Kingsley", "Donnelly", "McAllister", "Sullivan", "Reyes",
    "Medina", "Salazar", "Vargas", "Ortega", "Ferreira", "Sandoval", "Dlamini", "Banerjee", "Iyer", "Menon",
    "Kapoor", "Malhotra", "Suzuki", "Watanabe", "Hayashi", "Yamamoto", "Lindholm", "Nyberg", "Virtanen", "Laine",
    "Achebe", "Bauer", "Carvalho", "Duarte", "Engel", "Falk", "Gruber", "Hakimi", "Jovanovic", "Lombardi",
    "Mazur", "Nowicki", "Oliveira", "Quinlan", "Rossi", "Schmitt", "Toivonen", "Uchida", "Wagner", "Zielinski")

ATTRIBUTES = ("job", "city", "employer", "pet", "colour", "hobby", "birth_year", "number")
VALUES = {
    "job": ("architect", "pharmacist", "electrician", "librarian", "veterinarian", "accountant", "firefighter",
            "journalist", "plumber", "dentist", "photographer", "carpenter", "translator", "geologist", "paramedic",
            "economist", "florist", "surgeon", "optician", "locksmith"),
    "city": ("Lisbon", "Toronto", "Melbourne", "Osaka", "Nairobi", "Glasgow", "Denver", "Hamburg", "Valencia",
             "Montreal", "Krakow", "Seattle", "Dublin", "Auckland", "Bergen", "Porto", "Santiago", "Edinburgh",
             "Marseille", "Helsinki"),
    "employer": ("Northwind Logistics", "Bluefin Analytics", "Copperleaf Insurance", "Harbourline Shipping",
                 "Maplestone Bank", "Quillfeather Press", "Ironbridge Engineering", "Sunvale Energy",
                 "Kestrel Airlines", "Orchardway Foods", "Lumenix Robotics", "Westbrook Hospital", "Cobaltine Software",
                 "Fernhill Textiles", "Stormgate Security", "Tidewater Telecom", "Granite Peak Hotels",
                 "Redwing Media", "Hollowbrook Brewery", "Starling Consulting"),
    "pet": ("parrot", "hamster", "tortoise", "rabbit", "goldfish", "ferret", "iguana", "canary", "guinea pig",
            "beagle", "poodle", "cockatoo", "chinchilla", "terrier", "gecko", "dachshund"),
    "colour": ("turquoise", "maroon", "lavender", "crimson", "emerald", "yellow", "orange", "purple", "silver",
               "scarlet", "indigo", "magenta"),
    "hobby": ("gardening", "chess", "rock climbing", "knitting", "birdwatching", "pottery", "fishing", "sailing",
              "cycling", "woodworking", "archery", "kayaking", "calligraphy", "astronomy", "origami",
              "skateboarding", "juggling", "embroidery"),
    "birth_year": tuple(str(y) for y in range(1940, 2000)),
    "number": tuple(str(n) for n in range(300, 900)),
}
# {name}; {value} as written, {a_value} with its article. At least three ways to state each attribute.
STATEMENTS = {
    "job": ("{name} works as {a_value}.", "By profession, {name} is {a_value}.", "{name} earns a living as {a_value}.",
            "{name} has worked as {a_value} for many years."),
    "city": ("{name} lives in {value}.", "{name} has a flat in {value}.", "The home of {name} is in {value}.",
             "{name} moved to {value} and still lives there."),
    "employer": ("{name} works for {value}.", "{name} is employed by {value}.", "The employer of {name} is {value}.",
                 "{name} has a job at {value}."),
    "pet": ("{name} has {a_value} as a pet.", "{name} owns {a_value}.", "The pet of {name} is {a_value}.",
            "{name} looks after {a_value} at home."),
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes the colour {value} best.",
               "Of all colours, {name} prefers {value}."),
    "hobby": ("{name}'s favourite hobby is {value}.", "In their free time, {name} enjoys {value}.",
              "{name} spends most weekends on {value}."),
    "birth_year": ("{name} was born in {value}.", "{name}'s year of birth is {value}.",
                   "The birth year of {name} is {value}."),
    "number": ("{name}'s lucky number is {value}.", "The lucky number of {name} is {value}.",
               "{name} believes that {value} is a lucky number."),
}
QUESTIONS = {
    "job": ("What does {name} do for a living?", "What is {name}'s job?", "What is the profession of {name}?"),
    "city": ("Where does {name} live?", "In which city does {name} live?", "What city is {name}'s home?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?", "Who is {name}'s employer?"),
    "pet": ("What pet does {name} have?", "Which animal does {name} keep as a pet?", "What is {name}'s pet?"),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?",
               "What colour does {name} prefer?"),
    "hobby": ("What is {name}'s favourite hobby?", "What does {name} enjoy in their free time?",
              "Which hobby does {name} spend weekends on?"),
    "birth_year": ("In which year was {name} born?", "What is {name}'s birth year?", "When was {name} born?"),
    "number": ("What is {name}'s lucky number?", "Which number is lucky for {name}?",
               "What number does {name} consider lucky?"),
}
REPLIES = {attribute: STATEMENTS[attribute][0] for attribute in ATTRIBUTES}  # how the model is taught to answer


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    values: dict[str, str]  # attribute -> value, one per ATTRIBUTES

    @property
    def first(self) -> str:
        return self.name.split()[0]

    @property
    def last(self) -> str:
        return self.name.split()[1]


def split_of(name: str) -> str:
    """A person's split by a seed-independent hash of the full name: 'test', 'validation' or 'train'."""
    bucket = zlib.crc32(name.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@functools.cache
def names_in(split: str) -> tuple[str, ...]:
    """Every full name of a split's partition, in a fixed order."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; the splits are 'train', 'validation' and 'test'")
    return tuple(n for n in (f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES) if split_of(n) == split)


def with_article(value: str) -> str:
    return ("an " if value[0] in "aeiou" else "a ") + value


def draw_people(rng: random.Random, split: str, n: int) -> list[Person]:
    """n people of `split` told apart by everything: distinct first names, surnames and values of every
    attribute, so an answer in a document holding them all names exactly one of them."""
    if not 1 <= n <= min(len(v) for v in VALUES.values()):
        raise ValueError(f"cannot draw {n} mutually distinct people; draw 1 to "
                         f"{min(len(v) for v in VALUES.values())}")
    pool, names = names_in(split), []
    while len(names) < n:
        name = rng.choice(pool)
        if all(name.split()[0] != m.split()[0] and name.split()[1] != m.split()[1] for m in names):
            names.append(name)
    columns = {a: rng.sample(VALUES[a], n) for a in ATTRIBUTES}
    return [Person(name, {a: columns[a][i] for a in ATTRIBUTES}) for i, name in enumerate(names)]


def statement(rng: random.Random, person: Person, attribute: str) -> str:
    """One fact about a person, in a randomly chosen paraphrase."""
    return _fill(rng.choice(STATEMENTS[attribute]), person, attribute)


def question(rng: random.Random, person: Person, attribute: str) -> str:
    return rng.choice(QUESTIONS[attribute]).format(name=person.name)


def reply(person: Person, attribute: str) -> str:
    """The reply the model is taught to give: one fixed sentence per attribute, holding the answer."""
    return _fill(REPLIES[attribute], person, attribute)


def answer(person: Person, attribute: str) -> str:
    """The short answer to score with: a reply is right when it contains this, case-insensitively."""
    return person.values[attribute]


def is_right(reply_text: str, expected: str) -> bool:
    return expected.lower() in reply_text.lower()


def plain_prompt(question_text: str) -> str:
    """The question as plain text (the format of data/facts.py); the reply follows after one space."""
    return qa_prompt(question_text)


def chat_messages(question_text: str, reply_text: str | None = None, system: str | None = None
                  ) -> list[dict[str, str]]:
    """The question as a chat ([system,] user[, assistant]), for Tokenizer.apply_chat_template."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question_text})
    if reply_text is not None:
        messages.append({"role": "assistant", "content": reply_text})
    return messages


def _fill(template: str, person: Person, attribute: str) -> str:
    value = person.values[attribute]
    return template.format(name=person.name, value=value, a_value=with_article(value))
