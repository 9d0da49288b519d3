"""The task suite: deterministic, answers right, phrasings those of the golden prompts."""

from __future__ import annotations

import re

from vdiff_worker.tiny.tasks import KINDS, exact, suite


def test_suite_is_seeded_and_covers_every_kind() -> None:
    a, b = suite(5, seed=1), suite(5, seed=1)
    assert a == b and a != suite(5, seed=2)
    assert {t.kind for t in a} == set(KINDS)


def test_answers_are_correct() -> None:
    for t in suite(50, seed=3):
        if t.kind == "add":
            x, y = map(int, re.findall(r"\d+", t.prompt))
            assert int(t.answer) == x + y
        elif t.kind == "sub":
            x, y = map(int, re.findall(r"\d+", t.prompt))
            assert int(t.answer) == x - y
        elif t.kind == "sort":
            assert t.answer.split() == sorted(t.prompt.split(":")[1].split(), key=int)
        elif t.kind == "max":
            assert int(t.answer) == max(map(int, re.findall(r"\d+", t.prompt)))
        elif t.kind == "reverse":
            assert t.answer.split() == t.prompt.split(":")[1].split()[::-1]
    assert exact(" 42 ", "42") and not exact("41", "42")


FORMS = {
    "add": r"What is \d+ \+ \d+\?",
    "sub": r"What is \d+ - \d+\?",
    "sort": r"Sort the numbers:( \d+)+",
    "reverse": r"Reverse the words:( [a-z]+)+",
    "repeat": r"Repeat (twice|three times):( [a-z]+)+",
    "count": r"How many times does the letter [a-z] appear in:( [a-z])+\?",
    "max": r"Which is the largest:( \d+)+\?",
    "capital": r"What is the capital of [A-Z][a-z]+\?",
}
GOLDEN_PROMPTS = {
    "add": "What is 347 + 58?",
    "sub": "What is 274 - 7?",
    "sort": "Sort the numbers: 6 3 57",
    "reverse": "Reverse the words: red blue",
    "repeat": "Repeat twice: cherry",
    "count": "How many times does the letter i appear in: i i h i i?",
    "max": "Which is the largest: 589 592 784?",
    "capital": "What is the capital of France?",
}


def test_phrasings_match_the_golden_prompts() -> None:
    for kind, form in FORMS.items():
        assert re.fullmatch(form, GOLDEN_PROMPTS[kind])
        assert all(re.fullmatch(form, t.prompt) for t in suite(20, seed=4, kinds=[kind]))
