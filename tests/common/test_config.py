"""Flags beat VDIFF_* environment twins, which beat defaults."""

from __future__ import annotations

import argparse

import pytest

from vdiff_common import config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    config.add(p, "--block-size", default=32, type=int)
    config.add(p, "--gateway", default=["tcp://a:1"], repeat=True)
    config.add(p, "--trust-remote-code", default=False, type=bool)
    return p


def test_default_environment_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parser().parse_args([]).block_size == 32
    monkeypatch.setenv("VDIFF_BLOCK_SIZE", "8")
    assert _parser().parse_args([]).block_size == 8
    assert _parser().parse_args(["--block-size", "4"]).block_size == 4


def test_repeatable_flags_replace_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parser().parse_args([]).gateway == ["tcp://a:1"]
    args = _parser().parse_args(["--gateway", "tcp://b:2", "--gateway", "tcp://c:3"])
    assert args.gateway == ["tcp://b:2", "tcp://c:3"]
    monkeypatch.setenv("VDIFF_GATEWAY", "tcp://d:4,tcp://e:5")
    assert _parser().parse_args([]).gateway == ["tcp://d:4", "tcp://e:5"]


def test_boolean_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDIFF_TRUST_REMOTE_CODE", "true")
    assert _parser().parse_args([]).trust_remote_code is True
    assert _parser().parse_args(["--no-trust-remote-code"]).trust_remote_code is False
