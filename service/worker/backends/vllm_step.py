"""``ENGINE_FRONTEND=sync``: vLLM's ``LLMEngine`` stepped on one thread, the way ``LLM.generate`` runs it.

``LLM.generate`` adds its requests to an ``LLMEngine`` and calls ``step()`` until none is unfinished; each
step takes the engine core's outputs, turns them into ``RequestOutput``s and returns the finished ones.
``StepLoop`` does the same on a dedicated thread, but stays open to every request of the service: the
event loop hands it submissions at any time, the thread adds them between two steps (so concurrent
requests batch together, as with ``AsyncLLM``), and each step's finished outputs go back to the event
loop in one call.  At most ``limit`` questions are in the engine at once (``BATCH_CONCURRENCY``); the
others wait in order.  Only this thread touches the engine (``LLMEngine`` is not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("service")


@dataclass(slots=True)
class Submission:
    """One question for the engine, and the future its final ``RequestOutput`` (or error) goes to.

    With ``stream`` (a queue), every output of the request goes there instead, the final one included;
    the future then only gets an error.
    """

    request_id: str
    prompt: Any
    params: Any
    future: asyncio.Future[Any]
    stream: asyncio.Queue[Any] | None = None


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


class Rejected(Exception):
    """The engine refused one question (``add_request`` raised); the others go on."""


class LoopStopped(RuntimeError):
    """The step loop has stopped (shutdown, or the engine died): nothing more can be answered."""


class StepLoop:
    """An ``LLMEngine`` driven by its own thread; ``submit`` from the event loop, results as futures."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, limit: int, dead_error: type[BaseException],
                 stats: Any = None):
        self._engine = engine
        self._stats = stats  # an EngineStats: ``finished`` counts the questions this thread ends
        self._loop = loop
        self._limit = limit
        self._dead_error = dead_error  # vLLM's EngineDeadError: the engine core stopped
        self._inbox: queue.SimpleQueue[list[Submission] | _Abort | None] = queue.SimpleQueue()
        self._backlog: deque[Submission] = deque()
        self._running: dict[str, Submission] = {}
        self._thread = threading.Thread(target=self._run, name="vllm-step-loop", daemon=True)
        self.problem: str | None = None  # why the loop stopped serving, once it has

    def start(self) -> None:
        self._thread.start()

    # --- event-loop side ---------------------------------------------------------------------

    def submit(self, requests: list[tuple[str, Any, Any]],
               stream: asyncio.Queue[Any] | None = None) -> list[asyncio.Future[Any]]:
        """Queue (request id, prompt, params) triples; each future gets the final output or an exception.

        ``stream`` (one request): its outputs go to that queue as the engine makes them (``Submission``).
        """
        batch = [Submission(rid, prompt, params, self._loop.create_future(), stream)
                 for rid, prompt, params in requests]
        if self.problem is not None:
            for s in batch:
                s.future.set_exception(LoopStopped(self.problem))
        else:
            self._inbox.put(batch)
        return [s.future for s in batch]

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests: out of the backlog, aborted in the engine, their places under the limit freed.

        Their futures are left unresolved: the caller has given up on them.
        """
        self._inbox.put(_Abort(request_ids))

    def stop(self, timeout: float = 60) -> None:
        """End the thread after the current step; futures still open get a RuntimeError."""
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        try:
            while self._take(block=self._idle()):
                self._admit()
                if engine.has_unfinished_requests():
                    self._finish(engine.step())
            reason = "the engine is shut down"
        except self._dead_error as exc:
            reason = f"vLLM engine died: {exc}"
            log.error("%s", reason)
        except Exception as exc:  # a failing step must not leave the requests waiting forever
            reason = f"the engine's step loop failed: {type(exc).__name__}: {exc}"
            log.exception("%s", reason)
        self.problem = reason
        self._fail_open(reason)

    def _idle(self) -> bool:
        """No question in the engine or waiting for it.  The scheduler's counts are then 0: vLLM records them
        only when it steps, so after an abort of everything the last busy counts would otherwise stay."""
        if self._engine.has_unfinished_requests() or self._backlog:
            return False
        if self._stats is not None and (self._stats.running or self._stats.waiting):
            self._stats.scheduler(0, 0)
        return True

    def _take(self, block: bool) -> bool:
        """Move every waiting message into the backlog (waiting for one if ``block``); False on stop."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if message is None:
                return False
            if isinstance(message, _Abort):
                self._abort(message.request_ids)
            else:
                self._backlog.extend(message)

    def _admit(self) -> None:
        """Add backlog questions to the engine up to the limit; a rejected question fails alone.

        Whatever ``add_request`` raises for one question (vLLM's ``VLLMValidationError`` is no ValueError;
        a prompt too long for the model is one) is that question's error: the loop goes on for the others.
        """
        rejected: list[tuple[asyncio.Future[Any], BaseException]] = []
        while self._backlog and len(self._running) < self._limit:
            s = self._backlog.popleft()
            try:
                self._engine.add_request(s.request_id, s.prompt, s.params)
            except self._dead_error:
                raise
            except Exception as exc:
                rejected.append((s.future, Rejected(str(exc))))
                continue
            self._running[s.request_id] = s
        if rejected:
            self._count(len(rejected))
            self._loop.call_soon_threadsafe(_reject, rejected)

    def _finish(self, outputs: list[Any]) -> None:
        done: list[tuple[asyncio.Future[Any], Any]] = []
        streamed: list[tuple[asyncio.Queue[Any], Any]] = []
        finished = 0
        for o in outputs:
            s = self._running.pop(o.request_id, None) if o.finished else self._running.get(o.request_id)
            if s is None:
                continue
            finished += o.finished
            if s.stream is not None:
                streamed.append((s.stream, o))
            elif o.finished:
                done.append((s.future, o))
        if finished:
            self._count(finished)
        if done:
            self._loop.call_soon_threadsafe(_resolve, done)
        if streamed:
            self._loop.call_soon_threadsafe(_push, streamed)

    def _count(self, finished: int) -> None:
        if self._stats is not None:
            self._stats.finished += finished

    def _abort(self, request_ids: list[str]) -> None:
        wanted = set(request_ids)
        self._backlog = deque(s for s in self._backlog if s.request_id not in wanted)
        running = [rid for rid in request_ids if self._running.pop(rid, None) is not None]
        if running:
            self._engine.abort_request(running)

    def _fail_open(self, reason: str) -> None:
        open_ = [s.future for s in [*self._running.values(), *self._backlog]]
        self._running.clear()
        self._backlog.clear()
        if open_ and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_reject, [(f, LoopStopped(reason)) for f in open_])


def _resolve(done: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, output in done:
        if not future.done():
            future.set_result(output)


def _push(streamed: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for outputs, output in streamed:
        outputs.put_nowait(output)


def _reject(failed: list[tuple[asyncio.Future[Any], BaseException]]) -> None:
    for future, exc in failed:
        if not future.done():
            future.set_exception(exc)
