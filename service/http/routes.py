"""The HTTP routes (README "HTTP protocol") over one app's state: the settings, the engine, its pool, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from service.contract.sampling import Sampling
from service.http.errors import ClientError, error_response, json_response
from service.http.metrics import CONTENT_TYPE, Metrics
from service.http.schemas import ItemError, PredictResponse, SystemPrompt, decode_predict, decode_system_prompt
from service.logs import timing_level
from service.pipeline.routing import Routed, Router, route_all
from service.pool.client import EngineClient
from service.pool.lifecycle import Pool
from service.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": the answer was abandoned (nobody reads this status)


@dataclass
class QAState:
    """Everything one app instance owns (no module-global state)."""

    settings: Settings
    engine: EngineClient
    metrics: Metrics
    pool: Pool
    router: Router

    def routed(self, questions: list[str], sampling: Sampling) -> Routed:
        """Each question's route and budget, decided here once for the whole call (the workers follow them)."""
        return route_all(self.settings, self.router, questions, sampling.max_tokens)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; its work was cancelled."""


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _questions(prompt: str | list[str], limit: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ClientError(400, "validation_error", "`prompt` is an empty list: send at least one question", "prompt")
    if len(prompt) > limit:
        raise ClientError(413, "too_many_questions",
                          f"`prompt` has {len(prompt)} questions; at most {limit} (MAX_BATCH_QUESTIONS)", "prompt")
    return prompt


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away.

    Called after the whole body was read, so the only message left is ``http.disconnect``: uvicorn sends it
    when the connection closes (or once the response is complete).  Neither uvicorn nor Litestar cancels a
    handler whose client left, so ``/predict`` races its answer against this.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelling it (and with it the engine's questions) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():  # the client left, or this handler was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


def routes(state: QAState) -> list[HTTPRouteHandler]:
    """The route handlers of one app."""
    settings, engine, pool = state.settings, state.engine, state.pool

    @get("/", sync_to_thread=False)
    def health() -> Response[bytes]:
        status, body = pool.health()
        return json_response(body, status)

    @get("/health/live", sync_to_thread=False)
    def live() -> Response[bytes]:
        return json_response({"status": "alive"})

    @get("/health/ready", sync_to_thread=False)
    def ready() -> Response[bytes]:
        status, body = pool.health()
        return json_response(body, 200 if pool.serving() and status == 200 else 503)

    @post("/predict")
    async def predict(request: Request) -> Response[bytes]:
        received = time.perf_counter()
        body = await request.body()
        if not body.strip():
            raise ClientError(400, "empty_body", 'the body is empty: send {"prompt": "question"} or a list')
        req = decode_predict(body, engine.max_model_len)  # the engine's ranges, max_new_tokens < context
        questions = _questions(req.prompt, settings.max_batch_questions)
        pool.require_serving()
        sampling = req.sampling()
        started = time.perf_counter()
        try:
            result = await unless_disconnected(request, engine.answer(questions, sampling, state.routed(questions, sampling)))
        except ClientGone:
            log.warning("/predict: the client went away after %.1f s; its %d questions were cancelled",
                        time.perf_counter() - started, len(questions))
            return error_response(CLIENT_CLOSED, "client_closed", "the client went away; its questions were cancelled")
        m = state.metrics
        m.latency.observe(time.perf_counter() - started)
        m.batch.observe(len(questions))
        m.questions.inc(len(questions))
        for route, count in result.tokens_by_route.items():
            m.tokens.labels(route).inc(count)
        m.item_errors.inc(len(result.errors))
        errors = [ItemError(i, message) for i, message in result.errors]
        if isinstance(req.prompt, str):
            if errors:
                raise ClientError(400, "item_error", errors[0].message, "prompt")
            return json_response(PredictResponse(result.texts()[0]))
        answered = time.perf_counter()
        response = json_response(PredictResponse(msgspec.Raw(result.texts_json), errors))
        log.log(timing_level(len(questions)),
                "/predict %d questions: body and checks %.3f s, engine %.3f s, response %.3f s (%d bytes)",
                len(questions), started - received, answered - started, time.perf_counter() - answered,
                len(response.content))
        return response

    @get("/info", sync_to_thread=False)
    def info() -> Response[bytes]:
        _, body = pool.health()
        workers: list[dict[str, Any]] = [{"label": w.label, "state": w.state, "pid": w.pid,
                                          "incident": pool.incident_of(w)} for w in pool.workers]
        return json_response({
            "backend": engine.name,
            "notice": engine.notice,
            "status": body["status"],
            "degraded": pool.degraded(),
            "workers": workers,
            "restarts": pool.restarts,
            "incidents": pool.incidents.public(),
            "model_dir": str(settings.model_dir),
            "max_model_len": engine.max_model_len,
            "ready_after_s": pool.ready_after,
            "engine_init_s": engine.init_seconds,
            "chat_format": engine.chat_format,
            "settings": settings.public(),
            "layout": settings.layout_info(),
        })

    @get("/system_prompt", sync_to_thread=False)
    def read_system_prompt() -> Response[bytes]:
        return json_response(SystemPrompt(engine.system_prompt or settings.load_system_prompt()))

    @post("/system_prompt")
    async def write_system_prompt(request: Request) -> Response[bytes]:
        token = settings.admin_token
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.headers.get("x-admin-token", "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                raise ClientError(401, "unauthorized",
                                  "writing the system prompt needs the admin token: `Authorization: Bearer <ADMIN_TOKEN>`")
        elif not _is_loopback(request.client.host if request.client else None):
            raise ClientError(403, "forbidden",
                              "writing the system prompt is allowed from loopback only while ADMIN_TOKEN is unset")
        new = decode_system_prompt(await request.body())
        pool.require_serving()
        await engine.set_system_prompt(new.system_prompt)
        log.info("system prompt replaced (%d characters)", len(new.system_prompt))
        return json_response(SystemPrompt(engine.system_prompt))

    @get("/metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return [health, live, ready, predict, info, read_system_prompt, write_system_prompt, metrics]
