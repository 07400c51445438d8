"""The transformers backend: only when asked for (``USE_VLLM=false``, or ``auto`` without vLLM).

Questions from every request go into one queue; a single worker takes up to ``BATCH`` of them at a
time, left-pads them and runs one ``generate`` per batch in a thread, then cuts each answer at its own
budget and stop strings.  ``frequency_penalty`` has no transformers equivalent and is ignored
(announced at start-up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from service.contract.errors import EngineDead
from service.contract.wire import EngineStats
from service.settings import Settings
from service.worker.backends.base import Item, Outcome, require_import

log = logging.getLogger("service")
BATCH = 16

HF_HINT = "USE_VLLM=false requires torch and transformers: `pip install -r requirements/cpu.txt`."


def _decoding_key(sampling: dict[str, Any]) -> tuple[object, ...]:
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return tuple(sampling[k] for k in keys) + (tuple(sampling["stop_token_ids"]),)


@dataclass(slots=True)
class _Job:
    item: Item
    ids: list[int]
    future: asyncio.Future[Outcome]


class TransformersEngine:
    name = "transformers"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.notice: str | None = None
        self.stats = EngineStats(has_scheduler=True)  # its batches are the running sequences
        self._model: Any = None
        self._tokenizer: Any = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self.init_seconds: float | None = None

    def check(self) -> None:
        require_import("torch", "torch", HF_HINT)
        require_import("transformers", "transformers", HF_HINT)

    async def start(self) -> None:
        self.check()
        started = time.perf_counter()
        await asyncio.to_thread(self._load)
        self.init_seconds = time.perf_counter() - started
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="transformers-worker")
        log.warning("transformers backend ready in %.1f s (slow path; frequency_penalty is ignored)",
                    time.perf_counter() - started)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self.settings
        self._tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = "auto" if s.transformers_dtype == "auto" else getattr(torch, s.transformers_dtype)
        self._model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype).eval()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.settings.max_model_len

    def alive(self) -> str | None:
        if self._dead is None and self._worker is not None and self._worker.done():
            self._dead = "the transformers worker stopped"
        return self._dead

    async def generate(self, items: list[Item]) -> list[Outcome]:
        if (problem := self.alive()) is not None or self._queue is None:
            raise EngineDead(problem or "the engine is not started")
        ids = self._tokenizer([i.prompt for i in items], add_special_tokens=False)["input_ids"]
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for item, token_ids in zip(items, ids, strict=True):
            future: asyncio.Future[Outcome] = loop.create_future()
            if len(token_ids) >= self.max_model_len:
                future.set_result(Outcome(error=f"the question is {len(token_ids)} tokens after chat formatting; "
                                                f"MAX_MODEL_LEN={self.max_model_len} leaves no room for an answer"))
            else:
                self._queue.put_nowait(_Job(item, token_ids, future))
            futures.append(future)
        # Cancelled (the client went away), the futures are cancelled too and their jobs skipped (``_run``).
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < BATCH and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            groups: dict[tuple[object, ...], list[_Job]] = {}
            for job in jobs:
                if not job.future.done():
                    groups.setdefault(_decoding_key(job.item.sampling), []).append(job)
            for group in groups.values():
                await self._run_batch(group)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        """One ``generate`` for questions that share their decoding parameters."""
        self.stats.enter(len(jobs))
        self.stats.scheduler(len(jobs), self._queue.qsize() if self._queue else 0)
        try:
            outcomes = await asyncio.to_thread(self._generate_batch, jobs)
        except (RuntimeError, ValueError) as exc:  # torch raises these for bad inputs / OOM
            outcomes = [Outcome(error=f"transformers generate failed: {exc}") for _ in jobs]
        finally:
            self.stats.leave(len(jobs))
            self.stats.finished += len(jobs)  # the stall detector's progress
        for job, outcome in zip(jobs, outcomes, strict=True):
            if not job.future.done():
                job.future.set_result(outcome)

    def _generate_batch(self, jobs: list[_Job]) -> list[Outcome]:
        """Left-padded batch, the longest budget; each answer cut at its own budget and stops."""
        import torch

        tok = self._tokenizer
        first = jobs[0].item.sampling
        budgets = [j.item.sampling["max_tokens"] for j in jobs]
        batch = tok.pad({"input_ids": [j.ids for j in jobs]}, return_tensors="pt")
        greedy = first["temperature"] == 0 or first["top_k"] == 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(budgets),
            "do_sample": not greedy,
            "repetition_penalty": first["repetition_penalty"],
            "eos_token_id": first["stop_token_ids"] or None,
            "pad_token_id": tok.pad_token_id,
        }
        if not greedy:
            kwargs.update(temperature=first["temperature"], top_p=first["top_p"],
                          top_k=first["top_k"] if first["top_k"] > 0 else None)
        with torch.inference_mode():
            out = self._model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        stop_ids = set(first["stop_token_ids"])
        outcomes = []
        for row, job, limit in zip(out, jobs, budgets, strict=True):
            new = row[width:width + limit].tolist()
            for k, token in enumerate(new):
                if token in stop_ids:
                    new = new[:k]
                    break
            text = tok.decode(new, skip_special_tokens=True)
            for stop in job.item.sampling["stop"]:
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
            outcomes.append(Outcome(text=text, tokens=len(new)))
        return outcomes

    async def shutdown(self) -> None:
        self._dead = "the engine is shut down"
        if self._worker is not None:
            self._worker.cancel()
        self._model = None
