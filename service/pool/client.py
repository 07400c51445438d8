"""What the app talks to: an ``EngineClient`` that answers questions (like vLLM's ``EngineClient``).

``ProcessEngineClient`` is the API process's side of one engine worker (``python -m service.worker``,
which hosts the engine and the answering pipeline in a ``LocalEngineClient``), reached over a socket pair
with msgpack frames.  The API process then imports neither vLLM nor torch (about 80 MB instead of 600 MB)
and a crashing engine cannot take the HTTP side down with it.  The worker runs in a session of its own and
the engine's processes join its process group; shutdown or a crash ends the whole group.  Every call ends:
with its reply, ``EngineDead`` (the worker or its engine is gone: HTTP 503) or ``EngineCallFailed`` (the call
raised in the worker: HTTP 500); a cancelled call is cancelled in the worker too (its questions are aborted
in the engine).  Several workers: ``service.pool.sharded``; supervision and restarts:
``service.pool.lifecycle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from service import procs
from service.contract import wire
from service.contract.errors import EngineDead, EngineUnavailable, raised_by
from service.contract.sampling import Sampling
from service.contract.wire import EngineStats
from service.pipeline.routing import Routed
from service.pool import progress
from service.settings import Settings

log = logging.getLogger("service")


class EngineClient(Protocol):
    """The app's view of the engine: lifecycle, health, answers, system prompt, stats."""

    name: str
    notice: str | None
    stats: EngineStats
    init_seconds: float | None
    max_model_len: int
    chat_format: str | None
    system_prompt: str

    @property
    def workers(self) -> list[ProcessEngineClient]:
        """The worker processes behind this client (``service.pool.lifecycle`` supervises each)."""

    def check(self) -> None:
        """Make sure the backend imports (fast); raise EngineUnavailable saying why."""

    async def start(self) -> None:
        """Load the model and build the answering pipeline."""

    def alive(self) -> str | None:
        """None when healthy, else why not."""

    async def answer(self, questions: list[str], sampling: Sampling, routed: Routed) -> wire.Answers:
        """One answer per question, in order; per-item errors inside; EngineDead when nothing can be answered.

        ``routed``: each question's route and budget, decided once (``service.pipeline.routing.route_all``)."""

    async def generate(self, make: Callable[[int], wire.Generate],
                       on_pieces: Callable[[list[wire.Piece]], None] | None = None) -> wire.Generated:
        """A ``/v1`` call (``make(id)`` builds it); a streaming call hands each batch of pieces to ``on_pieces``.

        EngineRejected (HTTP 400) when the worker refused it before any work."""

    async def set_system_prompt(self, text: str) -> None: ...

    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""


class ProcessEngineClient:
    """A ``LocalEngineClient`` in a worker process, driven over a socket pair.

    One object per worker slot: after a crash, ``kill`` ends the incarnation (its calls fail, its whole process
    group is killed) and ``restart`` starts a new worker process in the same slot (``service.pool.lifecycle``
    decides when).  ``state`` is ``new``, ``starting``, ``up``, ``down`` (dead or restarting) or ``stopped``.
    """

    HANDSHAKE_TIMEOUT = 300.0

    def __init__(self, settings: Settings, environ: Mapping[str, str], label: str = "engine worker"):
        self.settings = settings
        self.environ = dict(environ)
        self.label = label
        self.name = settings.backend
        self.notice: str | None = None
        self.stats = EngineStats()
        self.init_seconds: float | None = None
        self.max_model_len = settings.max_model_len
        self.chat_format: str | None = None
        self.system_prompt = ""
        self.state = "new"
        self.failure: str | None = None  # why its last incarnation was ended (see kill)
        self._next = 0
        self._fresh()

    def _fresh(self) -> None:
        """Forget the previous incarnation (process, socket, calls, gauges)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: wire.Outbox | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listeners: dict[int, Callable[[list[wire.Piece]], None]] = {}  # streaming calls' pieces
        self._ready: asyncio.Future[Any] | None = None
        self._dead: str | None = None
        self._progress: tuple[int, int] | None = None
        self._progress_at = time.monotonic()
        self._shares: dict[int, progress.Share] = {}  # call id: its share of a request's progress
        self.stats.in_flight = self.stats.running = self.stats.waiting = 0
        self._generated_before = self.stats.generated  # earlier incarnations' tokens: the total only grows

    @property
    def workers(self) -> list[ProcessEngineClient]:
        return [self]

    @property
    def pid(self) -> int | None:
        """The worker's pid, which is also its process group's id (it runs in a session of its own)."""
        return self._proc.pid if self._proc is not None else None

    # --- start-up -------------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the worker process (it begins importing the backend at once).

        Call it on the event loop's thread (or the main thread), never from a thread pool: the worker's
        ``PR_SET_PDEATHSIG`` fires when the thread that started it ends.  ``start_new_session`` puts the worker
        and everything it starts in a process group of its own, which ``kill`` takes down as a whole.
        """
        if self._proc is not None:
            return
        parent, child = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "service.worker", str(child.fileno())],
            pass_fds=(child.fileno(),), env=self.environ, close_fds=True, start_new_session=True,
        )
        child.close()
        self._sock = parent
        with contextlib.suppress(OSError):  # a worker gone at once: ``check`` reports its exit
            wire.send_sync(parent, wire.Setup(self.settings.to_wire()))  # the worker parses no settings of its own

    def check(self) -> None:
        """Start the worker if needed and wait for it to import the backend (its Hello or its Failure)."""
        if self._sock is not None and self._sock.gettimeout() == 0.0:
            return  # already checked: the socket is in non-blocking mode for asyncio
        self.spawn()
        assert self._sock is not None and self._proc is not None
        parent = self._sock
        parent.settimeout(self.HANDSHAKE_TIMEOUT)
        try:
            hello = wire.recv_sync(parent)
        except (OSError, EOFError, msgspec.DecodeError) as exc:
            code = self._proc.wait(30) if self._proc.poll() is None else self._proc.returncode
            raise EngineUnavailable(f"the {self.label} exited ({code}) before it started: {exc}") from None
        if isinstance(hello, wire.Failed):
            self._proc.wait(30)
            raise EngineUnavailable(hello.message)
        assert isinstance(hello, wire.Hello)
        self.name, self.notice = hello.backend, hello.notice
        parent.settimeout(None)
        parent.setblocking(False)

    async def start(self) -> None:
        """Load the engine in the worker; EngineUnavailable or EngineDead (with the reason) when it cannot."""
        self.state = "starting"
        self.check()
        assert self._sock is not None
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=2**26)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read(reader), name=f"{self.label}-reader")
        self._outbox = wire.Outbox(self._writer)
        wire.send(self._writer, wire.Start())
        ready = await self._ready
        if isinstance(ready, wire.Failed):
            raise EngineUnavailable(ready.message)
        if not isinstance(ready, wire.Ready):
            raise EngineDead(f"the {self.label} died while starting its engine: {getattr(ready, 'message', ready)}")
        self.init_seconds, self.max_model_len = ready.init_seconds, ready.max_model_len
        self.chat_format, self.system_prompt = ready.chat_format, ready.system_prompt
        self.state = "up"

    async def restart(self) -> None:
        """A new worker process in this slot (after ``kill``): spawn, handshake, start its engine.

        A system prompt replaced through the API is given to the new worker too.
        """
        wanted = self.system_prompt
        self._fresh()
        self.spawn()  # on the event loop's thread (see spawn)
        await asyncio.to_thread(self.check)
        await self.start()
        if wanted and wanted != self.system_prompt:
            await self.set_system_prompt(wanted)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await wire.recv(reader)
                if isinstance(message, wire.Stats):
                    message.into(self.stats)
                    self.stats.generated += self._generated_before
                    if (message.finished, message.generated) != self._progress:
                        self._progress, self._progress_at = (message.finished, message.generated), time.monotonic()
                elif isinstance(message, wire.Deltas):
                    listener = self._listeners.get(message.id)
                    if listener is not None:
                        listener(message.pieces)
                elif isinstance(message, wire.Progress):
                    if (part := self._shares.get(message.id)) is not None:
                        part.update(message)
                elif isinstance(message, wire.Ready | wire.Failed):
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(message)
                    elif isinstance(message, wire.Failed):  # after Ready: its engine died, it is shutting down
                        self._died(f"the {self.label}'s engine died: {message.message}")
                else:
                    future = self._pending.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
            code = await asyncio.to_thread(procs.exit_code, self._proc, 2.0)
            self._died(f"the {self.label} stopped ({procs.describe_exit(code)}; {type(exc).__name__})")
        finally:
            self._died(f"the {self.label} stopped")

    def _died(self, reason: str) -> None:
        """This incarnation is over: every call in flight ends with ``reason`` (EngineDead, HTTP 503)."""
        self._dead = self._dead or reason
        for future in [*self._pending.values(), self._ready]:
            if future is not None and not future.done():
                future.set_result(wire.Dead(id=-1, message=self._dead))
        self._pending.clear()
        self.stats.in_flight = self.stats.running = self.stats.waiting = 0

    # --- serving --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.state == "up" and self.alive() is None

    def alive(self) -> str | None:
        if self._dead is not None:
            return self._dead
        if self._proc is not None and self._proc.poll() is not None:
            return f"the {self.label} exited ({procs.describe_exit(self._proc.returncode)})"
        return None

    def stalled(self, timeout: float) -> str | None:
        """Why this worker counts as stuck: calls in flight and no progress for ``timeout`` s (0: never)."""
        idle = time.monotonic() - self._progress_at
        if timeout <= 0 or not self._pending or idle < timeout:
            return None
        return (f"the {self.label}'s engine made no progress for {idle:.0f} s with {len(self._pending)} calls in "
                f"flight (ENGINE_STALL_TIMEOUT={timeout:g})")

    async def _call(self, make: Any, listener: Callable[[list[wire.Piece]], None] | None = None) -> Any:
        """Send one call and wait for its reply; cancelling the caller cancels the call in the worker."""
        if (problem := self.alive()) is not None or self._writer is None or self._outbox is None:
            raise EngineDead(problem or "the engine is not started")
        self._next += 1
        id_ = self._next
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._progress_at = time.monotonic()  # the stall clock runs while calls are in flight
        self._pending[id_] = future
        if listener is not None:
            self._listeners[id_] = listener
        try:
            self._outbox.send(make(id_))
            await self._writer.drain()
            reply = await future
        except asyncio.CancelledError:
            if self._pending.pop(id_, None) is not None and self._dead is None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self._outbox.send(wire.Cancel(id_))
            raise
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(id_, None)
            raise EngineDead(f"the {self.label} cannot be reached: {exc}") from None
        finally:
            self._listeners.pop(id_, None)
        if (error := raised_by(reply)) is None:
            return reply
        if isinstance(error, EngineDead):
            self._died(str(error))  # the worker's engine is gone (the worker exits): no later call may go there
        raise error

    async def answer(self, questions: list[str], sampling: Sampling, routed: Routed) -> wire.Answers:
        part = progress.share(self.label, len(questions))  # None outside a tracked request

        def ask(id_: int) -> wire.Ask:
            if part is not None:
                part.call, self._shares[id_] = id_, part
            return wire.Ask(id_, questions, sampling, routed.routes, routed.budgets)

        try:
            reply = await self._call(ask)
        finally:
            if part is not None and part.call is not None:
                self._shares.pop(part.call, None)
        if part is not None:
            part.done, part.tokens = part.total, max(part.tokens, reply.answers.tokens)
        return reply.answers

    async def generate(self, make: Callable[[int], wire.Generate],
                       on_pieces: Callable[[list[wire.Piece]], None] | None = None) -> wire.Generated:
        return await self._call(make, on_pieces)

    async def set_system_prompt(self, text: str) -> None:
        reply = await self._call(lambda id_: wire.SetPrompt(id_, text))
        self.system_prompt, self.chat_format = reply.system_prompt, reply.chat_format

    def pending(self) -> int:
        """Calls sent to the worker and not answered yet."""
        return len(self._pending)

    # --- ending ---------------------------------------------------------------------------------

    async def kill(self, reason: str) -> None:
        """End this incarnation now: its calls fail with ``reason``; its whole process group is SIGKILLed."""
        self.state, self.failure = "down", reason
        self._died(reason)
        if self._proc is not None:
            await asyncio.to_thread(procs.kill_tree, self._proc, self.label)
        self._close()

    async def shutdown(self) -> None:
        await self.stop_worker()
        from service.procs import reap_children

        await asyncio.to_thread(reap_children)

    async def stop_worker(self) -> None:
        """Ask the worker to stop its engine and wait for it to exit (killing it if it will not)."""
        proc, serving = self._proc, self.state == "up"
        self.state = "stopped"
        if proc is None:
            return
        self._dead = self._dead or "the engine is shut down"
        if serving and self._writer is not None and proc.poll() is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                if self._outbox is not None:
                    self._outbox.flush()  # calls and cancels still waiting for this round go first
                wire.send(self._writer, wire.Stop())
                await self._writer.drain()
        elif proc.poll() is None:
            proc.terminate()  # still starting (or restarting): nothing to drain, no need to wait for its engine
        await asyncio.to_thread(procs.stop_process, proc, self.settings.shutdown_timeout + 30)
        await asyncio.to_thread(procs.kill_tree, proc, self.label, False)  # whatever of its group outlived it
        self._close()

    def _close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        elif self._sock is not None:
            self._sock.close()


def engine_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: this one, for what the engine and its libraries read themselves (CUDA, OpenMP,
    caches); the service's own settings reach the worker parsed, in its Setup frame."""
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [_root(), environ.get("PYTHONPATH", "")]))}


def _root() -> str:
    from env import PROJECT_ROOT

    return str(PROJECT_ROOT)
