"""Seeds through the real server, each claim able to fail: a server that ignored `seed`
(or drew one per request) or `temperature` would fail one of these. llada-tiny's reference
decoder at temperature 1.0 samples every token; a sorting task's answer is 14 tokens long
(most tasks' are 1 to 4, where two seeds may well agree), so different seeds give different
answers."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import GOLDEN, Server

CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["generate"]
SORT = next(c["prompt_ids"] for c in CASES if c.get("task") == "sort" and "prompt_ids" in c)
SAMPLED = {"decoding": "reference", "temperature": 1.0}


def _choices(server: Server, n: int = 1, **extra: object) -> list[list[int]]:
    body = {
        "model": "llada-tiny",
        "prompt": SORT,
        "max_tokens": 32,
        "return_token_ids": True,
        "n": n,
        **extra,
    }
    r = httpx.post(server.url + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [c["token_ids"] for c in r.json()["choices"]]


@pytest.fixture(scope="module")
def greedy(llada_server: Server) -> list[int]:
    [ids] = _choices(llada_server, decoding="reference", temperature=0.0)
    assert len(ids) > 8  # long enough that a sample differs from it somewhere
    return ids


def test_the_same_seed_gives_the_same_tokens(llada_server: Server) -> None:
    first = _choices(llada_server, seed=11, **SAMPLED)
    assert first[0]  # an empty answer would repeat whatever the seed did
    assert _choices(llada_server, seed=11, **SAMPLED) == first


def test_another_seed_gives_other_tokens(llada_server: Server) -> None:
    answers = [_choices(llada_server, seed=seed, **SAMPLED)[0] for seed in (11, 12, 13)]
    assert len({tuple(a) for a in answers}) == 3, answers


def test_a_sampled_answer_is_not_the_greedy_one(llada_server: Server, greedy: list[int]) -> None:
    for seed in (11, 12):
        assert _choices(llada_server, seed=seed, **SAMPLED)[0] != greedy


def test_choice_i_of_n_is_the_single_request_with_seed_plus_i(llada_server: Server) -> None:
    choices = _choices(llada_server, n=3, seed=20, **SAMPLED)
    alone = [_choices(llada_server, seed=20 + i, **SAMPLED)[0] for i in range(3)]
    assert choices == alone
    assert len({tuple(c) for c in choices}) > 1, choices
