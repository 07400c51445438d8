"""Warmup questions from ``WARMUP_DATA_PATH``: jsonl or json, several record shapes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("service")

KEYS = ("prompt", "question", "instruction")


def question_of(record: Any) -> str | None:
    """The question in one record: a string, ``messages`` (first user turn) or prompt/question/instruction."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
    for key in KEYS:
        if isinstance(record.get(key), str):
            return record[key]
    return None


def _records(path: Path) -> Iterator[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
        yield from data
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            log.warning("warmup: %s:%d is not JSON (%s); skipped", path, number, exc.msg)


def load_questions(path: Path | None, limit: int) -> list[str]:
    """Up to ``limit`` questions from ``path``; a missing file gives none (not an error)."""
    if path is None or limit <= 0:
        return []
    if not path.is_file():
        log.info("warmup: %s not found, no dataset warmup", path)
        return []
    questions: list[str] = []
    try:
        for record in _records(path):
            question = question_of(record)
            if question:
                questions.append(question)
                if len(questions) >= limit:
                    break
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("warmup: cannot read %s (%s); no dataset warmup", path, exc)
        return []
    return questions
