"""The Litestar app: ``create_app(settings, engine)``; its lifespan enters the engine pool (``async with``).

The port opens at once and ``GET /`` answers ``warming`` while the engine loads and warms up in the
background (``service.pool.lifecycle.Pool``); then ``batch`` (BATCH_MODE=1) or ``ok``, with ``degraded``
while some of several engine workers restart.  An engine that failed, or whose only worker is restarting,
reports ``error`` with HTTP 503.  Routes: ``service.http.routes``; the error table: ``service.http.errors``.
The engine is shut down when the lifespan ends, its workers' process groups included.  When the pool gave
up (more crashes than RESTART_LIMIT within RESTART_WINDOW), the process exits with code 1 after that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.contract.sampling import Sampling
from service.http.console import extras
from service.http.errors import exception_handlers
from service.http.metrics import Metrics
from service.http.progress import tracked
from service.http.routes import QAState, routes
from service.http.v1.routes import v1_router
from service.pipeline.routing import Router
from service.pipeline.warmup import load_questions
from service.pool.client import EngineClient
from service.pool.lifecycle import Pool
from service.settings import Settings

log = logging.getLogger("service")


def create_app(settings: Settings, engine: EngineClient) -> Litestar:
    """The ASGI app serving ``engine`` with ``settings``; the engine starts and stops with the app."""
    engine = tracked(engine)  # the progress of every answer call (service.http.progress)

    async def warmup() -> None:
        s = settings
        questions = load_questions(s.warmup_data_path, s.warmup_num_samples)
        if not questions or s.warmup_repeat == 0:
            return
        for round_ in range(1, s.warmup_repeat + 1):
            started = time.perf_counter()
            result = await engine.answer(questions, Sampling(), state.routed(questions, Sampling()))
            log.info("warmup %d/%d: %d questions, %d tokens in %.1f s", round_, s.warmup_repeat,
                     len(questions), result.tokens, time.perf_counter() - started)

    pool = Pool(settings, engine, warmup)
    state = QAState(settings, engine, Metrics(lambda: engine.stats), pool, Router.from_settings(settings))
    state.metrics.ready.set_function(lambda: 1.0 if pool.serving() else 0.0)

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        try:
            async with pool:
                yield
        finally:
            if pool.fatal is not None:
                # uvicorn itself would exit 0 after this SIGTERM-started shutdown (service.__main__): everything
                # is stopped by now, so end the process here with the code an orchestrator acts on.
                log.critical("exiting with code 1: %s", pool.fatal)
                logging.shutdown()
                os._exit(1)

    app = Litestar(
        route_handlers=[*routes(state), *extras(state), v1_router(state)],  # extras: /progress, /console
        lifespan=[lifespan],
        exception_handlers=exception_handlers(settings),
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
    known = {"/", "/predict", "/info", "/system_prompt", "/metrics", "/health/live", "/health/ready", "/v1/models",
             "/v1/completions", "/v1/chat/completions"}

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
