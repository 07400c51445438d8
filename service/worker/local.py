"""The worker's engine client: an ``Engine`` plus the answering pipeline, in the worker process."""

from __future__ import annotations

from typing import Any

from service.contract import wire
from service.contract.errors import EngineDead, EngineRejected
from service.pipeline.routing import Routed
from service.settings import Settings
from service.worker.backends.base import Engine


class LocalEngineClient:
    """An ``Engine`` plus the answering pipeline (``service.worker.answer.Answerer``) in this process."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.answerer: Any = None
        self.completer: Any = None
        self.chat_format: str | None = None
        self.system_prompt = ""

    @property
    def name(self) -> str:
        return self.engine.name

    async def start(self) -> None:
        from service.worker.answer import Answerer
        from service.worker.completer import Completer

        await self.engine.start()
        self.answerer = Answerer(self.settings, self.engine, self.settings.load_system_prompt())
        self.completer = Completer(self.settings, self.engine)
        self._describe()

    def _describe(self) -> None:
        self.system_prompt = self.answerer.system_prompt
        self.chat_format = "fast" if self.answerer.planner.formatter.fast else "template"

    def _require_started(self) -> None:
        """The worker's one readiness check: EngineDead until ``start`` built the answerer and the completer."""
        if self.answerer is None or self.completer is None:
            raise EngineDead("the engine is not started")

    async def answer(self, call: wire.Ask) -> wire.Answers:
        """A ``/predict`` call, routed as the API process decided."""
        self._require_started()
        return await self.answerer.answer(call.questions, call.sampling, Routed(call.routes, call.budgets))

    async def complete(self, call: wire.Generate, emit: Any) -> wire.Generated:
        """A ``/v1`` call: raw generation (``service.worker.completer``); ``emit`` gets streamed pieces."""
        self._require_started()
        if not hasattr(self.engine, "stream"):
            raise EngineRejected(f"the OpenAI-compatible API needs the vLLM backend; this worker runs {self.name} "
                                 "(USE_VLLM=false or its fallback)", None, "unsupported_backend")
        return await self.completer.complete(call, emit)

    async def set_system_prompt(self, text: str) -> None:
        self._require_started()
        self.answerer.set_system_prompt(text)
        self._describe()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
