"""CLI flags with VDIFF_* environment twins: flag beats environment beats default."""

from __future__ import annotations

import argparse
import os
from typing import Any


def env_name(flag: str) -> str:
    return "VDIFF_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


class _Replace(argparse.Action):
    """Repeatable flag whose first use replaces the default list instead of appending to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        if current is self.default or current is None:
            current = []
        setattr(namespace, self.dest, [*current, values])


def add(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    *,
    default: Any = None,
    type: Any = str,
    help: str = "",
    choices: list[str] | None = None,
    repeat: bool = False,
    aliases: tuple[str, ...] = (),
) -> None:
    """Add `flag` whose default comes from its environment twin when that is set."""
    env = os.environ.get(env_name(flag))
    help_text = f"{help} [env {env_name(flag)}]"
    if type is bool:
        value = _parse_bool(env) if env is not None else default
        parser.add_argument(
            flag, *aliases, default=value, action=argparse.BooleanOptionalAction, help=help_text
        )
        return
    if repeat:
        value = [type(v) for v in env.split(",") if v] if env is not None else default
        parser.add_argument(
            flag, *aliases, default=value, type=type, action=_Replace, help=help_text
        )
        return
    value = type(env) if env is not None else default
    parser.add_argument(flag, *aliases, default=value, type=type, help=help_text, choices=choices)


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a parser accepts (used by drift checks of manifests)."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
    return out
