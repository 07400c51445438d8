"""Progress of one call in the engine worker: counted where its questions finish, sent as ``wire.Progress`` frames.

``begin`` (in the worker's task for an ``Ask``) puts a ``CallCount`` in a context variable; the engine's answer
path ``tick``s it once per finished question (the async front end from each question's task, the sync front end
from each question's future), and ``pending_frames`` gives a ``wire.Progress`` frame per call whose count
changed, which the worker's stats loop sends four times a second at most.  The API process's side (each
request's shares of these counts): ``service.pool.progress``.  Nothing here is on the per-token path.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from service.contract import wire


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
