"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

The same engine workers as ``/predict`` answer them (``EngineClient.generate``): concurrent ``/v1`` and
``/predict`` requests batch together in the engine, under the same BATCH_CONCURRENCY.  Errors have OpenAI's
shape (``schemas.V1Error``; the table below maps the engine's exceptions).  With API_KEY set every ``/v1``
route needs ``Authorization: Bearer <key>``.  A client that goes away (or stops reading a stream) cancels its
call: its prompts are aborted in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream

from service.contract import wire
from service.contract.errors import TABLE as ENGINE_ERRORS
from service.contract.errors import mapped
from service.http.errors import JSON, TABLE
from service.http.routes import CLIENT_CLOSED, ClientGone, QAState, unless_disconnected
from service.http.v1.render import DONE, ChatShape, CompletionShape, Shape, sse
from service.http.v1.schemas import ChatRequest, CompletionRequest, V1Error, bad, decode

log = logging.getLogger("service")
SERVED_BY = "qa-serve"
APP_ERRORS = tuple(cls for cls, _, _ in TABLE)


def to_v1_error(exc: Exception, settings_max_body: int = 0) -> V1Error:
    """The one table from an exception to OpenAI's error shape and status."""
    if isinstance(exc, V1Error):
        return exc
    if (row := mapped(exc)) is not None:  # the engine's exceptions: the contract's table
        return V1Error(row.status, f"{exc}{row.hint}", row.v1_type, getattr(exc, "param", None),
                       getattr(exc, "code", None) or row.v1_code)
    if isinstance(exc, HTTPException):
        if exc.status_code == 413:
            return V1Error(413, f"the body is larger than MAX_REQUEST_BYTES={settings_max_body}",
                           "invalid_request_error", None, "body_too_large")
        return V1Error(exc.status_code, str(exc.detail), "invalid_request_error")
    log.exception("unexpected error in the OpenAI-compatible API", exc_info=exc)
    return V1Error(500, f"{type(exc).__name__}: {exc} (see the server log)", "server_error")


def v1_router(state: QAState) -> Router:
    """The ``/v1`` routes of one app, with their key check and their error table."""
    settings, engine, pool, metrics = state.settings, state.engine, state.pool, state.metrics
    model_id = settings.served_model_name or settings.model_id
    created = int(time.time())

    def respond(exc: Exception) -> Response[bytes]:
        error = to_v1_error(exc, settings.max_request_bytes)
        if error.status >= 500:
            log.warning("/v1: %d %s", error.status, error.message)
        return Response(msgspec.json.encode(error.body()), status_code=error.status, media_type=JSON)

    def require_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not settings.api_key:
            return
        given = connection.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise V1Error(401, "a valid API key is needed: `Authorization: Bearer <API_KEY>`",
                          "authentication_error", None, "invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise V1Error(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                          "not_found_error", "model", "model_not_found")
        pool.require_serving()

    def count(result: wire.Generated) -> None:
        metrics.questions.inc(len(result.choices))
        metrics.tokens.labels("openai").inc(result.completion_tokens)

    @get("/models", sync_to_thread=False)
    def models() -> Response[bytes]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": SERVED_BY,
                "root": str(settings.model_dir), "parent": None, "max_model_len": engine.max_model_len}
        return Response(msgspec.json.encode({"object": "list", "data": [card]}), media_type=JSON)

    async def run(request: Request, shape: Shape, call: dict[str, Any], streaming: bool,
                  include_usage: bool) -> Response[bytes] | Stream:
        def make(id_: int) -> wire.Generate:
            return wire.Generate(id=id_, stream=streaming, **call)

        if not streaming:
            try:
                result = await unless_disconnected(request, engine.generate(make))
            except ClientGone:
                log.warning("%s: the client went away; its prompts were cancelled", request.url.path)
                return Response(b"", status_code=CLIENT_CLOSED)
            count(result)
            return Response(msgspec.json.encode(shape.response(result)), status_code=200, media_type=JSON)
        queue: asyncio.Queue[list[wire.Piece] | None] = asyncio.Queue()
        task = asyncio.ensure_future(engine.generate(make, queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: the worker sends them first
        try:  # wait for the first piece, so that a call refused before any work still gets its 4xx status
            first = await unless_disconnected(request, queue.get())
        except ClientGone:
            task.cancel()
            return Response(b"", status_code=CLIENT_CLOSED)
        if first is None:
            task.result()  # raises the call's error
        return Stream(_events(shape, queue, task, first, include_usage, count), media_type="text/event-stream",
                      status_code=200, headers={"Cache-Control": "no-cache"})

    @post("/completions")
    async def completions(request: Request) -> Response[bytes] | Stream:
        req: CompletionRequest = decode(await request.body(), CompletionRequest)
        prompts = req.prompts()
        if len(prompts) > settings.max_batch_questions:
            raise bad("prompt", f"{len(prompts)} prompts; at most {settings.max_batch_questions} (MAX_BATCH_QUESTIONS)")
        check_model(req.model)
        echo_logprobs = req.logprobs if req.echo else None
        call = {"prompts": prompts, "sampling": req.sampling(req.max_tokens, req.logprobs, echo_logprobs),
                "echo": bool(req.echo)}
        return await run(request, CompletionShape(model_id), call, bool(req.stream), req.include_usage)

    @post("/chat/completions")
    async def chat(request: Request) -> Response[bytes] | Stream:
        req: ChatRequest = decode(await request.body(), ChatRequest)
        messages = req.conversation()
        check_model(req.model)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        call = {"messages": messages, "template_kwargs": req.chat_template_kwargs,
                "sampling": req.sampling(req.budget(), logprobs)}
        return await run(request, ChatShape(model_id), call, bool(req.stream), req.include_usage)

    # Litestar picks the most specific class over the app's and the router's tables together: every class of
    # the app's table (service.http.errors) is named here too, so that /v1 errors keep OpenAI's shape.
    handlers: dict[Any, Callable[[Request, Exception], Response[bytes]]] = {
        cls: lambda _, exc: respond(exc) for cls in (*APP_ERRORS, V1Error, HTTPException)}
    return Router("/v1", route_handlers=[models, completions, chat], guards=[require_key],
                  exception_handlers=handlers)


async def _events(shape: Shape, queue: asyncio.Queue[list[wire.Piece] | None], task: asyncio.Future[Any],
                  first: list[wire.Piece], include_usage: bool,
                  count: Callable[[wire.Generated], None]) -> AsyncIterator[bytes]:
    """The stream's events; an error after the first event becomes an error event, then ``[DONE]``."""
    started = time.perf_counter()
    try:
        for event in shape.opening():
            yield event
        pieces: list[wire.Piece] | None = first
        while pieces is not None:
            for event in shape.chunks(pieces):
                yield event
            pieces = await queue.get()  # None once the call has ended
        result: wire.Generated = task.result()
        for event in shape.closing():
            yield event
        if include_usage:
            yield shape.usage_chunk(result)
        count(result)
        log.debug("%s streamed in %.3f s", shape.id, time.perf_counter() - started)
    except tuple(row.exc for row in ENGINE_ERRORS) as exc:
        yield sse(to_v1_error(exc).body())
    finally:
        if not task.done():  # the client went away: the call is cancelled in the worker
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    yield DONE
