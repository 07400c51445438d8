"""Request and response bodies (msgspec structs with bounds) and the one error format."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0.0, le=5.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=1_000_000)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
FrequencyPenalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxNewTokens = Annotated[int, Meta(ge=1, le=1_048_576)]


class PredictRequest(Struct, forbid_unknown_fields=True):
    """``{"prompt": "question"}`` or ``{"prompt": [q1, q2, ...]}`` with optional decoding overrides."""

    prompt: str | list[str]
    max_new_tokens: MaxNewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None


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


def validation_field(message: str) -> str | None:
    """The field path in a msgspec error message (``prompt[3]``), if any."""
    match = _PATH.search(message)
    return match.group(1) if match and match.group(1) else None


def decode_predict(body: bytes) -> PredictRequest:
    """Parse a /predict body; msgspec errors name the field and the allowed range."""
    return msgspec.json.decode(body, type=PredictRequest)


def decode_system_prompt(body: bytes) -> SystemPrompt:
    return msgspec.json.decode(body, type=SystemPrompt)
