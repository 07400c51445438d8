"""Questions in, answers out: formatting, routing, one engine submission, post-processing."""

from __future__ import annotations

import logging
import time

from service.contract.sampling import Sampling
from service.contract.wire import Answers
from service.logs import timing_level
from service.pipeline.prompting import Formatter, Planner
from service.pipeline.routing import Routed
from service.settings import Settings
from service.worker.backends.base import Engine, Item

log = logging.getLogger("service")


class Answerer:
    """Built once the engine is up (it needs the tokenizer); the system prompt can be replaced."""

    def __init__(self, settings: Settings, engine: Engine, system_prompt: str):
        from service.worker.backends.tokens import stop_token_ids

        self.settings = settings
        self.engine = engine
        self.stop_ids = stop_token_ids(engine.tokenizer)
        self.planner = self._planner(system_prompt)

    def _planner(self, system_prompt: str) -> Planner:
        decode_at_end = self.settings.detokenize_at_end and self.engine.name == "vllm"
        return Planner(self.settings, Formatter(self.engine.tokenizer, system_prompt), self.stop_ids, decode_at_end)

    @property
    def system_prompt(self) -> str:
        return self.planner.formatter.system

    def set_system_prompt(self, text: str) -> None:
        self.planner = self._planner(text)

    async def answer(self, questions: list[str], sampling: Sampling | None = None, routed: Routed | None = None) -> Answers:
        planner = self.planner
        started = time.perf_counter()
        plans = planner.plan(questions, sampling, routed)
        planned = time.perf_counter()
        outcomes = await self.engine.generate([Item(p.prompt, p.sampling) for p in plans])
        generated = time.perf_counter()
        texts: list[str] = []
        errors: list[tuple[int, str]] = []
        tokens = 0
        by_route: dict[str, int] = {}
        post = planner.post
        for index, (question, plan, outcome) in enumerate(zip(questions, plans, outcomes, strict=True)):
            if outcome.error is not None:
                errors.append((index, outcome.error))
                texts.append("")
                continue
            tokens += outcome.tokens
            by_route[plan.route] = by_route.get(plan.route, 0) + outcome.tokens
            texts.append(post(question, outcome.text, plan.short))
        log.log(timing_level(len(questions)), "%d questions: plan %.3f s, post %.3f s",
                len(questions), planned - started, time.perf_counter() - generated)
        return Answers.of(texts, errors, tokens, by_route)
