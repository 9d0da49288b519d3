"""Deployment files against the CLIs: every flag and VDIFF_* variable they use must exist.

Reads every command in the manifests under deploy/, containers/docker-compose.yaml and the
Dockerfiles' ENTRYPOINT/CMD/ENV, and parses it with the real parser of the program it runs,
with the environment it sets. A renamed or removed flag, a bad choice or a value of the wrong
type fails here instead of in a crash-looping pod.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

import pytest
from deploy_files import (
    COMPOSE,
    COMPOSE_ENV,
    Invocation,
    dockerfiles,
    invocations,
    manifest_files,
    rel,
)

from vdiff_api import cli as gateway_cli
from vdiff_api import launcher
from vdiff_common import config
from vdiff_worker import cli as worker_cli

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "vdiff-api": gateway_cli.build_parser,
    "vdiff-worker": worker_cli.build_parser,
    "vdiff": lambda: launcher.build_parser()[0],
}
# Programs the deployment files run that are not vdiff's own.
OTHER_PROGRAMS = {"hf"}
ALL = invocations()
OURS = [inv for inv in ALL if inv.program in PARSERS]
_VDIFF_VAR = re.compile(r"\bVDIFF_[A-Z0-9_]+\b")


def env_twins(parser: argparse.ArgumentParser) -> dict[str, str]:
    """VDIFF_* variable -> the flag it sets (each flag's first long option is its twin)."""
    twins = {}
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--"):
            twins[config.env_name(action.option_strings[0])] = action.option_strings[0]
    return twins


def test_every_shape_is_read() -> None:
    """Guards the reader itself: each deployment shape yields both tiers' commands."""
    where = {(inv.where.split(":")[0], inv.program) for inv in OURS}
    for path, programs in {
        "containers/Dockerfile.gateway": {"vdiff-api"},
        "containers/Dockerfile.worker": {"vdiff-worker"},
        rel(COMPOSE): {"vdiff-api", "vdiff-worker"},
        "deploy/kubernetes/gateway.yaml": {"vdiff-api"},
        "deploy/kubernetes/worker.yaml": {"vdiff-worker"},
        "deploy/kubernetes/kserve/servingruntime.yaml": {"vdiff-api", "vdiff-worker"},
    }.items():
        assert {(path, p) for p in programs} <= where, path


def test_every_container_runs_a_known_program() -> None:
    unknown = [
        f"{inv.where}: {inv.program}"
        for inv in ALL
        if inv.program not in PARSERS and inv.program not in OTHER_PROGRAMS
    ]
    assert not unknown, f"runs a program this test cannot check: {unknown}"


@pytest.mark.parametrize("inv", OURS, ids=[inv.where for inv in OURS])
def test_flags_and_environment_parse(inv: Invocation, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VDIFF_"):
            monkeypatch.delenv(name)
    twins = env_twins(PARSERS[inv.program]())
    unknown_env = sorted(n for n in inv.env if n.startswith("VDIFF_") and n not in twins)
    assert not unknown_env, f"{inv.where}: no {inv.program} flag reads {unknown_env}"
    for name, value in inv.env.items():
        if name.startswith("VDIFF_") and value is not None:
            monkeypatch.setenv(name, value)

    try:
        parser = PARSERS[inv.program]()  # reads the environment: a bad value raises here
    except ValueError as err:
        pytest.fail(f"{inv.where}: a VDIFF_* value does not convert: {err}")
    flags = config.flags_of(parser)
    unknown = sorted({a.split("=", 1)[0] for a in inv.args if a.startswith("--")} - flags)
    assert not unknown, f"{inv.where}: {inv.program} has no {unknown}"
    try:
        args = parser.parse_args(inv.args)
    except SystemExit as exc:
        pytest.fail(f"{inv.where}: {inv.program} {' '.join(inv.args)} does not parse ({exc})")
    for action in parser._actions:  # values from the environment skip argparse's choices
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None:
            assert value in action.choices, f"{inv.where}: {action.dest}={value!r}"


def test_every_vdiff_variable_named_anywhere_is_a_flag() -> None:
    """Comments, probes, Secrets: any VDIFF_* in the deployment files is some flag's twin."""
    known = set().union(*(env_twins(build()) for build in PARSERS.values()))
    files = [*manifest_files(), *dockerfiles(), COMPOSE, COMPOSE_ENV]
    named = {
        (rel(path), var)
        for path in files
        for var in _VDIFF_VAR.findall(path.read_text(encoding="utf-8"))
    }
    assert named, "the deployment files name no VDIFF_* variable: is the reader broken?"
    stale = sorted(f"{path}: {var}" for path, var in named if var not in known)
    assert not stale, f"no flag has these environment twins: {stale}"
