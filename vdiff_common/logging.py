"""Loguru set-up shared by both tiers: text or JSON lines."""

from __future__ import annotations

import sys

from loguru import logger


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level.upper(), serialize=True)
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {name}: {message}",
        )
