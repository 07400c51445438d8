"""Progress of the requests in flight: log lines, ``GET /progress`` and gauges and counters in ``/metrics``.

``tracked(engine)`` wraps the app's engine client so that every ``answer`` call (a /predict request, a
warmup round, a console question) is a ``RequestProgress`` while it runs (``service.pool.progress`` says how
the engine workers count).  A call still running after ``FIRST_LINE_AFTER`` seconds gets a log line every
``LINE_EVERY`` seconds (questions done/total, questions/s, tokens/s, ETA, and each engine worker's share when
there are several) and a summary line when it ends.  The log task runs only while calls are in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.contract import wire
from service.contract.sampling import Sampling
from service.pipeline.routing import Routed
from service.pool.progress import REQUEST, RequestProgress

log = logging.getLogger("service")

FIRST_LINE_AFTER = 3.0  # seconds before a running call gets its first progress line
LINE_EVERY = 5.0  # seconds between two progress lines of one call
RECENT = 20  # finished calls kept for /progress and the console
RECENT_ERRORS = 50  # item errors kept for the console


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Tracker:
    """The calls in flight in one app, the last ones finished, recent item errors and running totals."""

    def __init__(self) -> None:
        self.active: dict[int, RequestProgress] = {}
        self.recent: deque[RequestProgress] = deque(maxlen=RECENT)
        self.errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.phase: Callable[[], str] = lambda: "request"
        self.finished_questions = 0  # questions of calls that have ended (done or not)
        self.finished_tokens = 0
        self.calls = 0
        self._ids = itertools.count(1)
        self._logger: asyncio.Task[None] | None = None

    # --- counting ----------------------------------------------------------------------------

    async def run(self, questions: list[str], work: Callable[[], Awaitable[wire.Answers]],
                  kind: str | None = None) -> wire.Answers:
        """``await work()`` as one tracked call of ``len(questions)`` questions."""
        record = RequestProgress(next(self._ids), kind or self.phase(), len(questions))
        self.active[record.id] = record
        self.calls += 1
        self._ensure_logger()
        token = REQUEST.set(record)
        try:
            result = await work()
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            raise
        except BaseException:
            record.outcome = "failed"
            raise
        finally:
            REQUEST.reset(token)
            self._end(record)
        record.outcome, record.errors = "done", len(result.errors)
        for index, message in result.errors[:RECENT_ERRORS]:
            self.errors.append({"at": time.time(), "request": record.id, "index": index,
                                "question": questions[index][:300], "error": message})
        if record.logged or record.elapsed() >= FIRST_LINE_AFTER:
            qps, tps, _ = record.rates()
            log.info("%s %d finished: %d questions (%d item errors) in %.1f s, %d tokens, %.1f questions/s, "
                     "%.0f tokens/s", record.kind, record.id, record.total, record.errors, record.elapsed(),
                     result.tokens, qps, tps)
        return result

    def _end(self, record: RequestProgress) -> None:
        record.finished = time.monotonic()
        self.active.pop(record.id, None)
        self.recent.appendleft(record)
        self.finished_questions += record.done if record.outcome != "running" else record.total
        self.finished_tokens += record.tokens

    def done_questions(self) -> int:
        """Questions finished since start, those of the calls in flight included (only grows)."""
        return self.finished_questions + sum(r.done for r in self.active.values())

    def done_tokens(self) -> int:
        return self.finished_tokens + sum(r.tokens for r in self.active.values())

    # --- log lines ---------------------------------------------------------------------------

    def _ensure_logger(self) -> None:
        if self._logger is None or self._logger.done():
            # A context of its own: the task must not see (or keep) the request record of the call that started it.
            self._logger = asyncio.get_running_loop().create_task(self._log_lines(), name="progress-lines",
                                                                  context=contextvars.Context())

    async def _log_lines(self) -> None:
        next_line: dict[int, float] = {}
        while self.active:
            now = time.monotonic()
            for record in list(self.active.values()):
                due = next_line.setdefault(record.id, record.started + FIRST_LINE_AFTER)
                if now >= due:
                    next_line[record.id] = now + LINE_EVERY
                    record.logged = True
                    log.info("%s", self.line(record))
            for id_ in [i for i in next_line if i not in self.active]:
                del next_line[id_]
            await asyncio.sleep(0.5)

    @staticmethod
    def line(record: RequestProgress) -> str:
        qps, tps, eta = record.rates()
        text = (f"{record.kind} {record.id}: {record.done}/{record.total} questions "
                f"({100 * record.done / max(record.total, 1):.0f}%), {qps:.1f} questions/s, {tps:.0f} tokens/s, "
                f"ETA {_eta(eta)}")
        if len(record.shares) > 1:
            text += "; " + ", ".join(f"{s.worker}: {s.done}/{s.total}" for s in record.shares)
        return text

    # --- views -------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """``GET /progress``: the calls in flight, the last ones finished, totals."""
        return {
            "in_flight": [r.view() for r in list(self.active.values())],
            "recent": [r.view() for r in list(self.recent)[:5]],
            "totals": {"calls": self.calls, "questions_done": self.done_questions(), "tokens": self.done_tokens()},
        }


class TrackedEngine:
    """The app's engine client with every ``answer`` call tracked; everything else is the client's own."""

    def __init__(self, engine: Any, tracker: Tracker):
        self._engine = engine
        self.tracker = tracker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def answer(self, questions: list[str], sampling: Sampling, routed: Routed) -> wire.Answers:
        return await self.tracker.run(questions, lambda: self._engine.answer(questions, sampling, routed))

    async def answer_untracked(self, questions: list[str], sampling: Sampling, routed: Routed) -> wire.Answers:
        """The client's own ``answer`` (inside a call the caller tracks itself)."""
        return await self._engine.answer(questions, sampling, routed)


def tracked(engine: Any) -> TrackedEngine:
    """``engine`` with a ``Tracker`` of its own (``engine.tracker``)."""
    return engine if isinstance(engine, TrackedEngine) else TrackedEngine(engine, Tracker())


class ProgressCollector(Collector):
    """The tracker's numbers in ``/metrics``: running totals, and one series per call in flight."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def collect(self) -> Iterator[Any]:
        t = self.tracker
        done = CounterMetricFamily("qa_progress_questions_done", "Questions finished, counted as they finish "
                                   "(calls in flight included).", value=t.done_questions())
        tokens = CounterMetricFamily("qa_progress_tokens", "Tokens of finished questions, counted as they finish.",
                                     value=t.done_tokens())
        calls = GaugeMetricFamily("qa_progress_calls_in_flight", "Answer calls (requests, warmup) in flight.",
                                  value=len(t.active))
        labels = ["request", "kind"]
        total = GaugeMetricFamily("qa_request_questions", "Questions of a call in flight.", labels=labels)
        req_done = GaugeMetricFamily("qa_request_questions_done", "Questions of a call in flight that are done.",
                                     labels=[*labels, "worker"])
        tps = GaugeMetricFamily("qa_request_tokens_per_second", "Tokens/s of a call in flight so far.", labels=labels)
        eta = GaugeMetricFamily("qa_request_eta_seconds", "Estimated seconds left of a call in flight.", labels=labels)
        for record in list(t.active.values()):
            key = [str(record.id), record.kind]
            _, rate, left = record.rates()
            total.add_metric(key, record.total)
            req_done.add_metric([*key, "all"], record.done)
            for part in record.shares:
                req_done.add_metric([*key, part.worker], part.done)
            tps.add_metric(key, rate)
            if left is not None:
                eta.add_metric(key, left)
        yield from (done, tokens, calls, total, req_done, tps, eta)
