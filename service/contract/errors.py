"""The exceptions an engine call can end with, and the one table that maps each to its wire frame and to HTTP.

A call that fails in the worker ends with a frame (``reply_for``), which the API process raises again as the same
exception (``raised_by``); the HTTP side answers each with the status and the error kinds of its row here (
``service.http.errors`` for ``/predict``'s shape, ``service.http.v1.routes`` for OpenAI's).  No engine and no web
imports: both processes use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.contract import wire


class EngineUnavailable(RuntimeError):
    """The chosen backend cannot be imported or started; the message says why and what to do."""


class EngineDead(RuntimeError):
    """The engine stopped working while serving; requests get HTTP 503."""


class EngineCallFailed(RuntimeError):
    """One call to the engine raised (in the worker) while the engine itself is fine; the request gets HTTP 500.

    ``kind`` is the exception's class name in the worker, where its traceback is logged.
    """

    def __init__(self, message: str, kind: str = "RuntimeError"):
        super().__init__(message)
        self.kind = kind


class EngineRejected(ValueError):
    """The engine refused a call before doing any work (a prompt longer than the context, a value it rejects):
    the request gets HTTP 400 naming ``param``; ``code`` is OpenAI's (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True, slots=True)
class Mapped:
    """How one exception leaves a call: its HTTP status, ``/predict``'s error kind, OpenAI's type and code."""

    exc: type[Exception]
    status: int
    kind: str
    v1_type: str
    v1_code: str | None
    hint: str = ""  # added to the message a client sees


TABLE: tuple[Mapped, ...] = (
    Mapped(EngineDead, 503, "unavailable", "server_error", "engine_unavailable"),  # gone or restarting
    Mapped(EngineUnavailable, 503, "unavailable", "server_error", "engine_unavailable"),
    Mapped(EngineRejected, 400, "invalid_request", "invalid_request_error", None),  # refused before any work
    Mapped(EngineCallFailed, 500, "engine_error", "server_error", "engine_error",  # the engine keeps serving
           " (the engine worker's log has the traceback; other requests are not affected)"),
)


def mapped(exc: BaseException) -> Mapped | None:
    """The row of ``exc``'s most specific class in TABLE (None: not an engine call's exception)."""
    for cls in type(exc).__mro__:
        for row in TABLE:
            if row.exc is cls:
                return row
    return None


def reply_for(call_id: int, exc: Exception) -> wire.Message:
    """The worker's frame for a call that raised ``exc`` (anything unexpected: ``Error``, HTTP 500)."""
    if isinstance(exc, EngineDead):
        return wire.Dead(call_id, str(exc))
    if isinstance(exc, EngineRejected):
        return wire.Invalid(call_id, str(exc), exc.param, exc.code)
    return wire.Error(call_id, f"{type(exc).__name__}: {exc}", type(exc).__name__)


def raised_by(reply: object) -> Exception | None:
    """The exception an error frame stands for in the API process (None: ``reply`` is a result)."""
    if isinstance(reply, wire.Invalid):
        return EngineRejected(reply.message, reply.param, reply.code)
    if isinstance(reply, wire.Dead):
        return EngineDead(reply.message)
    if isinstance(reply, wire.Error):
        return EngineCallFailed(reply.message, reply.kind)
    return None
