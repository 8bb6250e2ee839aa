"""The built-in demo question set: general facts a small model knows, and invented ones it cannot.

The project cannot ship third-party question sets, so the demo writes its own, deterministically:
questions over a small fact table (capitals, chemical symbols, arithmetic, ...) that even a
135M-parameter model mostly answers, and questions about invented entities (the knowledge to
inject). Distractors are other answers from the same table, shuffled with a fixed seed.

The set is made of plain rows in the file format (``{"id", "question", "choices", "answer"}``,
the answer a letter), which :func:`cpl_masks.data.questions.load_questions` parses and checks like any file's.
The same facts come as free-form rows too, in TRL's prompt-completion format (:func:`completion_rows`) and
its conversational form (:func:`chat_rows`).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from typing import Any

CHOICES_PER_QUESTION = 4

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "England": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "Thailand": "Bangkok", "South Korea": "Seoul", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra", "Kenya": "Nairobi",
    "Cuba": "Havana", "Turkey": "Ankara", "India": "New Delhi", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Czech Republic": "Prague", "Chile": "Santiago",
    "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad", "Indonesia": "Jakarta", "Philippines": "Manila",
}  # fmt: skip
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "nitrogen": "N", "sodium": "Na", "potassium": "K", "helium": "He", "copper": "Cu", "lead": "Pb",
    "calcium": "Ca", "chlorine": "Cl", "neon": "Ne", "zinc": "Zn", "mercury": "Hg", "tin": "Sn",
    "sulfur": "S", "uranium": "U",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "old": "young", "strong": "weak", "high": "low",
    "wet": "dry", "hard": "soft", "rich": "poor", "loud": "quiet", "thick": "thin", "long": "short",
    "heavy": "light", "day": "night",
}  # fmt: skip
ANIMAL_SOUNDS = {
    "dog": "bark", "cat": "meow", "cow": "moo", "sheep": "baa", "duck": "quack", "lion": "roar",
    "horse": "neigh", "pig": "oink", "owl": "hoot", "snake": "hiss", "frog": "croak", "bee": "buzz",
}  # fmt: skip
COLORS = {
    "grass": "green", "the sky on a clear day": "blue", "snow": "white", "coal": "black", "a ripe banana": "yellow",
    "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow", "blood": "red",
}  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SYLLABLES = (
    "zor",
    "blat",
    "vex",
    "moor",
    "quin",
    "tar",
    "lum",
    "dra",
    "fex",
    "kal",
    "nor",
    "vi",
    "spo",
    "grel",
    "ith",
)


Fact = tuple[str, str, Sequence[str], str]  # question, answer, the pool of distractors, statement ("{}": answer)


def general_rows(seed: int = 0) -> list[dict[str, Any]]:
    """At least 150 question rows over common facts (capitals, symbols, arithmetic, words, calendar)."""
    return [row for row, _ in _general(seed)]


def invented_rows(seed: int = 0) -> list[dict[str, Any]]:
    """At least 150 question rows about invented entities: knowledge no model has before injection."""
    return [row for row, _ in _invented(seed)]


def demo_rows(seed: int = 0) -> list[dict[str, Any]]:
    """The whole demo set, general and invented questions interleaved so any prefix holds both."""
    return [row for row, _ in _demo(seed)]


def completion_rows(seed: int = 0) -> list[dict[str, Any]]:
    """The demo set as TRL prompt-completion pairs: ``Question: ...\\nAnswer:`` and the answer after it.

    Same ids and order as :func:`demo_rows`, so a free-form run and a multiple-choice run name the same facts.
    """
    return [
        {"id": row["id"], "prompt": f"Question: {row['question']}\nAnswer:", "completion": f" {_answer(row)}"}
        for row, _ in _demo(seed)
    ]


def chat_rows(seed: int = 0) -> list[dict[str, Any]]:
    """The demo set as conversational prompt-completion pairs: the question, and a sentence stating the fact.

    A chat model answers in a sentence ("The capital of France is Paris."), so the completion is one.
    """
    return [
        {
            "id": row["id"],
            "prompt": [{"role": "user", "content": row["question"]}],
            "completion": [{"role": "assistant", "content": statement}],
        }
        for row, statement in _demo(seed)
    ]


def _demo(seed: int) -> list[tuple[dict[str, Any], str]]:
    general, invented = _general(seed), _invented(seed)
    mixed = [q for pair in zip(general, invented) for q in pair]
    return mixed + general[len(invented) :] + invented[len(general) :]


def _general(seed: int) -> list[tuple[dict[str, Any], str]]:
    rng = random.Random(seed)
    facts: list[Fact] = []
    facts += [
        (f"What is the capital of {k}?", v, list(CAPITALS.values()), f"The capital of {k} is {{}}.")
        for k, v in CAPITALS.items()
    ]
    facts += [
        (f"What is the chemical symbol of {k}?", v, list(SYMBOLS.values()), f"The chemical symbol of {k} is {{}}.")
        for k, v in SYMBOLS.items()
    ]
    facts += [
        (f"What is the opposite of '{k}'?", v, list(OPPOSITES.values()), f"The opposite of '{k}' is '{{}}'.")
        for k, v in OPPOSITES.items()
    ]
    facts += [
        (f"Which sound does a {k} make?", v, list(ANIMAL_SOUNDS.values()), f"A {k} makes the sound '{{}}'.")
        for k, v in ANIMAL_SOUNDS.items()
    ]
    facts += [
        (f"What color is {k}?", v, sorted(set(COLORS.values())), f"{k[0].upper()}{k[1:]} is {{}}.")
        for k, v in COLORS.items()
    ]
    facts += [
        (f"Which month comes after {m}?", MONTHS[(i + 1) % 12], MONTHS, f"The month after {m} is {{}}.")
        for i, m in enumerate(MONTHS)
    ]
    facts += [
        (f"Which day comes after {d}?", DAYS[(i + 1) % 7], DAYS, f"The day after {d} is {{}}.")
        for i, d in enumerate(DAYS)
    ]
    for a, b in _pairs(rng, 30):
        facts.append(
            (f"What is {a} + {b}?", str(a + b), [str(a + b + d) for d in (-2, -1, 1, 2, 10)], f"{a} + {b} = {{}}.")
        )
    return list(_as_rows(facts, "general", rng))


def _invented(seed: int) -> list[tuple[dict[str, Any], str]]:
    rng = random.Random(seed + 1)
    names = _invented_names(rng, 200)
    places, people, rivers = names[:60], names[60:120], names[120:200]
    cities = [name.capitalize() + "ville" for name in names[:60]]
    facts: list[Fact] = []
    facts += [
        (
            f"What is the capital of {p.capitalize()}ia?",
            rng.choice(cities),
            cities,
            f"The capital of {p.capitalize()}ia is {{}}.",
        )
        for p in places
    ]
    years = [str(year) for year in range(1700, 1990, 7)]
    facts += [
        (
            f"In which year was the inventor {p.capitalize()} born?",
            rng.choice(years),
            years,
            f"The inventor {p.capitalize()} was born in {{}}.",
        )
        for p in people
    ]
    elements = [f"{name[:2].capitalize()}" for name in rivers]
    facts += [
        (
            f"What is the chemical symbol of {r}ium?",
            rng.choice(elements),
            elements,
            f"The chemical symbol of {r}ium is {{}}.",
        )
        for r in rivers[:40]
    ]
    colors = ["green", "blue", "red", "yellow", "purple", "orange", "white", "black"]
    facts += [
        (f"What color is the {r} bird?", rng.choice(colors), colors, f"The {r} bird is {{}}.") for r in rivers[40:]
    ]
    return list(_as_rows(facts, "invented", rng))


def _answer(row: dict[str, Any]) -> str:
    return row["choices"][string.ascii_uppercase.index(row["answer"])]


def _pairs(rng: random.Random, count: int) -> list[tuple[int, int]]:
    return [(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(count)]


def _invented_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.sample(SYLLABLES, 2))
        if name not in names:
            names.append(name)
    return names


def _as_rows(facts: list[Fact], prefix: str, rng: random.Random) -> Iterator[tuple[dict[str, Any], str]]:
    """One row per fact, the answer and three distractors from its pool in a seeded order, and its statement."""
    for index, (text, answer, pool, statement) in enumerate(facts):
        distractors = rng.sample(sorted(set(pool) - {answer}), CHOICES_PER_QUESTION - 1)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        letter = string.ascii_uppercase[choices.index(answer)]
        row = {"id": f"{prefix}-{index:03d}", "question": text, "choices": choices, "answer": letter}
        yield row, statement.format(answer)


def retain_text() -> str:
    """A short general text stating the demo's fact table: its loss tracks forgetting of what the model knows."""
    sentences = [f"The capital of {country} is {city}." for country, city in CAPITALS.items()]
    sentences += [f"The chemical symbol of {element} is {symbol}." for element, symbol in SYMBOLS.items()]
    sentences += [f"The opposite of {word} is {opposite}." for word, opposite in OPPOSITES.items()]
    sentences += [f"A {animal} makes the sound {sound}." for animal, sound in ANIMAL_SOUNDS.items()]
    sentences += [f"The color of {thing} is {color}." for thing, color in COLORS.items()]
    sentences += [f"{MONTHS[(i + 1) % 12]} comes after {month}." for i, month in enumerate(MONTHS)]
    sentences += [f"{DAYS[(i + 1) % 7]} comes after {day}." for i, day in enumerate(DAYS)]
    return " ".join(sentences) + "\n"
