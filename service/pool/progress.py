"""Progress of each request in the API process, from its engine workers' counts.

``Tracker.run`` (``service.http.progress``) puts a ``RequestProgress`` in a context variable for the duration of
one ``answer`` call; each ``ProcessEngineClient`` it reaches takes a ``Share`` of it (``share``), and the worker's
Progress frames for that call (``service.worker.progress`` counts them) update the share.  With several workers
a request has one share per worker, summed in the record.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from service.contract import wire


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
