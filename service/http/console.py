"""The console page (``GET /console``) and what it reads: ``GET /progress``, ``/console/state``, ``/console/ask``.

``extras(state)`` wires the additions of this module into one app: the progress of every answer call
(``service.http.progress``, whose numbers also go to ``/metrics``), vLLM's own metrics per engine worker
(``service.pool.vllm_metrics``), and the routes.  The page is one HTML file, one script and one stylesheet
shipped in ``service/http/static`` (no CDN, no build step); it polls ``/progress`` (every second) and ``/console/state`` and
writes the system prompt through ``POST /system_prompt`` (the same admin-token rule).  ``GET /`` is untouched.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from env import SECRETS
from service.http.errors import ClientError, json_response
from service.http.progress import ProgressCollector, TrackedEngine
from service.http.routes import QAState, _questions, unless_disconnected
from service.http.schemas import decode_predict
from service.pool.vllm_metrics import VllmCollector

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
EACH_ALONE = 20  # up to this many questions, the console asks each on its own (its own tokens and time)
MASKED = ("_TOKEN", "API_KEY", "_SECRET", "PASSWORD")


def _masked(key: str, value: Any) -> Any:
    if (key in SECRETS or key.endswith(MASKED)) and value not in ("", None):
        return "***"
    return value


def extras(state: QAState) -> list[HTTPRouteHandler]:
    """Register the progress and vLLM collectors in the app's metrics; the routes of this module."""
    engine, pool, settings = state.engine, state.pool, state.settings
    assert isinstance(engine, TrackedEngine), "create_app wraps the engine with service.http.progress.tracked"
    tracker = engine.tracker
    tracker.phase = lambda: "warmup" if pool.status == "warming" else "request"
    state.metrics.registry.register(ProgressCollector(tracker))
    state.metrics.registry.register(VllmCollector(pool.workers))
    page = (STATIC / "console.html").read_bytes()
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}
    sources = dict(settings.sources)
    values = [{"key": key, "value": _masked(key, value), "source": sources.get(key, "")}  # settings are frozen
              for key, value in settings.public().items()]

    @get("/progress", sync_to_thread=False)
    def progress() -> Response[bytes]:
        return json_response(tracker.view())

    @get("/console", sync_to_thread=False)
    def console() -> Response[bytes]:
        return Response(page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    @get("/console/static/{name:str}", sync_to_thread=False)
    def asset(name: str) -> Response[bytes]:
        if name not in assets:
            raise ClientError(404, "not_found", f"no console asset {name!r}")
        return Response(assets[name], media_type=ASSETS[name], headers={"cache-control": "no-cache"})

    @get("/console/state", sync_to_thread=False)
    def console_state() -> Response[bytes]:
        status, body = pool.health()
        workers = []
        for w in pool.workers:
            s = w.stats
            workers.append({"label": w.label, "state": w.state, "pid": w.pid, "up": w.up, "failure": w.failure,
                            "calls": w.pending(), "in_flight": s.in_flight, "running": s.running,
                            "waiting": s.waiting, "has_scheduler": s.has_scheduler})
        return json_response({
            "health": body, "http_status": status, "phase": pool.status, "problem": pool.problem,
            "serving": pool.serving(), "backend": engine.name, "model_dir": str(settings.model_dir),
            "max_model_len": engine.max_model_len, "ready_after_s": pool.ready_after, "restarts": pool.restarts,
            "workers": workers, "settings": values, "admin_token_required": bool(settings.admin_token),
            "system_prompt": engine.system_prompt or settings.load_system_prompt(),
            "errors": list(tracker.errors)[:20],
        })

    @post("/console/ask")
    async def ask(request: Request) -> Response[bytes]:
        """A /predict body; answers with their route, tokens and time (each alone up to EACH_ALONE questions)."""
        req = decode_predict(await request.body(), engine.max_model_len)
        questions = _questions(req.prompt, settings.max_batch_questions)
        pool.require_serving()
        sampling = req.sampling()
        routed = state.routed(questions, sampling)
        started = time.perf_counter()

        async def one(index: int) -> dict[str, Any]:
            began, question, alone = time.perf_counter(), [questions[index]], routed.take([index])
            result = await engine.tracker.run(question, lambda: engine.answer_untracked(question, sampling, alone),
                                              "console")
            return {"tokens": result.tokens, "seconds": round(time.perf_counter() - began, 3),
                    "answer": result.texts()[0], "error": result.errors[0][1] if result.errors else None}

        async def work() -> tuple[list[dict[str, Any]], int]:
            if len(questions) <= EACH_ALONE:
                items = list(await asyncio.gather(*(one(i) for i in range(len(questions)))))
                return items, sum(i["tokens"] for i in items)
            result = await engine.tracker.run(questions, lambda: engine.answer_untracked(questions, sampling, routed),
                                              "console")
            errors = dict(result.errors)
            return [{"tokens": None, "seconds": None, "answer": text, "error": errors.get(i)}
                    for i, text in enumerate(result.texts())], result.tokens

        items, tokens = await unless_disconnected(request, work())
        off = "off (DISABLE_TOKEN_ROUTING=1)"
        for question, item, route, tokens in zip(questions, items, routed.routes, routed.budgets, strict=True):
            item.update(question=question, route=off if settings.disable_token_routing else route, budget=tokens)
        return json_response({"answers": items, "questions": len(questions), "tokens": tokens,
                              "seconds": round(time.perf_counter() - started, 3)})

    return [progress, console, asset, console_state, ask]
