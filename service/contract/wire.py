"""Messages between the API process and the engine worker: length-prefixed msgpack frames."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import Struct

from service.contract.sampling import Sampling


@dataclass(slots=True)
class EngineStats:
    """Counters the engine layer keeps for /metrics (the engine's own scheduler numbers included)."""

    in_flight: int = 0
    peak_in_flight: int = 0
    running: int = 0
    peak_running: int = 0
    waiting: int = 0
    has_scheduler: bool = False  # running/waiting are the engine's own counts (ENGINE_STATS=1 with vLLM)
    # Progress counters (only ever grow): a worker with questions in flight whose counters stand still for
    # ENGINE_STALL_TIMEOUT seconds is stuck (service.pool.client).
    finished: int = 0  # questions the engine finished (answered, rejected or aborted)
    generated: int = 0  # tokens generated, as the engine reports them step by step (ENGINE_STATS=1 with vLLM)
    extra: dict[str, float] = field(default_factory=dict)

    def enter(self, n: int = 1) -> None:
        self.in_flight += n
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self, n: int = 1) -> None:
        self.in_flight -= n

    def scheduler(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        self.peak_running = max(self.peak_running, running)


_LEN = struct.Struct("!I")


class Answers(Struct):
    """One request's result: answers in order, per-item errors, generated tokens (total and by route).

    The answers travel as one JSON array (``texts_json``), encoded by the engine worker that made them.
    With several workers each encodes its own share at the same time, and the API process only puts the
    items back in order (``service.pipeline.balance.merge_arrays``) instead of decoding and re-encoding every answer.
    """

    texts_json: bytes
    errors: list[tuple[int, str]]
    tokens: int
    tokens_by_route: dict[str, int]

    @classmethod
    def of(cls, texts: list[str], errors: list[tuple[int, str]], tokens: int,
           tokens_by_route: dict[str, int]) -> Answers:
        return cls(_json_encoder.encode(texts), errors, tokens, tokens_by_route)

    def texts(self) -> list[str]:
        return msgspec.json.decode(self.texts_json, type=list[str])


# API -> worker
class Setup(Struct, tag=True):
    """The worker's first frame: the API process's parsed settings (``Settings.to_wire``), so that both processes
    run on the same values, parsed and derived once (the worker reads no defaults and probes no hardware)."""

    settings: bytes


class Start(Struct, tag=True):
    """Load the engine (after the worker's Hello)."""


class Ask(Struct, tag=True):
    """A ``/predict`` call: the questions, the request's sampling values, and each question's route and budget
    as the API process decided them (``service.pipeline.routing.route_all``)."""

    id: int
    questions: list[str]
    sampling: Sampling
    routes: list[str]
    budgets: list[int]


class Generate(Struct, tag=True, kw_only=True):
    """A ``/v1`` call: raw generation for ``prompts`` (texts or token ids) or for one chat ``messages``.

    ``stream``: the worker sends ``Deltas`` as tokens come, then ``Generated``; otherwise only ``Generated``.
    """

    id: int
    prompts: list[str | list[int]] = []
    messages: list[dict[str, str]] | None = None
    template_kwargs: dict[str, Any] | None = None
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    stream: bool = False
    echo: bool = False


class SetPrompt(Struct, tag=True):
    id: int
    text: str


class Cancel(Struct, tag=True):
    """The caller of call ``id`` went away: stop it (its questions are aborted in the engine); no reply."""

    id: int


class Stop(Struct, tag=True):
    pass


# worker -> API
class Hello(Struct, tag=True):
    backend: str
    notice: str | None


class Failed(Struct, tag=True):
    """Before Ready: the worker could not start (``code``: its exit code).  After Ready: its engine died and the
    worker is exiting (code 4); the API process treats it as dead at once."""

    message: str
    code: int


class Ready(Struct, tag=True):
    init_seconds: float | None
    max_model_len: int
    chat_format: str | None
    system_prompt: str


class Answered(Struct, tag=True):
    id: int
    answers: Answers


class PromptSet(Struct, tag=True):
    id: int
    system_prompt: str
    chat_format: str | None


class TokenLogprob(Struct, array_like=True):
    """One token's log probability and the ``top`` alternatives ((token, logprob), most likely first)."""

    token: str
    token_id: int
    logprob: float | None
    top: list[tuple[str, float]]


class Piece(Struct, array_like=True):
    """Generated text of prompt ``index``: a streamed delta, or (in ``Generated``) the whole completion."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Deltas(Struct, tag=True):
    """New text of a streaming ``Generate`` call, coalesced per round of the worker's event loop."""

    id: int
    pieces: list[Piece]


class Generated(Struct, tag=True, kw_only=True):
    """The end of a ``Generate`` call: one piece per prompt (its whole text unless streamed) and the counts."""

    id: int
    choices: list[Piece]
    prompt_tokens: int
    completion_tokens: int
    prompts: list[str] = []  # the prompts as text, for ``echo``
    prompt_logprobs: list[list[TokenLogprob]] | None = None


class Invalid(Struct, tag=True):
    """Call ``id`` was refused before any work (a prompt too long, a value the engine rejects): HTTP 400."""

    id: int
    message: str
    param: str | None
    code: str | None


class Dead(Struct, tag=True):
    """Call ``id`` failed because the engine is gone (HTTP 503)."""

    id: int
    message: str


class Error(Struct, tag=True):
    """Call ``id`` raised in the worker (its traceback is in the worker's log); the engine is fine (HTTP 500)."""

    id: int
    message: str
    kind: str  # the exception's class name


class Stats(Struct, tag=True):
    """The worker's ``EngineStats`` (same field names), pushed when they change."""

    in_flight: int
    peak_in_flight: int
    running: int
    peak_running: int
    waiting: int
    has_scheduler: bool
    finished: int
    generated: int

    @classmethod
    def of(cls, stats: Any) -> Stats:
        """The frame for an ``EngineStats``."""
        return cls(**{name: getattr(stats, name) for name in cls.__struct_fields__})

    def into(self, stats: Any) -> None:
        """Copy these values into an ``EngineStats``; peaks only grow (a restarted worker starts from 0)."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            setattr(stats, name, max(value, getattr(stats, name)) if name.startswith("peak_") else value)


class Progress(Struct, tag=True):
    """Call ``id``: ``done`` of its ``total`` questions finished, ``tokens`` generated (service.pool.progress)."""

    id: int
    done: int
    total: int
    tokens: int


Message = (Setup | Start | Ask | Generate | SetPrompt | Cancel | Stop | Hello | Failed | Ready | Answered | PromptSet | Dead
           | Error | Stats | Deltas | Generated | Invalid | Progress)
_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(frame(message))


class Outbox:
    """Frames to the other process, written together once per round of the event loop.

    Both ends use one: the API process for its calls (a burst of a thousand requests is a thousand ``Generate``
    frames), the worker for its replies and ``Deltas`` (every engine step gives each streaming call one).  One
    write per round instead of one per frame: many small writes into a full socket cost the writer more than
    the work itself (measured: docs/performance.md, "/v1 against vllm serve").  Frames leave in the order they
    were put, so a call's last pieces always go before its reply, and a Cancel after its call.
    """

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.frames: list[bytes] = []

    def send(self, message: Message) -> None:
        self.put(frame(message))

    def put(self, data: bytes) -> None:
        if not self.frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self.frames.append(data)

    def flush(self) -> None:
        if self.frames:
            data, self.frames = b"".join(self.frames), []
            with contextlib.suppress(ConnectionError, RuntimeError):  # the API process may be gone
                self.writer.write(data)


async def recv(reader: asyncio.StreamReader) -> Message:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return _decoder.decode(await reader.readexactly(size))


def send_sync(sock: socket.socket, message: Message) -> None:
    sock.sendall(frame(message))


def recv_sync(sock: socket.socket) -> Message:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = sock.recv(left)
            if not chunk:
                raise EOFError("the other side closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (size,) = _LEN.unpack(exactly(_LEN.size))
    return _decoder.decode(exactly(size))
