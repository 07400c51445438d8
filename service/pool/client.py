"""What the app talks to: an ``EngineClient`` that answers questions (like vLLM's ``EngineClient``).

``ProcessEngineClient`` is the API process's side of one engine worker (``python -m service.pool.worker``,
which hosts the engine and the answering pipeline in a ``LocalEngineClient``), reached over a socket pair
with msgpack frames.  The API process then imports neither vLLM nor torch (about 80 MB instead of 600 MB)
and a crashing engine cannot take the HTTP side down with it.  The engine's own processes are children of
the worker; shutdown stops the worker and every descendant.  Several workers: ``service.pool.sharded``.
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
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from service.backends.base import EngineDead, EngineStats, EngineUnavailable
from service.pipeline.prompting import Overrides
from service.pool import wire
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

    def check(self) -> None:
        """Make sure the backend imports (fast); raise EngineUnavailable saying why."""

    async def start(self) -> None:
        """Load the model and build the answering pipeline."""

    def alive(self) -> str | None:
        """None when healthy, else why not."""

    async def answer(self, questions: list[str], overrides: Overrides) -> wire.Answers:
        """One answer per question, in order; per-item errors inside; EngineDead when nothing can be answered."""

    async def set_system_prompt(self, text: str) -> None: ...

    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""


class ProcessEngineClient:
    """A ``LocalEngineClient`` in a worker process, driven over a socket pair."""

    HANDSHAKE_TIMEOUT = 300.0

    def __init__(self, settings: Settings, environ: Mapping[str, str]):
        self.settings = settings
        self.environ = dict(environ)
        self.name = settings.backend
        self.notice: str | None = None
        self.stats = EngineStats()
        self.init_seconds: float | None = None
        self.max_model_len = settings.max_model_len
        self.chat_format: str | None = None
        self.system_prompt = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ready: asyncio.Future[Any] | None = None
        self._next = 0
        self._dead: str | None = None

    # --- start-up -------------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the worker process (it begins importing the backend at once)."""
        if self._proc is not None:
            return
        parent, child = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "service.pool.worker", str(child.fileno())],
            pass_fds=(child.fileno(),), env=self.environ, close_fds=True,
        )
        child.close()
        self._sock = parent

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
            raise EngineUnavailable(f"the engine worker exited ({code}) before it started: {exc}") from None
        if isinstance(hello, wire.Failed):
            self._proc.wait(30)
            raise EngineUnavailable(hello.message)
        assert isinstance(hello, wire.Hello)
        self.name, self.notice = hello.backend, hello.notice
        parent.settimeout(None)
        parent.setblocking(False)

    async def start(self) -> None:
        self.check()
        assert self._sock is not None
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=2**26)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reader_task = asyncio.create_task(self._read(reader), name="engine-worker-reader")
        wire.send(self._writer, wire.Start())
        ready = await self._ready
        if isinstance(ready, wire.Failed):
            raise EngineUnavailable(ready.message)
        self.init_seconds, self.max_model_len = ready.init_seconds, ready.max_model_len
        self.chat_format, self.system_prompt = ready.chat_format, ready.system_prompt

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await wire.recv(reader)
                if isinstance(message, wire.Stats):
                    self.stats.in_flight, self.stats.waiting = message.in_flight, message.waiting
                    self.stats.peak_in_flight = max(self.stats.peak_in_flight, message.peak_in_flight)
                    self.stats.running = message.running
                    self.stats.peak_running = max(self.stats.peak_running, message.peak_running)
                    self.stats.has_scheduler = message.has_scheduler
                elif isinstance(message, wire.Ready | wire.Failed):
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(message)
                else:
                    future = self._pending.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
            code = self._proc.poll() if self._proc else None
            self._dead = f"the engine worker stopped (exit code {code}): {type(exc).__name__}"
        finally:
            self._dead = self._dead or "the engine worker stopped"
            for future in [*self._pending.values(), self._ready]:
                if future is not None and not future.done():
                    future.set_result(wire.Dead(id=-1, message=self._dead))
            self._pending.clear()

    # --- serving --------------------------------------------------------------------------------

    def alive(self) -> str | None:
        if self._dead is not None:
            return self._dead
        if self._proc is not None and self._proc.poll() is not None:
            return f"the engine worker exited with {self._proc.returncode}"
        return None

    async def _call(self, make: Any) -> Any:
        if (problem := self.alive()) is not None or self._writer is None:
            raise EngineDead(problem or "the engine is not started")
        self._next += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        wire.send(self._writer, make(self._next))
        await self._writer.drain()
        reply = await future
        if isinstance(reply, wire.Dead):
            raise EngineDead(reply.message)
        return reply

    async def answer(self, questions: list[str], overrides: Overrides) -> wire.Answers:
        reply = await self._call(lambda id_: wire.Ask(id_, questions, wire.overrides_out(overrides)))
        return reply.answers

    async def set_system_prompt(self, text: str) -> None:
        reply = await self._call(lambda id_: wire.SetPrompt(id_, text))
        self.system_prompt, self.chat_format = reply.system_prompt, reply.chat_format

    # --- shutdown -------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        await self.stop_worker()
        from service.pool.procs import reap_children

        await asyncio.to_thread(reap_children)

    def pending(self) -> int:
        """Calls sent to the worker and not answered yet."""
        return len(self._pending)

    async def stop_worker(self) -> None:
        """Ask the worker to stop its engine and wait for it to exit (killing it if it will not)."""
        proc = self._proc
        if proc is None:
            return
        self._dead = self._dead or "the engine is shut down"
        if self._writer is not None and proc.poll() is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                wire.send(self._writer, wire.Stop())
                await self._writer.drain()
        await asyncio.to_thread(_stop_process, proc, self.settings.shutdown_timeout + 30)
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the worker to stop its engine and exit; SIGTERM, then SIGKILL, if it does not."""
    started = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("engine worker did not stop within %.0f s; terminating it", timeout)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log.info("engine worker exited with %s after %.1f s", proc.returncode, time.monotonic() - started)


def engine_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: this one (its settings are built from it, so both sides agree)."""
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [_root(), environ.get("PYTHONPATH", "")]))}


def _root() -> str:
    from env import PROJECT_ROOT

    return str(PROJECT_ROOT)
