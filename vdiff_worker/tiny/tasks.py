"""A synthetic instruction task suite with exact answers, in the golden prompts' phrasings.

    from vdiff_worker.tiny.tasks import suite
    for task in suite(n_per_kind=20, seed=1234): print(task.kind, task.prompt, task.answer)

Seeds decide the instances; training data for a model should use seeds disjoint from the
held-out seed the benchmarks use (HELD_OUT_SEED).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

HELD_OUT_SEED = 20261125

WORDS = [
    "wind",
    "bird",
    "star",
    "tree",
    "bear",
    "stone",
    "door",
    "house",
    "cherry",
    "river",
    "cloud",
    "apple",
    "green",
    "light",
    "moon",
    "fish",
    "rain",
    "road",
    "snow",
    "lamp",
]
CAPITALS = {
    "France": "Paris",
    "Norway": "Oslo",
    "Romania": "Bucharest",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Sweden": "Stockholm",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Cuba": "Havana",
    "India": "New Delhi",
}
TIMES = {2: "twice", 3: "three times"}


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str


def _sums(kind: str, top: int) -> Callable[[random.Random], Task]:
    def draw(r: random.Random) -> Task:
        a, b = r.randint(0, top), r.randint(0, top)
        return Task(kind, f"What is {a} + {b}?", str(a + b))

    return draw


def _differences(kind: str, low: int, top: int) -> Callable[[random.Random], Task]:
    def draw(r: random.Random) -> Task:
        a = r.randint(low, top)
        b = r.randint(0, a)
        return Task(kind, f"What is {a} - {b}?", str(a - b))

    return draw


def _sort(r: random.Random) -> Task:
    xs = r.sample(range(100), r.randint(3, 6))
    return Task(
        "sort", "Sort the numbers: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
    )


def _reverse(r: random.Random) -> Task:
    ws = r.sample(WORDS, r.randint(2, 5))
    return Task("reverse", "Reverse the words: " + " ".join(ws), " ".join(reversed(ws)))


def _repeat(r: random.Random) -> Task:
    k = r.choice(list(TIMES))
    ws = r.sample(WORDS, r.randint(1, 3))
    phrase = " ".join(ws)
    return Task("repeat", f"Repeat {TIMES[k]}: {phrase}", " ".join([phrase] * k))


def _count(r: random.Random) -> Task:
    letters = "aehicon"
    target = r.choice(letters)
    seq = [r.choice(letters) for _ in range(r.randint(4, 8))]
    return Task(
        "count",
        f"How many times does the letter {target} appear in: {' '.join(seq)}?",
        str(seq.count(target)),
    )


def _max(r: random.Random) -> Task:
    xs = r.sample(range(1000), r.randint(3, 5))
    return Task("max", "Which is the largest: " + " ".join(map(str, xs)) + "?", str(max(xs)))


def _capital(r: random.Random) -> Task:
    country = r.choice(sorted(CAPITALS))
    return Task("capital", f"What is the capital of {country}?", CAPITALS[country])


# New kinds go at the end: suite() draws kind by kind from one generator, so the instances of
# the kinds before them stay what they were.
KINDS: dict[str, Callable[[random.Random], Task]] = {
    "add": _sums("add", 999),
    "sub": _differences("sub", 1, 999),
    "sort": _sort,
    "reverse": _reverse,
    "repeat": _repeat,
    "count": _count,
    "max": _max,
    "capital": _capital,
    "add_digits": _sums("add_digits", 9),
    "sub_digits": _differences("sub_digits", 0, 9),
}


def suite(
    n_per_kind: int = 20, seed: int = HELD_OUT_SEED, kinds: list[str] | None = None
) -> list[Task]:
    r = random.Random(seed)
    return [KINDS[k](r) for k in (kinds or list(KINDS)) for _ in range(n_per_kind)]


def exact(answer: str, expected: str) -> bool:
    return answer.strip() == expected
