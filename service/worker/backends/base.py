"""The engine layer's protocol: what the answering pipeline and the worker need from a backend."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from service.contract.errors import EngineUnavailable
from service.contract.wire import EngineStats

log = logging.getLogger("service")


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
