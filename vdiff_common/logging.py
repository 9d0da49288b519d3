"""Loguru set-up shared by both tiers: text or JSON lines, with the standard library's
logging (hypercorn, transformers, warnings) routed through it so JSON stays JSON."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno

        def rename(r: Record) -> None:
            r["name"] = record.name

        logger.patch(rename).opt(exception=record.exc_info).log(level, record.getMessage())


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
    logging.basicConfig(handlers=[_ToLoguru()], level=logger.level(level.upper()).no, force=True)
    logging.captureWarnings(True)
