"""Logging of both processes: the ``[service]`` line format, and how loud a request's stage timings are."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    """``[service]``-prefixed lines on stderr (uvicorn keeps its own loggers); ``trace`` is DEBUG."""
    logging.basicConfig(level=level.upper() if level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s [service] %(message)s", stream=sys.stderr)


def timing_level(questions: int) -> int:
    """Log level of a request's stage timings: INFO for a batch (64 questions or more), else DEBUG."""
    return logging.INFO if questions >= 64 else logging.DEBUG
