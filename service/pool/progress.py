"""Progress of one call, counted where its questions finish and carried to the request that made it.

Worker side: ``begin`` (in the worker's task for an ``Ask``) puts a ``CallCount`` in a context variable; the
engine's answer path ``tick``s it once per finished question (the async front end from each question's task,
the sync front end from each question's future), and ``pending_frames`` gives a ``wire.Progress`` frame per
call whose count changed, which the worker's stats loop sends four times a second at most.

API side: ``Tracker.run`` (``service.http.progress``) puts a ``RequestProgress`` in a context variable for the
duration of one ``answer`` call; each ``ProcessEngineClient`` it reaches takes a ``Share`` of it (``share``),
and the worker's Progress frames for that call update the share.  With several workers a request has one
share per worker, summed in the record.  Nothing here is on the per-token path.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from service.pool import wire

# --- the engine worker's side ------------------------------------------------------------------


@dataclass(slots=True)
class CallCount:
    """Questions finished and tokens generated so far by one call in this worker."""

    id: int
    total: int
    done: int = 0
    tokens: int = 0
    sent: tuple[int, int] = (0, 0)


_CALL: ContextVar[CallCount | None] = ContextVar("qa_call_count", default=None)
_CALLS: dict[int, CallCount] = {}  # this worker's calls being answered (one worker process, one loop)


def begin(call_id: int, total: int) -> None:
    """Count the questions of call ``call_id`` that finish from now on in this task (and the tasks it starts)."""
    count = CallCount(call_id, total)
    _CALL.set(count)
    _CALLS[call_id] = count
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(lambda _: _CALLS.pop(call_id, None))


def tick(output: Any) -> None:
    """One question of the current call finished (``output``: vLLM's final RequestOutput, or None/an error)."""
    count = _CALL.get()
    if count is None:
        return
    count.done += 1
    outputs = getattr(output, "outputs", None)
    if outputs:
        count.tokens += len(outputs[0].token_ids)


def watch(futures: list[asyncio.Future[Any]]) -> None:
    """Tick the current call as each of these futures (one per question) resolves."""
    if _CALL.get() is None:
        return

    def done(future: asyncio.Future[Any]) -> None:
        tick(None if future.cancelled() or future.exception() is not None else future.result())

    for future in futures:
        future.add_done_callback(done)  # runs in this context: the current call's count


def pending_frames() -> list[wire.Progress]:
    """A Progress frame for each call whose count changed since its last frame."""
    frames = []
    for count in _CALLS.values():
        now = (count.done, count.tokens)
        if now != count.sent:
            count.sent = now
            frames.append(wire.Progress(count.id, count.done, count.total, count.tokens))
    return frames


# --- the API process's side --------------------------------------------------------------------


@dataclass(slots=True)
class Share:
    """One engine worker's part of a request: its questions, how many are done, tokens generated."""

    worker: str
    total: int
    done: int = 0
    tokens: int = 0
    call: int | None = None  # the call id in that worker

    def update(self, frame: wire.Progress) -> None:
        self.done, self.tokens = max(self.done, min(frame.done, self.total)), max(self.tokens, frame.tokens)


@dataclass
class RequestProgress:
    """One ``answer`` call of the app (a /predict request, a console question, a warmup round) in flight."""

    id: int
    kind: str  # request | warmup | console
    total: int
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    shares: list[Share] = field(default_factory=list)
    logged: bool = False
    finished: float | None = None
    errors: int = 0
    outcome: str = "running"  # running | done | failed | cancelled

    def share(self, worker: str, total: int) -> Share:
        part = Share(worker, total)
        self.shares.append(part)
        return part

    @property
    def done(self) -> int:
        return min(self.total, sum(s.done for s in self.shares))

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shares)

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def rates(self) -> tuple[float, float, float | None]:
        """(questions/s, tokens/s, ETA in seconds or None) over the request so far."""
        elapsed = max(self.elapsed(), 1e-6)
        qps, tps = self.done / elapsed, self.tokens / elapsed
        left = self.total - self.done
        eta = 0.0 if left == 0 else (left / qps if qps > 0 else None)
        return qps, tps, eta

    def view(self) -> dict[str, Any]:
        """What /progress shows of it."""
        qps, tps, eta = self.rates()
        return {
            "id": self.id, "kind": self.kind, "state": self.outcome, "questions": self.total, "done": self.done,
            "errors": self.errors, "tokens": self.tokens, "elapsed_s": round(self.elapsed(), 3),
            "questions_per_s": round(qps, 2), "tokens_per_s": round(tps, 1),
            "eta_s": None if eta is None else round(eta, 1), "started_at": self.started_at,
            "workers": [{"worker": s.worker, "questions": s.total, "done": s.done, "tokens": s.tokens}
                        for s in self.shares],
        }


REQUEST: ContextVar[RequestProgress | None] = ContextVar("qa_request_progress", default=None)


def share(worker: str, total: int) -> Share | None:
    """This worker's share of the request being answered in this context (None outside a tracked one)."""
    request = REQUEST.get()
    return None if request is None else request.share(worker, total)
