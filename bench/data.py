"""Question/reference files for ``inv bench`` and ``inv eval``.

``load_pairs(path, n, offset)`` returns ``(question, reference)`` pairs (reference ``None`` when the file
has none) from:

- ``.jsonl``: one JSON object a line, either ``{"messages": [{"role": "user", ...}, {"role": "assistant",
  ...}]}`` (the first user turn is the question, the first assistant turn after it the reference) or flat
  keys: the question under ``prompt``/``question``/``instruction``, the reference under
  ``answer``/``response``/``reference``.  Blank lines are skipped.
- ``.json``: a list of such objects.
- ``.docx``: paragraphs ``问题：…`` and ``答案：…`` (ASCII ``:`` too, an optional ``1.`` or ``问题1`` number);
  paragraphs after a ``答案`` paragraph continue the answer (joined with newlines) until the next ``问题``,
  paragraphs between ``问题`` and ``答案`` continue the question; paragraphs before the first ``问题`` (a
  title) are ignored.

Unreadable input raises ``DataError`` (a ``ValueError``) naming the file and the line (the paragraph for
``.docx``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

QUESTION_KEYS = ("prompt", "question", "instruction")
REFERENCE_KEYS = ("answer", "response", "reference")

_DOCX_QUESTION = re.compile(r"^\s*(?:\d+\s*[.、)）]\s*)?问题\s*\d*\s*[:：]\s*")
_DOCX_ANSWER = re.compile(r"^\s*(?:\d+\s*[.、)）]\s*)?答案\s*\d*\s*[:：]\s*")


class DataError(ValueError):
    """A question file that cannot be read; the message names the file and the line."""


def load_pairs(path: Path | str, n: int | None = None, offset: int = 0) -> list[tuple[str, str | None]]:
    """Up to ``n`` (all when ``None``) ``(question, reference)`` pairs, skipping the first ``offset``."""
    path = Path(path)
    if offset < 0 or (n is not None and n < 0):
        raise DataError(f"{path}: n and offset must be >= 0 (got n={n}, offset={offset})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_pairs, ".json": _json_pairs, ".docx": _docx_pairs}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}: use .jsonl, .json or .docx")
    stop = None if n is None else offset + n
    return list(islice(readers[suffix](path), offset, stop))


def pair_of(record: Any, where: str) -> tuple[str, str | None]:
    """The ``(question, reference)`` of one JSON record; ``where`` (``file:line``) goes into errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _messages_pair(record["messages"], where)
    question = _first_text(record, QUESTION_KEYS, where)
    if question is None:
        raise DataError(f"{where}: no question: expected `messages` or one of {', '.join(QUESTION_KEYS)}")
    return question, _first_text(record, REFERENCE_KEYS, where)


def _first_text(record: dict[str, Any], keys: tuple[str, ...], where: str) -> str | None:
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
            return value
    return None


def _messages_pair(messages: Any, where: str) -> tuple[str, str | None]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: `messages` must be a list of {{role, content}} objects")
    question: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with a string `content`")
        role = message.get("role")
        if question is None and role == "user":
            question = message["content"]
        elif question is not None and role == "assistant":
            return question, message["content"]
    if question is None:
        raise DataError(f"{where}: `messages` has no user turn")
    return question, None


def _checked(pair: tuple[str, str | None], where: str) -> tuple[str, str | None]:
    if not pair[0].strip():
        raise DataError(f"{where}: the question is empty")
    return pair


def _jsonl_pairs(path: Path) -> Iterator[tuple[str, str | None]]:
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                yield _checked(pair_of(record, where), where)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a line)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _json_pairs(path: Path) -> Iterator[tuple[str, str | None]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for i, record in enumerate(records):
        where = f"{path}: item {i}"
        yield _checked(pair_of(record, where), where)


def _docx_paragraphs(path: Path) -> list[str]:
    try:
        import docx  # python-docx
    except ImportError:
        raise DataError(f"{path}: reading .docx needs python-docx (pip install python-docx)") from None
    try:
        document = docx.Document(str(path))
    except Exception as exc:  # python-docx raises zipfile, lxml and KeyError errors alike
        raise DataError(f"{path}: not a readable .docx file ({type(exc).__name__}: {exc})") from None
    return [p.text for p in document.paragraphs]


def _docx_pairs(path: Path) -> Iterator[tuple[str, str | None]]:
    question: list[str] | None = None
    answer: list[str] | None = None
    start = 0
    found = False

    def finish() -> tuple[str, str | None]:
        assert question is not None
        text = "\n".join(question).strip()
        where = f"{path}: paragraph {start}"
        return _checked((text, None if answer is None else "\n".join(answer).strip()), where)

    for number, text in enumerate(_docx_paragraphs(path), 1):
        if q := _DOCX_QUESTION.match(text):
            if question is not None:
                yield finish()
            question, answer, start, found = [text[q.end():]], None, number, True
        elif a := _DOCX_ANSWER.match(text):
            if question is None:
                raise DataError(f"{path}: paragraph {number}: 答案 before any 问题")
            if answer is not None:
                raise DataError(f"{path}: paragraph {number}: a second 答案 for the 问题 of paragraph {start}")
            answer = [text[a.end():]]
        elif question is not None and text.strip():
            (question if answer is None else answer).append(text)
    if question is not None:
        yield finish()
    if not found:
        raise DataError(f"{path}: no `问题：` paragraphs (expected 问题：… / 答案：… paragraphs)")
