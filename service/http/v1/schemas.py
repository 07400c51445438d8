"""Request bodies of the OpenAI-compatible API, their checks, and the one error shape.

Types are checked by msgspec (an unknown field is refused, naming it); ranges come from the same table as
``/predict``'s (``service.contract.sampling``), so a value the engine would reject is refused here with a 400
naming the parameter.  What the service does not do is refused the same way (``n`` > 1, ``logit_bias``,
``suffix``, tools, non-text message parts, ``echo`` with ``stream``), never ignored.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from msgspec import Struct

from service.contract.sampling import INT64_MAX, LIMITS, V1_LIMITS, Knobs, Sampling, sampling_from

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
ROLES = ("system", "developer", "user", "assistant")


class V1Error(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> V1Error:
    """A 400 ``invalid_request_error`` about ``param``."""
    return V1Error(400, message, "invalid_request_error", param, code)


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Common(Knobs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters both endpoints take: the sampling knobs (vLLM's extensions included) and these."""

    model: str | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    def check(self) -> None:
        """Refuse what the engine would reject or the service does not do; the first problem, named."""
        for name, limit in V1_LIMITS.items():
            value = getattr(self, name)
            if value is not None and not limit.contains(value):
                raise bad(name, f"{name}={value!r}: allowed {limit.allowed()}")
        if self.n not in (None, 1):
            raise bad("n", f"n={self.n}: only one completion per prompt is supported (n=1)")
        if self.logit_bias:
            raise bad("logit_bias", "logit_bias is not supported")
        if any(not s for s in self.stops()):
            raise bad("stop", "stop strings must not be empty")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"min_tokens={self.min_tokens} is more than max_tokens={self.max_tokens}")
        if self.stream_options is not None and not self.stream:
            raise bad("stream_options", "stream_options is only allowed with stream=true")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> Sampling:
        return sampling_from(self, lambda row: row.v1, max_tokens=max_tokens, stop=self.stops(), logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _logprobs_count(name: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad(name, f"{name}={value}: allowed an integer in [0, {MAX_LOGPROBS}]")
    return value


class CompletionRequest(_Common, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or lists of token ids."""

    prompt: str | list[Any]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids; a 400 naming the bad item."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad("prompt", "prompt is an empty list: send at least one prompt")
        if all(_is_token(x) for x in p):
            return [list(p)]
        out: list[str | list[int]] = []
        for index, item in enumerate(p):
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list) and item and all(_is_token(x) for x in item):
                out.append(list(item))
            else:
                raise bad("prompt", f"prompt[{index}] must be a string or a non-empty list of token ids "
                                    f"(integers >= 0), not {type(item).__name__}")
        return out

    def check(self) -> None:
        super().check()
        _logprobs_count("logprobs", self.logprobs)
        if self.best_of not in (None, 1):
            raise bad("best_of", f"best_of={self.best_of}: only best_of=1 is supported")
        if self.suffix:
            raise bad("suffix", "suffix is not supported")
        if self.echo and self.stream:
            raise bad("echo", "echo is not supported with stream=true")


class TextPart(Struct, forbid_unknown_fields=True):
    type: str
    text: str = ""


class Message(Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chat/completions``: ``messages`` through the model's chat template."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them; a 400 naming the bad message."""
        if not self.messages:
            raise bad("messages", "messages is empty: send at least one message")
        out = []
        for index, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise bad(f"messages[{index}].role", f"role {m.role!r} is not supported: allowed {', '.join(ROLES)}")
            parts = [m.content] if isinstance(m.content, str) else m.content or []
            for part in parts:
                if not isinstance(part, str) and part.type != "text":
                    raise bad(f"messages[{index}].content", f"content parts of type {part.type!r} are not "
                                                           "supported: text only")
            text = "".join(p if isinstance(p, str) else p.text for p in parts)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        if self.max_completion_tokens is not None and not LIMITS["max_new_tokens"].contains(self.max_completion_tokens):
            raise bad("max_completion_tokens", f"max_completion_tokens={self.max_completion_tokens}: allowed "
                                               f"{LIMITS['max_new_tokens'].allowed()}")
        super().check()
        _logprobs_count("top_logprobs", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs=true")


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX


def decode(body: bytes, kind: type[Struct]) -> Any:
    """A checked request of ``kind``, or V1Error (400) naming the parameter."""
    if not body.strip():
        raise bad(None, "the body is empty: send a JSON object")
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        from service.http.schemas import validation_field

        raise bad(validation_field(str(exc)), str(exc)) from None
    except msgspec.DecodeError as exc:
        raise bad(None, f"the body is not valid JSON: {exc}") from None
    request.check()
    return request


def finite(x: float | None) -> float | None:
    """A log probability as JSON can carry it (-inf becomes the most negative float)."""
    if x is None or math.isfinite(x):
        return x
    return -9999.0 if x < 0 else 9999.0
