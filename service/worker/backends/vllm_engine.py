"""vLLM's async engine (V1) behind the service's ``Engine`` protocol.

One ``AsyncLLM`` serves every request: a list request submits all of its questions at once, each with
its own sampling parameters, and concurrent requests batch together inside the engine (no lock).
``BATCH_CONCURRENCY`` bounds the questions in flight over all requests.  Prompts are tokenised in one
batch call per request (the fast tokenizer spreads it over the cores) and passed as token ids.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from service.contract.errors import EngineDead, EngineRejected
from service.contract.wire import EngineStats
from service.logs import timing_level
from service.procs import reap_children
from service.settings import Settings
from service.worker import progress
from service.worker.backends.base import Item, Outcome, require_import
from service.worker.backends.tokens import decode_answers, encode_prompts
from service.worker.backends.vllm_args import engine_args

log = logging.getLogger("service")

VLLM_HINT = (
    "USE_VLLM=true requires vLLM: install it (`pip install -r requirements/cpu.txt` on a CPU host, "
    "requirements/gpu.txt on a GPU host, or `inv run` without --skip-install), or set USE_VLLM=false "
    "to serve with transformers (slow)."
)


def rejected_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for one bad question: ``ValueError`` and its ``VLLMClientError`` (not a ValueError)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # an older vLLM: its validation errors are ValueErrors
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _stat_logger_factory(stats: EngineStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerGauge(StatLoggerBase):
        """Copies the scheduler's running/waiting counts into the service's stats."""

        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                stats.scheduler(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
            if iteration_stats is not None:
                stats.generated += iteration_stats.num_generation_tokens  # the stall detector's progress

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerGauge


class VllmEngine:
    """vLLM owned by the app's lifespan (``start`` / ``shutdown``), behind one of two front ends.

    ``ENGINE_FRONTEND=async``: ``AsyncLLM`` (vLLM's API server's), one task per question.
    ``ENGINE_FRONTEND=sync``: ``LLMEngine`` stepped on one thread as ``LLM.generate`` does
    (``service.worker.backends.vllm_step.StepLoop``).  Both share the engine arguments, the prompts (token ids) and the
    sampling parameters; concurrent requests batch together in the engine with either.
    """

    name = "vllm"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.notice: str | None = None
        self.stats = EngineStats()
        self._llm: Any = None  # AsyncLLM or LLMEngine
        self._steps: Any = None  # the StepLoop driving an LLMEngine
        self._tokenizer: Any = None
        self._ids = itertools.count()
        self._gate = asyncio.Semaphore(settings.batch_concurrency)
        self._dead: str | None = None
        self.init_seconds: float | None = None

    def check(self) -> None:
        require_import("vllm", "vLLM", VLLM_HINT)
        if self.settings.engine_frontend == "sync":
            require_import("vllm.v1.engine.llm_engine", "vLLM's LLMEngine", VLLM_HINT)
        else:
            require_import("vllm.v1.engine.async_llm", "vLLM's async engine", VLLM_HINT)

    async def start(self) -> None:
        self.check()
        s = self.settings
        if s.vllm_max_num_seqs and s.batch_concurrency < s.vllm_max_num_seqs:
            log.warning("BATCH_CONCURRENCY=%d < VLLM_MAX_NUM_SEQS=%d: the engine's batch can never be full",
                        s.batch_concurrency, s.vllm_max_num_seqs)
        # Without ENGINE_STATS the engine keeps no statistics: vLLM's stat loggers (its log line, Prometheus)
        # would otherwise run in this process for every generated token, beside the answers' own work.
        loggers = [_stat_logger_factory(self.stats)] if s.engine_stats else None
        self.stats.has_scheduler = s.engine_stats
        started = time.perf_counter()
        # Building the engine blocks (model load, profiling); keep the event loop answering health.
        if s.engine_frontend == "sync":
            from vllm.engine.arg_utils import EngineArgs
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.exceptions import EngineDeadError
            from vllm.v1.engine.llm_engine import LLMEngine

            from service.worker.backends.vllm_step import StepLoop

            args = EngineArgs(**engine_args(s), disable_log_stats=not s.engine_stats)
            self._llm = await asyncio.to_thread(LLMEngine.from_engine_args, args, UsageContext.LLM_CLASS, loggers)
            self._steps = StepLoop(self._llm, asyncio.get_running_loop(), s.batch_concurrency, EngineDeadError,
                                   self.stats)
            self._steps.start()
        else:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(**engine_args(s), disable_log_stats=not s.engine_stats)
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        self._tokenizer = self._llm.get_tokenizer()
        self.init_seconds = time.perf_counter() - started
        log.info("vLLM engine ready in %.1f s (model %s, %s front end)", self.init_seconds, s.model_dir,
                 "LLMEngine" if self._steps is not None else "AsyncLLM")

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._llm.model_config.max_model_len if self._llm is not None else self.settings.max_model_len

    def alive(self) -> str | None:
        if self._dead is not None:
            return self._dead
        if self._steps is not None:
            resources = getattr(self._llm.engine_core, "resources", None)
            if getattr(resources, "engine_dead", False):
                return "vLLM engine died: its engine core process stopped"
            return self._steps.problem
        if self._llm is not None and self._llm.errored:
            return f"vLLM engine died: {self._llm.dead_error}"
        return None

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of many prompts in one call (the fast tokenizer uses every core)."""
        return encode_prompts(self._tokenizer, prompts)

    async def generate(self, items: list[Item]) -> list[Outcome]:
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if (problem := self.alive()) is not None:
            raise EngineDead(problem)
        started = time.perf_counter()
        prompts = [item.prompt for item in items]
        if self.settings.pretokenize:
            ids = await asyncio.to_thread(self.encode, prompts) if len(prompts) > 8 else self.encode(prompts)
        else:
            ids = [None] * len(prompts)
        tokenized = time.perf_counter()
        limit = self.max_model_len
        params: dict[int, Any] = {}
        outcomes: list[Outcome | None] = [None] * len(items)
        requests: list[tuple[int, Any, Any]] = []  # (index, prompt, sampling params)
        for index, (item, token_ids) in enumerate(zip(items, ids, strict=True)):
            if token_ids is not None and len(token_ids) >= limit:
                outcomes[index] = Outcome(error=f"the question is {len(token_ids)} tokens after chat formatting; "
                                                f"MAX_MODEL_LEN={limit} leaves no room for an answer")
                continue
            sp = params.get(id(item.sampling))
            if sp is None:
                try:
                    sp = SamplingParams(**item.sampling, output_kind=RequestOutputKind.FINAL_ONLY)
                except rejected_errors() as exc:  # a value vLLM refuses fails this question alone
                    outcomes[index] = Outcome(error=f"the engine refused the sampling parameters: {exc}")
                    continue
                params[id(item.sampling)] = sp
            requests.append((index, tokens_input(token_ids) if token_ids is not None else item.prompt, sp))
        submit = self._step_all if self._steps is not None else self._stream_all
        for (index, _, sp), final in zip(requests, await submit(requests), strict=True):
            if isinstance(final, str):
                outcomes[index] = Outcome(error=final)
                continue
            completion = final.outputs[0]
            outcomes[index] = Outcome(text=completion.text, tokens=len(completion.token_ids),
                                      token_ids=None if sp.detokenize else completion.token_ids)
        generated = time.perf_counter()
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(items), "every question gets its answer or its error, in its place"
        undecoded = [o for o in done if o.token_ids is not None]
        if undecoded:
            args = (self._tokenizer, [o.token_ids for o in undecoded])
            texts = await asyncio.to_thread(decode_answers, *args) if len(undecoded) > 8 else decode_answers(*args)
            for outcome, text in zip(undecoded, texts, strict=True):
                outcome.text, outcome.token_ids = text, None
        log.log(timing_level(len(items)),
                "%d questions: tokenise %.3f s, generate %.3f s, decode %.3f s", len(items),
                tokenized - started, generated - tokenized, time.perf_counter() - generated)
        return done

    async def _stream_all(self, requests: list[tuple[int, Any, Any]]) -> list[Any]:
        """AsyncLLM: one task per question, each streaming into the engine; a final output or an error text."""
        from vllm.v1.engine.exceptions import EngineDeadError

        async def one(prompt: Any, sp: Any) -> Any:
            async with self._gate:
                self.stats.enter()
                try:
                    final = None
                    async for output in self._llm.generate(prompt, sp, f"q{next(self._ids)}"):
                        final = output
                except EngineDeadError as exc:
                    raise EngineDead(f"vLLM engine died: {exc}") from exc
                except rejected_errors() as exc:  # the engine refused this question (too long, bad value)
                    return str(exc)
                finally:
                    self.stats.leave()
                    self.stats.finished += 1
                    progress.tick(final)
            assert final is not None
            return final

        # Cancelled (the client went away), each task's generator aborts its request in the engine (AsyncLLM
        # does that on CancelledError) and leaves BATCH_CONCURRENCY's gate.
        tasks = [asyncio.ensure_future(one(prompt, sp)) for _, prompt, sp in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _step_all(self, requests: list[tuple[int, Any, Any]]) -> list[Any]:
        """LLMEngine on the step thread: every question submitted at once; a final output or an error text.

        Cancelled (the client went away), its questions are aborted in the engine and leave the backlog.
        """
        from service.worker.backends.vllm_step import LoopStopped, Rejected

        steps = self._steps  # shutdown may clear the attribute while this request waits
        ids = [f"q{next(self._ids)}" for _ in requests]
        futures = steps.submit([(rid, prompt, sp) for rid, (_, prompt, sp) in zip(ids, requests, strict=True)])
        self.stats.enter(len(futures))
        progress.watch(futures)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            steps.abort(ids)
            raise
        finally:
            self.stats.leave(len(futures))
        out: list[Any] = []
        for result in results:
            if isinstance(result, LoopStopped):  # nothing more can be answered
                raise EngineDead(str(result))
            if isinstance(result, Rejected):  # the engine refused this question alone
                out.append(str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        return out

    async def stream(self, prompt: list[int], sampling: dict[str, Any], delta: bool) -> AsyncIterator[Any]:
        """One prompt's ``RequestOutput``s (each step's new tokens with ``delta``, else only the final one).

        Under ``BATCH_CONCURRENCY`` like ``generate``, batched with every other request in the engine.  Leaving
        the iteration early (the caller was cancelled) aborts the request in the engine.
        """
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if (problem := self.alive()) is not None:
            raise EngineDead(problem)
        kind = RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY
        try:
            sp = SamplingParams(**sampling, output_kind=kind)
        except rejected_errors() as exc:
            raise EngineRejected(f"the engine refused the sampling parameters: {exc}") from None
        request_id = f"v{next(self._ids)}"
        outputs = (self._step_stream(request_id, tokens_input(prompt), sp) if self._steps is not None
                   else self._llm.generate(tokens_input(prompt), sp, request_id))
        async with self._gate:
            self.stats.enter()
            try:
                async for output in outputs:
                    yield output
                    if output.finished:
                        return
            except EngineDeadError as exc:
                raise EngineDead(f"vLLM engine died: {exc}") from exc
            except rejected_errors() as exc:  # too long, a token id outside the vocabulary, too many logprobs
                raise EngineRejected(str(exc)) from None
            finally:
                await outputs.aclose()  # left early: the engine's generator aborts the request
                self.stats.leave()
                self.stats.finished += 1

    async def _step_stream(self, request_id: str, prompt: Any, sp: Any) -> AsyncIterator[Any]:
        """The step loop's outputs of one request as they come; aborted there unless it finished."""
        from service.worker.backends.vllm_step import LoopStopped, Rejected

        steps = self._steps
        queue: asyncio.Queue[Any] = asyncio.Queue()
        (future,) = steps.submit([(request_id, prompt, sp)], stream=queue)
        finished = False
        try:
            while not finished:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    exc = future.exception()
                    if isinstance(exc, Rejected):
                        raise EngineRejected(str(exc))
                    if isinstance(exc, LoopStopped):
                        raise EngineDead(str(exc))
                    raise exc if exc is not None else EngineDead("the step loop ended the request")
                output = getter.result()
                finished = output.finished
                yield output
        finally:
            if not finished:
                steps.abort([request_id])

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        steps, self._steps = self._steps, None
        self._dead = "the engine is shut down"
        if steps is not None:
            await asyncio.to_thread(steps.stop)
            await asyncio.to_thread(llm.engine_core.shutdown)
        elif llm is not None:
            await asyncio.to_thread(llm.shutdown)
        await asyncio.to_thread(reap_children)
