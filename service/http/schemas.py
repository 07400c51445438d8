"""Request and response bodies (msgspec structs with bounds) and the one error format."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from service.contract.sampling import LIMITS, Overrides, Sampling, problems, sampling_from


class PredictRequest(Overrides, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``{"prompt": "question"}`` or ``{"prompt": [q1, q2, ...]}`` with optional decoding overrides.

    The types are checked by msgspec; the ranges are the engine's, checked by ``check_sampling`` against
    the one table in ``service.contract.sampling``.
    """

    prompt: str | list[str]

    def sampling(self) -> Sampling:
        """The sampling values of this request, as the wire carries them (None: the setting's, or the route's)."""
        return sampling_from(self, lambda row: row.predict)


class ItemError(Struct):
    index: int
    message: str


class PredictResponse(Struct, omit_defaults=True):
    """One answer per question, in order; ``errors`` lists the items that could not be answered."""

    response: str | list[str] | msgspec.Raw  # Raw: the answers already encoded as one JSON array
    errors: list[ItemError] = []


class SystemPrompt(Struct, forbid_unknown_fields=True):
    system_prompt: Annotated[str, Meta(max_length=100_000)]


class Error(Struct):
    """Every error the service returns, 4xx and 5xx alike."""

    error: str  # short kind: bad_request, validation_error, not_found, unauthorized, ...
    detail: str  # what went wrong and what to do
    status_code: int
    field: str | None = None


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def validation_field(message: str) -> str | None:
    """The field path in a msgspec error message (``prompt[3]``; an unknown field's own name), if any."""
    match = _PATH.search(message)
    path = match.group(1) if match and match.group(1) else None
    unknown = _UNKNOWN.search(message)
    if unknown is not None:
        return f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path


def check_sampling(request: Struct, max_model_len: int | None = None) -> None:
    """Refuse a sampling value the engine would reject, for any request body with fields named as in LIMITS.

    Raises ``msgspec.ValidationError`` (a 400 ``validation_error`` whose ``field`` is the parameter and whose
    detail gives the engine's range), the same error msgspec raises for a wrong type.  ``max_model_len``
    (when known) also limits ``max_new_tokens`` to MAX_MODEL_LEN - 1.
    """
    values = {name: getattr(request, name) for name in LIMITS if name in request.__struct_fields__}
    found = problems(values, max_model_len)
    if found:
        raise msgspec.ValidationError(f"{'; '.join(map(str, found))} - at `$.{found[0].field}`")


def decode_predict(body: bytes, max_model_len: int | None = None) -> PredictRequest:
    """Parse a /predict body; errors name the field and, for sampling values, the engine's range."""
    request = msgspec.json.decode(body, type=PredictRequest)
    check_sampling(request, max_model_len)
    return request


def decode_system_prompt(body: bytes) -> SystemPrompt:
    return msgspec.json.decode(body, type=SystemPrompt)
