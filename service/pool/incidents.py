"""The restart budget counts incidents, not workers (issue 22).

One GPU-wide event (a driver hiccup, an Xid error, every engine stuck together, every worker killed at once)
makes several workers fail within moments of each other.  Counted per worker, one such event used up the
whole ``RESTART_LIMIT`` and the service exited; counted as one incident it costs one restart of the budget.

The rule, pure and in one place (``Incidents.fail``): a failure joins the newest incident when that incident
is still open (one of its workers is not back yet) and this worker is not in it already; otherwise it opens
a new incident, which is what the budget counts.  So a worker that fails again after it came back, or whose
restart failed, always opens or joins a later incident: every incident holds each worker at most once, and a
worker that keeps failing uses up the budget exactly as before.  More than ``RESTART_LIMIT`` incidents
opened within ``RESTART_WINDOW`` seconds are fatal.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KEEP = 20  # incidents shown in /info


@dataclass
class Incident:
    """Failures of one or more workers that belong to one event."""

    number: int
    cause: str  # the first failure's problem
    opened: float  # time.monotonic()
    opened_at: float  # time.time(), for /info
    restart_at: float  # monotonic: when its workers restart (the backoff of the incident that opened it)
    failed: dict[str, str] = field(default_factory=dict)  # worker label: its problem, in order of failure
    down: set[str] = field(default_factory=set)  # its workers not back yet
    restarted: dict[str, float] = field(default_factory=dict)  # worker label: seconds after opening
    closed: float | None = None  # monotonic, once every worker of it is back

    @property
    def open(self) -> bool:
        return bool(self.down)

    def public(self, now: float) -> dict[str, Any]:
        """What /info shows of it."""
        return {
            "incident": self.number,
            "cause": self.cause,
            "opened_s_ago": round(now - self.opened, 1),
            "opened_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.opened_at)),
            "workers": list(self.failed),
            "restarted_after_s": {label: round(after, 1) for label, after in self.restarted.items()},
            "open": self.open,
            "recovered_after_s": None if self.closed is None else round(self.closed - self.opened, 1),
        }


class Incidents:
    """The incidents of one pool and the restart budget they use (``RESTART_LIMIT`` in ``RESTART_WINDOW`` s)."""

    def __init__(self, limit: int, window: float, backoff_cap: float):
        self.limit, self.window, self.backoff_cap = limit, window, backoff_cap
        self.history: deque[Incident] = deque(maxlen=KEEP)
        self._opened: deque[float] = deque()  # when each incident within the window opened
        self._count = 0

    def fail(self, label: str, problem: str, now: float | None = None) -> tuple[Incident, bool]:
        """Record that worker ``label`` failed: (its incident, whether it joined one already open)."""
        now = time.monotonic() if now is None else now
        newest = self.history[-1] if self.history else None
        if newest is not None and newest.open and label not in newest.failed:
            newest.failed[label] = problem
            newest.down.add(label)
            return newest, True
        self._count += 1
        self._opened.append(now)
        delay = min(self.backoff_cap, 2.0 ** (self.in_window(now) - 1))  # 1 s, 2 s, 4 s ... per incident
        incident = Incident(self._count, problem, now, time.time(), now + delay, {label: problem}, {label})
        self.history.append(incident)
        return incident, False

    def recovered(self, label: str, now: float | None = None) -> list[Incident]:
        """Worker ``label`` is back: it leaves every incident it was down in; the incidents this closed."""
        now = time.monotonic() if now is None else now
        closed = []
        for incident in self.history:
            if label in incident.down:
                incident.down.discard(label)
                incident.restarted[label] = now - incident.opened
                if not incident.down:
                    incident.closed = now
                    closed.append(incident)
        return closed

    def in_window(self, now: float | None = None) -> int:
        """Incidents opened within the last ``window`` seconds."""
        now = time.monotonic() if now is None else now
        while self._opened and self._opened[0] < now - self.window:
            self._opened.popleft()
        return len(self._opened)

    def over_budget(self, now: float | None = None) -> bool:
        return self.in_window(now) > self.limit

    def public(self) -> dict[str, Any]:
        """The budget and the recent incidents, newest last (``/info``)."""
        now = time.monotonic()
        return {"in_window": self.in_window(now), "limit": self.limit, "window_s": self.window,
                "total": self._count, "recent": [incident.public(now) for incident in self.history]}
