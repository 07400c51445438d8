"""The engine pool's lifecycle in one place: start, supervise, restart, stop (``async with Pool(...)``).

Entered from the app's lifespan.  On entry the workers' engines start in the background (the port is
already open and ``GET /`` says ``warming``), then the warmup runs and the pool turns ``ready``; any
start-up failure, of any kind, ends in ``error`` with the reason.  While serving, a supervisor looks at
every worker four times a second: a worker that died (end of its stream, its exit code, its engine's death,
which makes the worker exit with code 4) or that is stuck (calls in flight and no progress for
``ENGINE_STALL_TIMEOUT`` seconds) has its calls failed at once (HTTP 503, or item errors for its shard of a
request spread over several workers), its whole process group SIGKILLed, and is restarted after 1 s, 2 s,
4 s ... (at most ``BACKOFF_CAP``).  The budget counts incidents, not workers (``service.pool.incidents``):
workers that fail together (one GPU, one cause) are one incident and restart together (or one after another
when their engines may not start at once).  More than ``RESTART_LIMIT`` incidents within ``RESTART_WINDOW``
seconds are fatal: the pool logs the cause, marks itself ``fatal`` and sends SIGTERM to its own process, whose
lifespan then stops everything and exits with code 1 (``service.http.app``).  On exit the supervisor stops
and every worker is shut down, its process group included.  The helpers at the end end one worker process
(``kill_tree``: its whole group, SIGKILL; ``stop_process``: a graceful stop) live in ``service.procs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from service.contract.errors import EngineDead
from service.pool.incidents import Incidents
from service.procs import assert_tree_gone, freeze_heap
from service.settings import Settings

log = logging.getLogger("service")

POLL = 0.25  # seconds between two looks at the workers
BACKOFF_CAP = 30.0  # the longest wait before a restart


class Pool:
    """Owns the engine client's lifecycle; ``health()`` says what ``GET /`` and ``/health/ready`` report."""

    def __init__(self, settings: Settings, engine: Any, warmup: Callable[[], Awaitable[None]] | None = None):
        self.settings = settings
        self.engine = engine  # a ProcessEngineClient or a ShardedEngineClient
        self.workers: list[Any] = list(engine.workers)
        self.warmup = warmup
        self.status = "warming"  # warming | ready | error
        self.problem: str | None = None
        self.fatal: str | None = None  # set when the restart limit was exceeded: the process exits with 1
        self.ready_after: float | None = None
        self.restarts = 0
        self.incidents = Incidents(settings.restart_limit, settings.restart_window, BACKOFF_CAP)
        self._incident_of: dict[str, int] = {}  # worker label: the incident of its latest failure
        # Restarts one at a time unless the engines may start at once (the same rule as the first start).
        self._restart_slot: contextlib.AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext() if settings.engines_start_together else asyncio.Lock())
        self._started = time.monotonic()
        self._main: asyncio.Task[None] | None = None
        self._recovering: dict[str, asyncio.Task[None]] = {}

    # --- entering and leaving -------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        self.engine.check()  # a broken backend fails start-up now, with the reason, not after minutes
        self._main = asyncio.create_task(self._run(), name="engine-pool")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        tasks = [t for t in [self._main, *self._recovering.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("stopping the engine")
        await self.engine.shutdown()
        if not await asyncio.to_thread(assert_tree_gone):  # the whole tree is gone before we say so
            log.info("engine stopped")

    # --- what health reports --------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether a request can be answered now (ready, and at least one worker up)."""
        return self.status == "ready" and any(w.up for w in self.workers)

    def require_serving(self) -> None:
        """The one readiness check of every route that needs the engine: EngineDead (HTTP 503) saying why not."""
        if self.serving():
            return
        _, body = self.health()
        detail = f": {body['detail']}" if "detail" in body else ""
        raise EngineDead(f"not ready ({body['status']}{detail}): retry when GET / says ready")

    def degraded(self) -> str | None:
        """``"1 of 2 engine workers restarting"`` while some (not all) workers are down."""
        down = sum(1 for w in self.workers if not w.up)
        if self.status != "ready" or down == 0 or down == len(self.workers):
            return None
        return f"{down} of {len(self.workers)} engine workers restarting"

    def health(self) -> tuple[int, dict[str, str]]:
        """(HTTP status, body) of ``GET /``: warming, batch/ok (perhaps degraded), or error (503)."""
        if self.status == "error":
            return 503, {"status": "error", "detail": self.problem or "engine failed"}
        if self.status == "warming":
            return 200, {"status": "warming"}
        if not self.serving():
            worker = self.workers[0]
            detail = (f"{worker.label} is restarting; it failed: {worker.failure}" if worker.failure
                      else worker.alive() or f"{worker.label} is restarting")
            return 503, {"status": "error", "detail": detail}
        body = {"status": "batch" if self.settings.batch_mode else "ok"}
        if (degraded := self.degraded()) is not None:
            body["degraded"] = degraded
        if self.engine.notice:
            body["backend"] = self.engine.name
            body["notice"] = self.engine.notice
        return 200, body

    # --- start-up -------------------------------------------------------------------------------

    async def _run(self) -> None:
        if await self._boot():
            await self._supervise()

    async def _boot(self) -> bool:
        """Load the engines, build the answerers, warm up; then ready (or error with the reason)."""
        try:
            await self.engine.start()
            log.info("chat formatting: %s", "fast <|im_start|> path (byte-identical to the template)"
                     if self.engine.chat_format == "fast" else "the tokenizer's chat template")
            if self.warmup is not None:
                await self.warmup()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever went wrong, health says so: never `warming` forever
            self.status, self.problem = "error", f"{type(exc).__name__}: {exc}"
            log.error("engine start-up failed: %s", self.problem)
            return False
        freeze_heap("API process")  # start-up and warmup objects stay out of later collections
        self.status, self.ready_after = "ready", time.monotonic() - self._started
        log.info("ready after %.1f s (backend %s)", self.ready_after, self.engine.name)
        return True

    # --- supervision ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        timeout = self.settings.engine_stall_timeout
        while True:
            for worker in self.workers:
                if worker.label in self._recovering or worker.state != "up":
                    continue
                problem = worker.alive() or worker.stalled(timeout)
                if problem is not None:
                    task = asyncio.create_task(self._recover(worker, problem), name=f"restart-{worker.label}")
                    self._recovering[worker.label] = task
                    task.add_done_callback(lambda _, label=worker.label: self._recovering.pop(label, None))
            await asyncio.sleep(POLL)

    async def _recover(self, worker: Any, problem: str) -> None:
        """Count the failure in its incident, kill the worker's whole process group, restart it within budget.

        The workers of one incident restart when its backoff is over: together when engines may start at once
        on the device (a fixed KV cache), else one after another (vLLM profiles the free memory).
        """
        while True:
            incident, joined = self.incidents.fail(worker.label, problem)
            self._incident_of[worker.label] = incident.number
            if joined:
                log.error("%s failed: %s; incident %d (opened %.1f s earlier by %s): not counted again",
                          worker.label, problem, incident.number, time.monotonic() - incident.opened,
                          next(iter(incident.failed)))
            else:
                log.error("%s failed: %s; incident %d opened", worker.label, problem, incident.number)
            await worker.kill(problem)  # its calls end now; no process of its group is left
            if self.incidents.over_budget():
                self._give_up(worker, problem)
                return
            s = self.settings
            if not joined:
                log.warning("restarting the workers of incident %d in %.0f s (incident %d within RESTART_WINDOW=%d "
                            "s; RESTART_LIMIT=%d)", incident.number, incident.restart_at - incident.opened,
                            self.incidents.in_window(), s.restart_window, s.restart_limit)
            await asyncio.sleep(max(0.0, incident.restart_at - time.monotonic()))
            started = time.monotonic()
            try:
                async with self._restart_slot:
                    await worker.restart()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = f"its restart failed: {type(exc).__name__}: {exc}"
                continue
            self.restarts += 1
            log.info("%s restarted in %.1f s (pid %s; incident %d)", worker.label, time.monotonic() - started,
                     worker.pid, incident.number)
            for closed in self.incidents.recovered(worker.label):
                log.info("incident %d over: %s back after %.1f s", closed.number, ", ".join(closed.failed),
                         (closed.closed or 0.0) - closed.opened)
            return

    def _give_up(self, worker: Any, problem: str) -> None:
        """Too many incidents: say why, then stop this process (SIGTERM; the lifespan exits with code 1)."""
        s, incidents = self.settings, self.incidents
        self.fatal = (f"{worker.label} failed (incident {incidents.history[-1].number}): {incidents.in_window()} "
                      f"incidents within RESTART_WINDOW={s.restart_window} s, more than RESTART_LIMIT="
                      f"{s.restart_limit} allows (last: {problem}); stopping the service with exit code 1 so that "
                      f"its supervisor takes over")
        self.status, self.problem = "error", self.fatal
        log.critical("%s", self.fatal)
        os.kill(os.getpid(), signal.SIGTERM)

    def incident_of(self, worker: Any) -> int | None:
        """The incident of the worker's latest failure (None: it never failed)."""
        return self._incident_of.get(worker.label)
