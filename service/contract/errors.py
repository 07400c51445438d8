"""The exceptions an engine call can end with, raised in either process (the worker's are carried back by
``wire`` frames and raised again in the API process)."""

from __future__ import annotations


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
