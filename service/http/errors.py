"""One table from exceptions to HTTP status and error kind, and the one error format for all of them.

Every error the service returns, 4xx or 5xx, is ``{"error": kind, "detail": ..., "status_code": n,
"field": ...}`` (``service.http.schemas.Error``).  ``exception_handlers`` gives Litestar one handler per row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from service.contract.errors import TABLE as ENGINE_ERRORS
from service.contract.errors import mapped
from service.http.schemas import Error, validation_field
from service.settings import Settings

log = logging.getLogger("service")
JSON = "application/json"


class ClientError(Exception):
    """A 4xx with our error format."""

    def __init__(self, status: int, kind: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.field = status, kind, detail, field


# (exception, status, kind): the most specific class that matches wins (Litestar looks along the MRO).
# ClientError and HTTPException carry their own status; the engine's exceptions are the contract's table;
# everything else unexpected is a 500.
TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (msgspec.ValidationError, 400, "validation_error"),
    (msgspec.DecodeError, 400, "malformed_json"),
    *((row.exc, row.status, row.kind) for row in ENGINE_ERRORS),
    (Exception, 500, "internal_error"),
)
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def json_response(body: object, status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type=JSON)


def error_response(status: int, kind: str, detail: str, field: str | None = None) -> Response[bytes]:
    return json_response(Error(error=kind, detail=detail, status_code=status, field=field), status)


def _detail(exc: Exception, settings: Settings) -> tuple[str, str | None]:
    """What to tell the client about ``exc`` (and the field it concerns)."""
    if isinstance(exc, msgspec.ValidationError):
        return str(exc), validation_field(str(exc))
    if isinstance(exc, msgspec.DecodeError):
        return f"the body is not valid JSON: {exc}", None
    if (row := mapped(exc)) is not None:
        return f"{exc}{row.hint}", getattr(exc, "param", None)
    return f"{type(exc).__name__}: {exc} (see the server log)", None


def exception_handlers(settings: Settings) -> dict[type[Exception], Callable[[Request, Exception], Response[bytes]]]:
    """Litestar's ``exception_handlers``: one per row of ``TABLE``, plus ClientError and HTTPException."""

    def on_client_error(_: Request, exc: Exception) -> Response[bytes]:
        assert isinstance(exc, ClientError)
        return error_response(exc.status, exc.kind, exc.detail, exc.field)

    def on_http(_: Request, exc: Exception) -> Response[bytes]:
        assert isinstance(exc, HTTPException)
        detail = exc.detail
        if exc.status_code == 413:
            detail = f"the body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes}"
        return error_response(exc.status_code, HTTP_KINDS.get(exc.status_code, "http_error"), detail)

    def handler(status: int, kind: str) -> Callable[[Request, Exception], Response[bytes]]:
        def handle(request: Request, exc: Exception) -> Response[bytes]:
            if kind == "internal_error":
                log.exception("unexpected error on %s %s", request.method, request.url.path)
            elif status >= 500:
                log.warning("%s %s: %d %s: %s", request.method, request.url.path, status, kind, exc)
            detail, field = _detail(exc, settings)
            return error_response(status, kind, detail, field)

        return handle

    handlers = {exc_type: handler(status, kind) for exc_type, status, kind in TABLE}
    handlers[ClientError] = on_client_error
    handlers[HTTPException] = on_http
    return handlers
