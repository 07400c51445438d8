"""Parsers of the settings' variables: each takes the raw string and returns the value or raises
``ValueError("allowed: ...")`` naming what is allowed (``service.settings`` reports them all at once).

Pure functions, no environment access: ``service.settings.Settings.from_environ`` is the only reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from env import resolve_path
from env.values import parse_bool as _bool  # the project's one true/false parser: strict, empty is not allowed


def _optional_bool(raw: str) -> bool | None:
    return None if raw.strip() == "" else _bool(raw)


def _switch_or_auto(raw: str) -> str:
    """``auto``, or a switch in any spelling of env/values.py, kept as ``true``/``false`` (USE_VLLM)."""
    try:
        return "auto" if raw.strip().lower() == "auto" else "true" if _bool(raw) else "false"
    except ValueError:
        raise ValueError("allowed: true, false, auto (or 1/0, yes/no, on/off)") from None


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable[[str], int | None]:
    def parse(raw: str) -> int | None:
        if optional and raw.strip() == "":
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"allowed: an integer{_range(lo, hi)}{' or empty' if optional else ''}") from None
        _check(value, lo, hi, optional)
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"allowed: a number{_range(lo, hi, lo_open)}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and value > hi
        ):
            raise ValueError(f"allowed: a number{_range(lo, hi, lo_open)}")
        return value

    return parse


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _check(value: float, lo: float | None, hi: float | None, optional: bool = False) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"allowed: an integer{_range(lo, hi)}{' or empty' if optional else ''}")


def _choice(*choices: str, optional: bool = False) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        value = raw.strip().lower()
        if optional and value == "":
            return None
        if value not in choices:
            raise ValueError(f"allowed: {', '.join(choices)}{' or empty' if optional else ''}")
        return value

    return parse


def _sizes(raw: str) -> tuple[int, ...] | None:
    """Comma-separated batch sizes, e.g. ``1,2,4,8,256,2048`` (empty: None)."""
    allowed = "allowed: comma-separated integers >= 1 (e.g. 1,2,4,8,512,2048) or empty"
    parts = _list(raw)
    if not parts:
        return None
    try:
        sizes = tuple(sorted({int(x) for x in parts}))
    except ValueError:
        raise ValueError(allowed) from None
    if sizes[0] < 1:
        raise ValueError(allowed)
    return sizes


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _optional_bytes(raw: str) -> int | None:
    """A byte count: ``12884901888``, ``12GiB``, ``12G`` (empty: None)."""
    text = raw.strip().lower().removesuffix("b")
    if text == "":
        return None
    number = text.rstrip("kmgi")
    try:
        value = int(float(number) * _UNITS[text[len(number):]])
    except (KeyError, ValueError):
        raise ValueError("allowed: bytes as an integer or with a unit (e.g. 12GiB, 8G) or empty") from None
    if value <= 0:
        raise ValueError("allowed: more than 0 bytes, or empty")
    return value


def _text(raw: str) -> str:
    return raw


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item for item in (part.strip() for part in raw.split(",")) if item)


def _stop_list(raw: str) -> tuple[str, ...]:
    # Stop strings are kept verbatim apart from surrounding spaces; "\n" escapes are understood.
    return tuple(item.replace("\\n", "\n") for item in (part.strip() for part in raw.split(",")) if item)


def _path(raw: str) -> Path:
    if raw.strip() == "":
        raise ValueError("allowed: a path (relative paths are relative to the project root)")
    return resolve_path(raw.strip())


def _optional_path(raw: str) -> Path | None:
    return resolve_path(raw.strip()) if raw.strip() else None


def _level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"critical", "error", "warning", "info", "debug", "trace"}:
        raise ValueError("allowed: critical, error, warning, info, debug, trace")
    return value
