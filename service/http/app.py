"""The Litestar app: ``create_app(settings, engine)``; its lifespan owns the engine (an ``EngineClient``).

The port opens at once and ``GET /`` answers ``warming`` while the engine loads and warms up in the
background; then ``batch`` (BATCH_MODE=1) or ``ok``.  An engine that failed or died reports
``error`` with HTTP 503.  The engine is shut down in the lifespan's ``finally``, child processes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.backends.base import EngineDead, EngineUnavailable, timing_level
from service.http.metrics import CONTENT_TYPE, Metrics
from service.http.schemas import (
    Error,
    ItemError,
    PredictResponse,
    SystemPrompt,
    decode_predict,
    decode_system_prompt,
    validation_field,
)
from service.pipeline.prompting import Overrides
from service.pipeline.warmup import load_questions
from service.pool.client import EngineClient
from service.pool.procs import freeze_heap
from service.settings import Settings

log = logging.getLogger("service")
JSON = "application/json"


class ClientError(Exception):
    """A 4xx with our error format."""

    def __init__(self, status: int, kind: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.field = status, kind, detail, field


@dataclass
class QAState:
    """Everything one app instance owns (no module-global state)."""

    settings: Settings
    engine: EngineClient
    metrics: Metrics
    status: str = "warming"  # warming | ready | error
    problem: str | None = None
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None

    def health(self) -> tuple[int, dict[str, str]]:
        if self.status == "ready" and (dead := self.engine.alive()) is not None:
            self.status, self.problem = "error", dead
        if self.status == "error":
            return 503, {"status": "error", "detail": self.problem or "engine failed"}
        if self.status == "warming":
            return 200, {"status": "warming"}
        body = {"status": "batch" if self.settings.batch_mode else "ok"}
        if self.engine.notice:
            body["backend"] = self.engine.name
            body["notice"] = self.engine.notice
        return 200, body

    async def boot(self) -> None:
        """Load the engine, build the answerer, warm up; then ready (or error with the reason)."""
        try:
            await self.engine.start()
            log.info("chat formatting: %s", "fast <|im_start|> path (byte-identical to the template)"
                     if self.engine.chat_format == "fast" else "the tokenizer's chat template")
            await self.warmup()
        except asyncio.CancelledError:
            raise
        except (EngineUnavailable, EngineDead, OSError, RuntimeError, ValueError) as exc:
            self.status, self.problem = "error", f"{type(exc).__name__}: {exc}"
            log.error("engine start-up failed: %s", self.problem)
            return
        freeze_heap("API process")  # start-up and warmup objects stay out of later collections
        self.status, self.ready_after = "ready", time.monotonic() - self.started
        self.metrics.ready.set(1)
        log.info("ready after %.1f s (backend %s)", self.ready_after, self.engine.name)

    async def warmup(self) -> None:
        s = self.settings
        questions = load_questions(s.warmup_data_path, s.warmup_num_samples)
        if not questions or s.warmup_repeat == 0:
            return
        for round_ in range(1, s.warmup_repeat + 1):
            started = time.perf_counter()
            result = await self.engine.answer(questions, Overrides())
            log.info("warmup %d/%d: %d questions, %d tokens in %.1f s", round_, s.warmup_repeat,
                     len(questions), result.tokens, time.perf_counter() - started)


def _json(body: object, status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type=JSON)


def _error(status: int, kind: str, detail: str, field: str | None = None) -> Response[bytes]:
    return _json(Error(error=kind, detail=detail, status_code=status, field=field), status)


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


def create_app(settings: Settings, engine: EngineClient) -> Litestar:
    """The ASGI app serving ``engine`` with ``settings``; the engine starts and stops with the app."""
    state = QAState(settings, engine, Metrics(lambda: engine.stats))

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        engine.check()  # a broken backend fails start-up now, with the reason, not after minutes
        boot = asyncio.create_task(state.boot(), name="engine-boot")
        try:
            yield
        finally:
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await boot
            log.info("stopping the engine")
            await engine.shutdown()
            log.info("engine stopped")

    @get("/", sync_to_thread=False)
    def health() -> Response[bytes]:
        status, body = state.health()
        return _json(body, status)

    @get("/health/live", sync_to_thread=False)
    def live() -> Response[bytes]:
        return _json({"status": "alive"})

    @get("/health/ready", sync_to_thread=False)
    def ready() -> Response[bytes]:
        status, body = state.health()
        return _json(body, 200 if state.status == "ready" and status == 200 else 503)

    @post("/predict")
    async def predict(request: Request) -> Response[bytes]:
        received = time.perf_counter()
        body = await request.body()
        if not body.strip():
            raise ClientError(400, "empty_body", 'the body is empty: send {"prompt": "question"} or a list')
        req = decode_predict(body)
        questions = _questions(req.prompt, settings.max_batch_questions)
        if state.status != "ready":
            _, health_body = state.health()
            raise EngineDead(f"not ready ({health_body['status']}): retry when GET / says ready")
        limit = engine.max_model_len
        if req.max_new_tokens is not None and req.max_new_tokens >= limit:
            raise ClientError(400, "validation_error",
                              f"max_new_tokens={req.max_new_tokens}: allowed 1..{limit - 1} (MAX_MODEL_LEN={limit})",
                              "max_new_tokens")
        overrides = Overrides(req.max_new_tokens, req.temperature, req.top_p, req.top_k,
                              req.repetition_penalty, req.frequency_penalty)
        started = time.perf_counter()
        result = await engine.answer(questions, overrides)
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
            return _json(PredictResponse(result.texts()[0]))
        answered = time.perf_counter()
        response = _json(PredictResponse(msgspec.Raw(result.texts_json), errors))
        log.log(timing_level(len(questions)),
                "/predict %d questions: body and checks %.3f s, engine %.3f s, response %.3f s (%d bytes)",
                len(questions), started - received, answered - started, time.perf_counter() - answered,
                len(response.content))
        return response

    @get("/info", sync_to_thread=False)
    def info() -> Response[bytes]:
        status, body = state.health()
        return _json({
            "backend": engine.name,
            "notice": engine.notice,
            "status": body["status"],
            "model_dir": str(settings.model_dir),
            "max_model_len": engine.max_model_len,
            "ready_after_s": state.ready_after,
            "engine_init_s": engine.init_seconds,
            "chat_format": engine.chat_format,
            "settings": settings.public(),
            "layout": settings.layout_info(),
        })

    @get("/system_prompt", sync_to_thread=False)
    def read_system_prompt() -> Response[bytes]:
        return _json(SystemPrompt(engine.system_prompt or settings.load_system_prompt()))

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
        if state.status != "ready":
            raise EngineDead("not ready: the system prompt can be replaced once the engine is up")
        await engine.set_system_prompt(new.system_prompt)
        log.info("system prompt replaced (%d characters)", len(new.system_prompt))
        return _json(SystemPrompt(engine.system_prompt))

    @get("/metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def on_client_error(_: Request, exc: ClientError) -> Response[bytes]:
        return _error(exc.status, exc.kind, exc.detail, exc.field)

    def on_validation(_: Request, exc: msgspec.ValidationError) -> Response[bytes]:
        message = str(exc)
        return _error(400, "validation_error", message, validation_field(message))

    def on_decode(_: Request, exc: msgspec.DecodeError) -> Response[bytes]:
        return _error(400, "malformed_json", f"the body is not valid JSON: {exc}")

    def on_http(_: Request, exc: HTTPException) -> Response[bytes]:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        detail = exc.detail
        if exc.status_code == 413:
            detail = f"the body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes}"
        return _error(exc.status_code, kind, detail)

    def on_engine_dead(_: Request, exc: EngineDead) -> Response[bytes]:
        return _error(503, "unavailable", str(exc))

    def on_unexpected(request: Request, exc: Exception) -> Response[bytes]:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc} (see the server log)")

    app = Litestar(
        route_handlers=[health, live, ready, predict, info, read_system_prompt, write_system_prompt, metrics],
        lifespan=[lifespan],
        exception_handlers={
            ClientError: on_client_error,
            msgspec.ValidationError: on_validation,
            msgspec.DecodeError: on_decode,
            HTTPException: on_http,
            EngineDead: on_engine_dead,
            Exception: on_unexpected,
        },
        request_max_body_size=settings.max_request_bytes,
        middleware=[lambda app: _count_requests(app, state.metrics)],
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.qa = state
    return app


def _count_requests(inner: ASGIApp, metrics: Metrics) -> ASGIApp:
    """ASGI middleware counting responses by path and status."""
    known = {"/", "/predict", "/info", "/system_prompt", "/metrics", "/health/live", "/health/ready"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in known else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await inner(scope, receive, counting_send)

    return app
