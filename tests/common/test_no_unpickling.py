"""Nothing that crosses a socket or comes from a checkpoint is unpickled anywhere in vdiff."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(
    r"\b(pickle|cPickle|dill|marshal|shelve)\b|recv_pyobj|send_pyobj|"
    r"torch\.load\(|pd\.read_pickle|(?<![.\w])eval\(|\bexec\("
)


def test_no_unpickling_or_eval_in_the_code() -> None:
    sources = [
        p
        for pkg in ("vdiff_api", "vdiff_common", "vdiff_worker", "bench")
        for p in (ROOT / pkg).rglob("*.py")
    ]
    assert len(sources) > 20
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert hits == []


def test_the_scan_catches_what_it_looks_for() -> None:
    for line in ("import pickle", "sock.recv_pyobj()", "x = torch.load(f)", "eval(text)"):
        assert FORBIDDEN.search(line)
    assert not FORBIDDEN.search("model.eval()")
