"""The engine layer's protocol: what the answering pipeline and the worker need from a backend."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.settings import Settings

log = logging.getLogger("service")


class EngineUnavailable(RuntimeError):
    """The chosen backend cannot be imported or started; the message says why and what to do."""


class EngineDead(RuntimeError):
    """The engine stopped working while serving; requests get HTTP 503."""


class EngineCallFailed(RuntimeError):
    """One call to the engine raised (in the worker) while the engine itself is fine; the request gets HTTP 500.

    ``kind`` is the exception's class name in the worker, where its traceback is logged.
    """

    def __init__(self, message: str, kind: str = "RuntimeError"):
        super().__init__(message)
        self.kind = kind


class EngineRejected(ValueError):
    """The engine refused a call before doing any work (a prompt longer than the context, a value it rejects):
    the request gets HTTP 400 naming ``param``; ``code`` is OpenAI's (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(slots=True)
class Item:
    """One question for the engine: its chat-formatted prompt and ``SamplingParams`` keyword arguments."""

    prompt: str
    sampling: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """The engine's answer to one item: text and generated-token count, or an error message."""

    text: str = ""
    tokens: int = 0
    error: str | None = None
    token_ids: list[int] | None = None  # set while the text is still to be decoded (``detokenize=False``)


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


class Engine(Protocol):
    """What the app needs from a backend."""

    name: str
    notice: str | None  # set when the backend was chosen by fallback (USE_VLLM=auto)
    stats: EngineStats
    init_seconds: float | None  # how long ``start`` took

    def check(self) -> None:
        """Import the backend now (fast); raise EngineUnavailable with the reason."""

    async def start(self) -> None:
        """Load the model; afterwards ``tokenizer`` is set."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    def alive(self) -> str | None:
        """None when healthy, else why not."""

    async def generate(self, items: list[Item]) -> list[Outcome]:
        """Answer every item, each on its own: a bad item gets ``Outcome.error``; EngineDead fails all."""

    def stream(self, prompt: list[int], sampling: dict[str, Any], delta: bool) -> AsyncIterator[Any]:
        """One prompt's vLLM ``RequestOutput``s: each step's new tokens (``delta``) or only the final one.

        Stopping the iteration (or cancelling its task) aborts the request in the engine.  EngineRejected
        when the engine refuses it, EngineDead when the engine is gone.
        """

    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""


def timing_level(questions: int) -> int:
    """Log level of a request's stage timings: INFO for a batch (64 questions or more), else DEBUG."""
    return logging.INFO if questions >= 64 else logging.DEBUG


def engines_start_together(settings: Settings) -> bool:
    """Whether several engines on one device may start at once.

    vLLM sizes the KV cache by profiling the device's free memory, which another engine starting beside it
    would disturb (and vLLM asserts on); a fixed ``VLLM_KV_CACHE_MEMORY_BYTES`` skips that profiling.
    """
    return settings.vllm_kv_cache_memory_bytes is not None


def _importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_import(module: str, backend: str, hint: str) -> None:
    """Raise EngineUnavailable naming the backend, the import error and what to do."""
    problem = _importable(module)
    if problem is not None:
        raise EngineUnavailable(f"{backend} cannot be imported ({problem}). {hint}")
