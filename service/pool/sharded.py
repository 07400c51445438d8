"""Several engine workers sharing the device (``ENGINE_WORKERS`` > 1), and the factory the app uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from service.contract import wire
from service.contract.errors import EngineCallFailed, EngineDead
from service.contract.sampling import Sampling
from service.contract.wire import EngineStats
from service.pipeline.balance import merge_arrays, plan_shards
from service.pipeline.routing import Routed
from service.pool import vllm_metrics
from service.pool.client import ProcessEngineClient, engine_environ
from service.settings import Settings

log = logging.getLogger("service")


class ShardedEngineClient:
    """Several ``ProcessEngineClient`` workers sharing the device (``ENGINE_WORKERS`` > 1).

    Each worker runs its own engine, so the engines' schedulers (single Python threads) run on separate
    cores.  A request's questions are dealt out so that every worker has the same predicted work
    (``service.pipeline.balance``), answered concurrently and put back in order; a single question goes to the
    worker with the fewest calls in flight.
    """

    def __init__(self, workers: list[ProcessEngineClient]):
        self.workers = workers
        self.notice: str | None = None

    @property
    def name(self) -> str:
        return self.workers[0].name

    @property
    def init_seconds(self) -> float | None:
        times = [w.init_seconds for w in self.workers if w.init_seconds is not None]
        return max(times) if times else None

    @property
    def max_model_len(self) -> int:
        return min(w.max_model_len for w in self.workers)

    @property
    def chat_format(self) -> str | None:
        return self.workers[0].chat_format

    @property
    def system_prompt(self) -> str:
        return self.workers[0].system_prompt

    @property
    def stats(self) -> EngineStats:
        total = EngineStats()
        for w in self.workers:
            s = w.stats
            total.in_flight += s.in_flight
            total.peak_in_flight += s.peak_in_flight
            total.running += s.running
            total.peak_running += s.peak_running
            total.waiting += s.waiting
            total.finished += s.finished
            total.generated += s.generated
            total.has_scheduler = total.has_scheduler or s.has_scheduler
        return total

    def spawn(self) -> None:
        for w in self.workers:
            w.spawn()

    def check(self) -> None:
        self.spawn()
        for w in self.workers:
            w.check()
        self.notice = self.workers[0].notice

    async def start(self) -> None:
        """Start the engines: all at once with a fixed KV-cache size, else one after another."""
        if self.workers[0].settings.engines_start_together:
            log.info("starting %d engine workers at once (fixed KV cache)", len(self.workers))
            await asyncio.gather(*(w.start() for w in self.workers))
            return
        log.info("starting %d engine workers one after another (KV cache sized by profiling)", len(self.workers))
        for worker in self.workers:
            await worker.start()

    def alive(self) -> str | None:
        """None while at least one worker is up (the others may be restarting), else why none is."""
        if any(w.up for w in self.workers):
            return None
        return next((problem for w in self.workers if (problem := w.alive()) is not None), "no engine worker is up")

    def _up(self) -> list[ProcessEngineClient]:
        up = [w for w in self.workers if w.up]
        if not up:
            raise EngineDead(self.alive() or "no engine worker is up")
        return up

    async def answer(self, questions: list[str], sampling: Sampling, routed: Routed) -> wire.Answers:
        """Over the workers that are up; a shard whose worker fails becomes item errors naming its indices.

        Cancelling the caller cancels every shard's call (each worker aborts its questions).  Only when every
        shard failed does the request fail as a whole (with the first shard's error).
        """
        up = self._up()
        if len(questions) == 1 or len(up) == 1:
            worker = min(up, key=lambda w: w.pending())
            return await worker.answer(questions, sampling, routed)
        shards = plan_shards(questions, routed, len(up))
        workers = up[:len(shards)]
        parts = await asyncio.gather(*(w.answer([questions[i] for i in shard], sampling, routed.take(shard))
                                       for w, shard in zip(workers, shards, strict=True)), return_exceptions=True)
        failed = [p for p in parts if isinstance(p, BaseException)]
        if len(failed) == len(parts):
            raise failed[0]
        if unexpected := [p for p in failed if not isinstance(p, EngineDead | EngineCallFailed)]:
            raise unexpected[0]
        errors: list[tuple[int, str]] = []
        by_route: dict[str, int] = {}
        arrays: list[bytes] = []
        for worker, shard, part in zip(workers, shards, parts, strict=True):
            if isinstance(part, BaseException):
                log.error("%s failed its %d questions of a request: %s", worker.label, len(shard), part)
                errors.extend((index, f"{worker.label}: {part}") for index in shard)
                arrays.append(wire.Answers.of([""] * len(shard), [], 0, {}).texts_json)
                continue
            errors.extend((shard[index], message) for index, message in part.errors)
            for route, count in part.tokens_by_route.items():
                by_route[route] = by_route.get(route, 0) + count
            arrays.append(part.texts_json)
        texts = merge_arrays(shards, arrays, len(questions))
        tokens = sum(p.tokens for p in parts if isinstance(p, wire.Answers))
        return wire.Answers(texts, sorted(errors), tokens, by_route)

    async def generate(self, make: Callable[[int], wire.Generate],
                       on_pieces: Callable[[list[wire.Piece]], None] | None = None) -> wire.Generated:
        """A ``/v1`` call goes whole to the worker with the fewest calls in flight (its prompts batch there)."""
        worker = min(self._up(), key=lambda w: w.pending())
        return await worker.generate(make, on_pieces)

    async def set_system_prompt(self, text: str) -> None:
        """On every worker that is up (a restarting worker starts with the settings' system prompt)."""
        await asyncio.gather(*(w.set_system_prompt(text) for w in self._up()))

    async def shutdown(self) -> None:
        from service.procs import reap_children

        await asyncio.gather(*(w.stop_worker() for w in self.workers))
        await asyncio.to_thread(reap_children)  # once, after every worker has stopped its engine


def engine_client(settings: Settings, environ: Mapping[str, str]) -> ProcessEngineClient | ShardedEngineClient:
    """The server's engine client: one worker process, or ``ENGINE_WORKERS`` of them."""
    env = engine_environ(environ)
    if settings.engine_workers == 1:
        client: ProcessEngineClient | ShardedEngineClient = ProcessEngineClient(settings, env)
    else:
        n = settings.engine_workers
        client = ShardedEngineClient([ProcessEngineClient(settings, env, f"engine worker {i + 1} of {n}")
                                      for i in range(n)])
    vllm_metrics.prepare(client.workers, settings.engine_stats)  # vLLM's metrics, per worker (service.pool.vllm_metrics)
    return client
