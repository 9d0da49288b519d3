"""Stop strings, stop token ids and streaming with n > 1 through the real server, each against
the same request without the rule (llada-tiny, the sorting task's 14-token answer)."""

from __future__ import annotations

import json

import httpx

from tests.conftest import GOLDEN, Server

CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["generate"]
SORT = next(c["prompt_ids"] for c in CASES if c.get("task") == "sort" and "prompt_ids" in c)


def _complete(server: Server, **extra: object) -> dict:
    body = {
        "model": "llada-tiny",
        "prompt": SORT,
        "max_tokens": 32,
        "return_token_ids": True,
        "decoding": "reference",
        **extra,
    }
    r = httpx.post(server.url + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_stop_string_cuts_the_answer_before_it(llada_server: Server) -> None:
    whole = _complete(llada_server)["choices"][0]
    text = whole["text"]
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = _complete(llada_server, stop=[stop])["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and len(cut["text"]) < len(text)
    assert cut["finish_reason"] == "stop"


def test_a_stop_token_id_ends_the_answer_there(llada_server: Server) -> None:
    ids = _complete(llada_server)["choices"][0]["token_ids"]
    at = len(ids) // 2
    cut = _complete(llada_server, stop_token_ids=[ids[at]])["choices"][0]
    assert cut["token_ids"] == ids[: ids.index(ids[at])]
    assert cut["finish_reason"] == "stop"


def test_streaming_with_n_gives_each_choice_its_whole_answer(llada_server: Server) -> None:
    sampled = {"temperature": 1.0, "seed": 5, "n": 2}
    whole = [c["text"] for c in _complete(llada_server, **sampled)["choices"]]
    assert whole[0] != whole[1]
    body = {
        "model": "llada-tiny",
        "prompt": SORT,
        "max_tokens": 32,
        "decoding": "reference",
        "stream": True,
        **sampled,
    }
    texts, finished = ["", ""], [None, None]
    with httpx.stream("POST", llada_server.url + "/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["text"]
                finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert texts == whole
    assert all(f in ("stop", "length") for f in finished)
