"""``python -m service.worker FD``: the engine worker, hosting a ``LocalEngineClient``.

Started by ``ProcessEngineClient`` with one end of a socket pair, in a session of its own (its process
group is its pid, and vLLM's processes join it).  Its first frame (Setup) carries the API process's parsed
settings; it imports the backend and says Hello (or Failed), then on Start loads the engine and answers
Ask/SetPrompt messages concurrently until Stop or until the API process goes away; either way the engine
and its processes are shut down before it exits.  Every call ends with its result or an error frame
(Dead: the engine is gone; Error: the call raised, its traceback logged here once); a Cancel stops a call
and aborts its questions in the engine.  When the engine dies, the worker answers its open calls with Dead
and exits with code 4, so that the API process restarts it.
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

import msgspec

from service.contract import wire
from service.contract.errors import EngineDead, EngineRejected, EngineUnavailable, reply_for
from service.logs import configure_logging
from service.procs import become_subreaper, freeze_heap, reap_children
from service.settings import Settings
from service.worker import progress
from service.worker.backends import build_engine
from service.worker.faults import NO_FAULTS, Faults
from service.worker.local import LocalEngineClient

log = logging.getLogger("service")
STATS_EVERY = 0.25


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the API process dies, so the engine never outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _watch(client: LocalEngineClient, writer: asyncio.StreamWriter, dead: asyncio.Future[str]) -> None:
    """Push the engine's stats when they change; resolve ``dead`` with the reason once the engine has died."""
    last = None
    while True:
        frame = wire.Stats.of(client.engine.stats)
        if frame != last:
            wire.send(writer, frame)
            last = frame
        for call in progress.pending_frames():  # per-call progress, at most once per STATS_EVERY
            wire.send(writer, call)
        if not dead.done() and (problem := client.engine.alive()) is not None:
            dead.set_result(problem)
        await asyncio.sleep(STATS_EVERY)


class Emitter:
    """Streamed pieces of one call, sent as one ``Deltas`` frame per round of the event loop (not per token)."""

    def __init__(self, call_id: int, outbox: wire.Outbox):
        self.call_id, self.outbox = call_id, outbox
        self.pieces: list[wire.Piece] = []

    def __call__(self, piece: wire.Piece) -> None:
        if not self.pieces:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pieces.append(piece)

    def flush(self) -> None:
        if self.pieces:
            pieces, self.pieces = self.pieces, []
            self.outbox.put(wire.frame(wire.Deltas(self.call_id, pieces)))


async def _handle(client: LocalEngineClient, message: wire.Ask | wire.Generate | wire.SetPrompt,
                  outbox: wire.Outbox, faults: Faults, dead: asyncio.Future[str]) -> None:
    """One call: its result, or an error frame for anything it raises. Cancelled (wire.Cancel): no reply."""
    reply: wire.Message
    try:
        if isinstance(message, wire.Ask):
            progress.begin(message.id, len(message.questions))
            await faults.apply(message.id, message.questions)
            answers = await client.answer(message)
            reply = wire.Answered(message.id, answers)
            await faults.answered(message.questions, dead)
        elif isinstance(message, wire.Generate):
            await faults.apply(message.id, [p for p in message.prompts if isinstance(p, str)]
                               + [m.get("content", "") for m in message.messages or []])
            emitter = Emitter(message.id, outbox) if message.stream else None
            reply = await client.complete(message, emitter)
            if emitter is not None:
                emitter.flush()  # the last pieces go before the end of the call
        else:
            await client.set_system_prompt(message.text)
            reply = wire.PromptSet(message.id, client.system_prompt, client.chat_format)
        body = wire.frame(reply)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every call ends: its caller gets the error (contract.errors), the traceback stays here
        if not isinstance(exc, EngineDead | EngineRejected):  # the engine is gone / refused before any work
            log.exception("call %d (%s) failed", message.id, type(message).__name__)
        body = wire.frame(reply_for(message.id, exc))
    outbox.put(body)
    with contextlib.suppress(ConnectionError, RuntimeError):  # the API process may be gone
        await outbox.writer.drain()


async def _receive(client: LocalEngineClient, reader: asyncio.StreamReader, outbox: wire.Outbox,
                   calls: dict[int, asyncio.Task[None]], faults: Faults, dead: asyncio.Future[str]) -> None:
    """Start a task per call, cancel one on Cancel; return on Stop or when the API process goes away."""
    while True:
        try:
            message = await wire.recv(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("the API process went away; stopping the engine")
            return
        if isinstance(message, wire.Stop):
            return
        if isinstance(message, wire.Cancel):
            task = calls.pop(message.id, None)
            if task is not None:
                task.cancel()
                log.info("call %d cancelled (its client went away): its questions are aborted", message.id)
        elif isinstance(message, wire.Ask | wire.Generate | wire.SetPrompt):
            task = asyncio.create_task(_handle(client, message, outbox, faults, dead))
            calls[message.id] = task
            task.add_done_callback(lambda _, id_=message.id: calls.pop(id_, None))


async def serve(client: LocalEngineClient, sock: socket.socket, faults: Faults = NO_FAULTS) -> int:
    """Start the engine on Start, then answer calls until Stop; the exit code (4: the engine died)."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**26)
    try:
        start = await wire.recv(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0
    if not isinstance(start, wire.Start):
        return 0
    calls: dict[int, asyncio.Task[None]] = {}
    background: list[asyncio.Task[None]] = []
    try:
        try:
            await client.start()
        except Exception as exc:  # any start-up failure ends in Failed with the reason, never in silence
            log.exception("engine start-up failed")
            wire.send(writer, wire.Failed(f"{type(exc).__name__}: {exc}", 1))
            await writer.drain()
            return 1
        freeze_heap("engine worker")  # before the first request, as vLLM's own server does
        wire.send(writer, wire.Ready(client.engine.init_seconds, client.engine.max_model_len, client.chat_format,
                                     client.system_prompt))
        dead: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        background.append(asyncio.create_task(_watch(client, writer, dead)))
        outbox = wire.Outbox(writer)
        receiving = asyncio.create_task(_receive(client, reader, outbox, calls, faults, dead))
        background.append(receiving)
        await asyncio.wait({receiving, dead}, return_when=asyncio.FIRST_COMPLETED)
        if not dead.done():
            return 0
        log.error("the engine died (%s); the engine worker exits so that it is restarted", dead.result())
        # Replies and pieces already put go first: a call answered in the round the death was seen keeps its
        # answer (the API process ends every open call at the first Dead or Failed frame).
        outbox.flush()
        for id_ in list(calls):
            wire.send(writer, wire.Dead(id_, dead.result()))
        wire.send(writer, wire.Failed(dead.result(), 4))  # the API process knows at once, not after our shutdown
        with contextlib.suppress(ConnectionError, RuntimeError):
            await writer.drain()
        return 4
    finally:
        for task in [*calls.values(), *background]:
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
    become_subreaper()  # a VLLM::Worker whose EngineCore died is re-parented here, and reaped at shutdown
    sock = socket.socket(fileno=int(argv[0]))
    try:
        setup = wire.recv_sync(sock)
        if not isinstance(setup, wire.Setup):
            raise TypeError(f"the first frame is {type(setup).__name__}, not Setup")
        settings = Settings.from_wire(setup.settings)
    except (OSError, EOFError, TypeError, msgspec.DecodeError) as exc:  # an API process of another version, or gone
        with contextlib.suppress(OSError):
            wire.send_sync(sock, wire.Failed(f"the engine worker got no settings: {exc}", 2))
        return 2
    configure_logging(settings.log_level)
    _hide_own_vllm_variables()
    try:
        faults = Faults.parse(settings.fault_inject)
    except ValueError as exc:
        wire.send_sync(sock, wire.Failed(str(exc), 2))
        return 2
    if faults != NO_FAULTS:
        log.warning("FAULT_INJECT=%r: test-only faults are switched on in this engine worker", settings.fault_inject)
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
    main_task = loop.create_task(serve(client, sock, faults))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    code = 0
    try:
        code = loop.run_until_complete(main_task)
    except asyncio.CancelledError:
        loop.run_until_complete(client.shutdown())
    finally:
        loop.close()
        reap_children()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
