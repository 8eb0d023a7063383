"""Filler: varied plain English that holds no fact, for the text a memory must keep a fact through.

Passages are drawn from sentence templates on everyday topics (weather, streets, kitchens, journeys, seasons,
work, reading) filled from word lists, seeded by a random.Random. The vocabulary leaves out every name of
data/people.py and every attribute value (no colours, pets, cities, jobs, hobbies or employers that could be
answers, and no digits), so filler never contains an answer; tests/test_people.py checks it on many passages.
"""
from __future__ import annotations

import random
import re

_NOUNS = (
    "bridge", "market", "river", "road", "train", "garden", "kitchen", "library", "window", "clock", "path",
    "field", "tower", "harbour", "station", "meadow", "hill", "forest", "lake", "storm", "kettle", "school",
    "letter", "song", "boat", "wagon", "fence", "roof", "cloud", "square", "bell", "door", "lamp", "valley",
    "stove", "chimney", "mill", "well", "shore", "village", "bakery", "staircase", "corridor", "notebook", "teapot",
    "umbrella", "bicycle", "bench", "fountain", "lighthouse", "cottage", "barn", "orchard", "hedge", "pond",
    "workshop", "museum", "theatre", "ferry", "tram", "bus", "suitcase", "map", "compass", "blanket", "candle",
    "radio", "piano", "violin", "newspaper", "postcard", "envelope", "basket", "ladder", "gate", "courtyard",
    "balcony", "attic", "cellar", "pantry", "hallway", "island", "cliff", "beach", "dune", "canal", "tunnel")
_ADJECTIVES = (
    "old", "quiet", "narrow", "busy", "wooden", "small", "tall", "distant", "empty", "bright", "grey", "heavy",
    "gentle", "crowded", "patient", "tired", "careful", "sleepy", "broad", "simple", "cold", "warm", "new", "long",
    "silent", "muddy", "windy", "dusty", "polished", "crooked", "familiar", "forgotten", "cheerful", "modest",
    "ancient", "spacious", "tiny", "damp", "sunny", "faded", "sturdy", "shabby", "elegant", "peaceful", "noisy",
    "humble", "enormous", "fragile", "rusty", "cosy")
_INTRANSITIVE = (
    "waits", "rests", "sleeps", "shines", "hums softly", "stays open late", "grows quiet", "turns slowly", "creaks",
    "fills with light", "looks different", "seems calm", "stands still", "drifts along", "wakes early",
    "echoes for a while", "smells of rain", "gathers dust", "leans to one side", "catches the light",
    "stays warm", "falls silent", "comes back to life", "feels smaller than before")
_TRANSITIVE = (
    "carries", "watches", "follows", "covers", "remembers", "passes", "reaches", "warms", "hides", "faces",
    "shelters", "joins", "overlooks", "surrounds", "outlasts", "resembles")
_PLACES = (
    "near the river", "by the old road", "behind the station", "under the grey sky", "at the edge of the field",
    "beside the harbour", "across the valley", "along the shore", "past the mill", "below the hill",
    "at the end of the street", "on the far side of town", "in the middle of the square", "next to the bakery",
    "at the top of the stairs", "outside the library", "around the corner", "beyond the bridge")
_TIMES = (
    "in the morning", "after the rain", "on most days", "every winter", "late at night", "during the long summer",
    "when the wind changes", "now and then", "at dusk", "by midday", "before dawn", "in the evening",
    "on quiet afternoons", "at the start of spring", "once the shops close", "while the kettle boils",
    "as the days grow shorter", "on market day")
_PEOPLE = (
    "the neighbours", "an old friend", "the children", "a stranger", "the shopkeeper", "the visitors",
    "a traveller", "the people next door", "the family upstairs", "a passer-by", "the driver", "the students",
    "the regulars", "a small crowd", "the guests", "everyone in the street")
_ACTIVITIES = (
    "read the newspaper", "drink a cup of tea", "talk about the weather", "wait for the bus", "sweep the steps",
    "open the windows", "bake bread", "write letters", "walk without hurrying", "count the days",
    "mend the fence", "tidy the shelves", "listen to the radio", "watch the boats", "share a meal",
    "light a candle", "hang out the washing", "plan a short trip")
_FOODS = ("bread", "soup", "apples", "tea", "coffee", "cheese", "porridge", "pears", "honey", "biscuits", "stew",
          "plums", "rice", "toast", "jam", "pie")
_FEELINGS = ("calm", "content", "restless", "hopeful", "curious", "patient", "relieved", "thoughtful",
             "uncertain", "cheerful", "weary", "grateful")
_SENTENCES = (
    "{Time}, {np} {vi} {place}.", "{Np} {vt} {np} {time}.", "{Np} {vi}, and {np} {vi}.",
    "Nobody knows why {np} {vi} {place}.", "It is said that {np} {vt} {np}.", "Some say that {np} {vi}.",
    "{Np} {vi} {place} {time}.", "{Time}, {people} {activity}.", "{People} like to {activity} {place}.",
    "{People} often {activity} {time}.", "There is a smell of {food} {place}.", "{Time}, the kitchen smells of {food}.",
    "{People} bring {food} to share {time}.", "{People} feel {feeling} {time}.",
    "It is hard to feel {feeling} when {np} {vi}.", "Most evenings end with {food} and a quiet talk.",
    "{Np} has not changed in years.", "From {np} one can see {np}.", "{Place_cap}, {np} {vi}.",
    "{People} say that {np} {vt} {np}.", "If the weather holds, {people} will {activity}.",
    "{Np} is {adjective}, but {np} is {adjective}.", "Few things are as {adjective} as {np} {time}.",
    "{People} remember when {np} was {adjective}.", "{Time}, nothing much happens {place}.",
    "A long walk {place} takes most of the afternoon.", "{People} stop to {activity} before going home.",
    "The road to {np} is {adjective} {time}.", "{Np} and {np} have stood side by side for ages.",
    "Now and then {people} ask who built {np}.")


def _noun_phrase(rng: random.Random) -> str:
    return "the " + (rng.choice(_ADJECTIVES) + " " if rng.random() < 0.6 else "") + rng.choice(_NOUNS)


_FIELDS = {
    "np": _noun_phrase, "vi": lambda r: r.choice(_INTRANSITIVE), "vt": lambda r: r.choice(_TRANSITIVE),
    "place": lambda r: r.choice(_PLACES), "place_cap": lambda r: r.choice(_PLACES), "time": lambda r: r.choice(_TIMES),
    "people": lambda r: r.choice(_PEOPLE), "activity": lambda r: r.choice(_ACTIVITIES),
    "food": lambda r: r.choice(_FOODS), "feeling": lambda r: r.choice(_FEELINGS),
    "adjective": lambda r: r.choice(_ADJECTIVES)}
WORDS = frozenset(re.findall(r"[a-z]+", " ".join(
    (*_NOUNS, *_ADJECTIVES, *_INTRANSITIVE, *_TRANSITIVE, *_PLACES, *_TIMES, *_PEOPLE, *_ACTIVITIES, *_FOODS,
     *_FEELINGS, *_SENTENCES)).lower()))  # every word filler can contain


def sentence(rng: random.Random) -> str:
    """One filler sentence. Placeholders are filled left to right, each with its own draw."""
    parts = re.split(r"\{(\w+)\}", rng.choice(_SENTENCES))
    text = "".join(p if i % 2 == 0 else _FIELDS[p.lower()](rng) for i, p in enumerate(parts))
    return text[0].upper() + text[1:]


def passage(rng: random.Random, n_words: int) -> str:
    """Whole filler sentences, at least n_words words (at most one sentence more); "" for n_words <= 0."""
    sentences, count = [], 0
    while count < n_words:
        sentences.append(sentence(rng))
        count += len(sentences[-1].split())
    return " ".join(sentences)
