"""``python -m service.pool.worker FD``: the engine worker, hosting a ``LocalEngineClient``.

Started by ``ProcessEngineClient`` with one end of a socket pair.  It builds the settings from its
environment (the API process's), imports the backend and says Hello (or Failed), then on Start loads
the engine and answers Ask/SetPrompt messages concurrently until Stop or until the API process goes
away; either way the engine and its processes are shut down before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import Any

from service.backends import build_engine
from service.backends.base import Engine, EngineDead, EngineStats, EngineUnavailable
from service.pipeline.prompting import Overrides
from service.pool import wire
from service.pool.procs import freeze_heap, reap_children
from service.settings import Settings, SettingsError

log = logging.getLogger("service")
STATS_EVERY = 0.25


class LocalEngineClient:
    """An ``Engine`` plus the answering pipeline (``service.pipeline.answer.Answerer``) in this process."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.answerer: Any = None
        self.chat_format: str | None = None
        self.system_prompt = ""

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def notice(self) -> str | None:
        return self.engine.notice

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def init_seconds(self) -> float | None:
        return self.engine.init_seconds

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check(self) -> None:
        self.engine.check()

    async def start(self) -> None:
        from service.pipeline.answer import Answerer

        await self.engine.start()
        self.answerer = Answerer(self.settings, self.engine, self.settings.load_system_prompt())
        self._describe()

    def _describe(self) -> None:
        self.system_prompt = self.answerer.system_prompt
        self.chat_format = "fast" if self.answerer.planner.formatter.fast else "template"

    def alive(self) -> str | None:
        return self.engine.alive()

    async def answer(self, questions: list[str], overrides: Overrides) -> wire.Answers:
        if self.answerer is None:
            raise EngineDead("the engine is not started")
        return await self.answerer.answer(questions, overrides)

    async def set_system_prompt(self, text: str) -> None:
        if self.answerer is None:
            raise EngineDead("not ready: the system prompt can be replaced once the engine is up")
        self.answerer.set_system_prompt(text)
        self._describe()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the API process dies, so the engine never outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _push_stats(client: LocalEngineClient, writer: asyncio.StreamWriter) -> None:
    last = None
    while True:
        s = client.stats
        now = (s.in_flight, s.peak_in_flight, s.running, s.peak_running, s.waiting, s.has_scheduler)
        if now != last:
            wire.send(writer, wire.Stats(*now))
            last = now
        await asyncio.sleep(STATS_EVERY)


async def _handle(client: LocalEngineClient, message: wire.Ask | wire.SetPrompt, writer: asyncio.StreamWriter) -> None:
    try:
        if isinstance(message, wire.Ask):
            answers = await client.answer(message.questions, wire.overrides_in(message.overrides))
            wire.send(writer, wire.Answered(message.id, answers))
        else:
            await client.set_system_prompt(message.text)
            wire.send(writer, wire.PromptSet(message.id, client.system_prompt, client.chat_format))
    except EngineDead as exc:
        wire.send(writer, wire.Dead(message.id, str(exc)))
    await writer.drain()


async def serve(client: LocalEngineClient, sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**26)
    try:
        start = await wire.recv(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    if not isinstance(start, wire.Start):
        return
    tasks: set[asyncio.Task[None]] = set()
    try:
        try:
            await client.start()
        except (EngineUnavailable, EngineDead, OSError, RuntimeError, ValueError) as exc:
            log.error("engine start-up failed: %s: %s", type(exc).__name__, exc)
            wire.send(writer, wire.Failed(f"{type(exc).__name__}: {exc}", 1))
            await writer.drain()
            return
        freeze_heap("engine worker")  # before the first request, as vLLM's own server does
        wire.send(writer, wire.Ready(client.init_seconds, client.max_model_len, client.chat_format,
                                     client.system_prompt))
        tasks.add(asyncio.create_task(_push_stats(client, writer)))
        while True:
            try:
                message = await wire.recv(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("the API process went away; stopping the engine")
                break
            if isinstance(message, wire.Stop):
                break
            if isinstance(message, wire.Ask | wire.SetPrompt):
                task = asyncio.create_task(_handle(client, message, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await client.shutdown()
        writer.close()


def _hide_own_vllm_variables() -> None:
    """Drop this project's ``VLLM_*`` settings (already parsed) from the engine's environment.

    vLLM reads variables with that prefix itself and warns about each one it does not know
    (``VLLM_MAX_NUM_SEQS`` and the like are SPEC names of this project, passed as engine arguments).
    """
    own = {f.name.upper() for f in dataclasses.fields(Settings)}
    for key in [k for k in os.environ if k.startswith("VLLM_") and k in own]:
        del os.environ[key]


def main(argv: list[str]) -> int:
    # Out of the terminal's process group: a Ctrl-C reaches only the API process, which drains its
    # requests and then sends Stop; the worker (and the engine processes it starts) follow that.
    with contextlib.suppress(OSError):
        os.setsid()
    _die_with_parent()
    sock = socket.socket(fileno=int(argv[0]))
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        wire.send_sync(sock, wire.Failed(str(exc), 2))
        return 2
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s [service] %(message)s", stream=sys.stderr)
    _hide_own_vllm_variables()
    try:
        engine = build_engine(settings)
        engine.check()
    except EngineUnavailable as exc:
        wire.send_sync(sock, wire.Failed(str(exc), 3))
        return 3
    wire.send_sync(sock, wire.Hello(engine.name, engine.notice))
    # SIGTERM (the API process died, or it gave up waiting) or SIGINT ends serve() cleanly.
    loop = asyncio.new_event_loop()
    client = LocalEngineClient(settings, engine)
    main_task = loop.create_task(serve(client, sock))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        loop.run_until_complete(main_task)
    except asyncio.CancelledError:
        loop.run_until_complete(client.shutdown())
    finally:
        loop.close()
        reap_children()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
