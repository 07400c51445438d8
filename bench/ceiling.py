"""The engine's own ceiling for ``inv bench --ceiling``: vLLM's offline ``LLM.generate``.

``Ceiling`` builds ``LLM`` in this process with the service's engine arguments, chat-formatted prompts and
per-question sampling parameters (``service.pipeline.prompting.Planner``).  With ``ENGINE_WORKERS=N`` > 1 the fair
offline counterpart of the service is N ``LLM`` engines sharing the device, each generating its share of the
questions (dealt out as the service deals them, ``service.pipeline.balance``) at the same time: ``ShardedCeiling`` runs N child processes
(``python -m bench.ceiling FD``), started the way the service starts its workers (together when
``VLLM_KV_CACHE_MEMORY_BYTES`` is set, else one after another), and times the slowest share.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service.pipeline.balance import plan_shards
from service.pipeline.routing import Router, route_all
from service.pool.client import engine_environ

log = logging.getLogger("bench")
_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """One timed batch: wall seconds, questions, generated tokens, item errors."""

    seconds: float
    questions: int
    tokens: float
    errors: int = 0
    client: dict[str, float] | None = None  # a service round: the client's JSON work and its wait (bench.client)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Ceiling:
    """vLLM's offline ``LLM`` with the service's engine arguments, prompts and sampling parameters."""

    def __init__(self, settings: Any):
        started = time.perf_counter()  # the import is part of the engine's own start-up, as in the service
        from vllm import LLM

        from service.pipeline.prompting import Formatter, Planner
        from service.procs import freeze_heap
        from service.worker.backends.tokens import stop_token_ids
        from service.worker.backends.vllm_args import engine_args

        self.llm = LLM(**engine_args(settings))
        freeze_heap("ceiling")  # as the service's engine workers do once their engine is up
        self.init_seconds = time.perf_counter() - started
        tokenizer = self.llm.get_tokenizer()
        self.tokenizer = tokenizer
        self.pretokenize = settings.pretokenize
        self.planner = Planner(settings, Formatter(tokenizer, settings.load_system_prompt()), stop_token_ids(tokenizer),
                               settings.detokenize_at_end)

    VARIANTS: dict[str, dict[str, Any]] = {
        "no_penalties": {"repetition_penalty": 1.0, "frequency_penalty": 0.0},
        "no_detokenize": {"detokenize": False, "stop": []},
        "prefill_only": {"max_tokens": 1},
        "text_prompts": {},
    }

    def run(self, questions: list[str], variant: str | None = None) -> Run:
        """One ``LLM.generate`` of every question; ``variant`` changes one thing (for the breakdown)."""
        from vllm import SamplingParams

        from service.worker.backends.tokens import decode_answers, encode_prompts

        started = time.perf_counter()
        plans = self.planner.plan(questions)
        change = self.VARIANTS[variant] if variant else {}
        shared: dict[int, SamplingParams] = {}
        params = [shared.setdefault(id(p.sampling), SamplingParams(**{**p.sampling, **change})) for p in plans]
        prompts: list[Any] = [p.prompt for p in plans]
        if self.pretokenize and variant != "text_prompts":
            ids = encode_prompts(self.tokenizer, prompts)
            prompts = [{"prompt_token_ids": i} for i in ids]
        tokenized = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        generated = time.perf_counter()
        completions = [o.outputs[0] for o in outputs]
        texts = [c.text for c in completions]
        undecoded = [i for i, sp in enumerate(params) if not sp.detokenize]
        decoded = decode_answers(self.tokenizer, [completions[i].token_ids for i in undecoded])
        for i, text in zip(undecoded, decoded, strict=True):
            texts[i] = text
        post = self.planner.post
        answers = [post(q, text, p.short) for q, text, p in zip(questions, texts, plans, strict=True)]
        seconds = time.perf_counter() - started
        log.info("[bench] ceiling: %d questions: plan and tokenise %.3f s, generate %.3f s, decode and post %.3f s",
                 len(questions), tokenized - started, generated - tokenized, time.perf_counter() - generated)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert len(answers) == len(questions)
        return Run(seconds, len(questions), tokens)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class CeilingFailed(RuntimeError):
    """A ceiling child process exited or answered out of turn; the message says which and where it logged."""


class _Child:
    """One ``python -m bench.ceiling FD`` process: commands on its stdin, JSON replies on a pipe."""

    def __init__(self, env: dict[str, str], log_path: Path):
        read_fd, write_fd = os.pipe()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.ceiling", str(write_fd)], env=env, cwd=_ROOT, pass_fds=(write_fd,),
                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        os.close(write_fd)
        self.replies: IO[str] = os.fdopen(read_fd, "r", encoding="utf-8")

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        line = self.replies.readline()
        if not line:
            raise CeilingFailed(f"a ceiling engine exited ({self.proc.wait()}); its log: {self.log_path}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of commands: the child shuts its engine down and exits
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.replies.close()


class ShardedCeiling:
    """N offline engines sharing the device, each generating its share of a batch at the same time."""

    def __init__(self, settings: Any, env: dict[str, str], log_stem: Path):
        started = time.perf_counter()
        self.settings = settings
        child_env = engine_environ(env)  # the environment the service gives its engine workers
        self.children: list[_Child] = []
        together = settings.engines_start_together  # as the service starts its workers
        try:
            for index in range(settings.engine_workers):
                self.children.append(_Child(child_env, Path(f"{log_stem}-ceiling-{index}.log")))
                if not together:
                    self.children[-1].reply()
            if together:
                for child in self.children:
                    child.reply()
        except BaseException:
            self.close()
            raise
        self.init_seconds = time.perf_counter() - started

    def run(self, questions: list[str], variant: str | None = None) -> Run:
        started = time.perf_counter()  # the plan is part of the round, as in the service
        routed = route_all(self.settings, Router.from_settings(self.settings), questions)  # as the API process
        shards = plan_shards(questions, routed, len(self.children))
        busy = list(zip(self.children, shards, strict=False))
        for child, shard in busy:  # the same shards as the service's workers answer
            child.send({"questions": [questions[i] for i in shard], "variant": variant})
        parts = [child.reply() for child, _ in busy]
        seconds = time.perf_counter() - started
        return Run(seconds, sum(p["questions"] for p in parts), sum(p["tokens"] for p in parts))

    def close(self) -> None:
        for child in self.children:
            child.close()


def ceiling(settings: Any, env: dict[str, str], log_stem: Path) -> Ceiling | ShardedCeiling:
    """The offline counterpart of the service these settings describe (children log to LOG_STEM-ceiling-I.log)."""
    if settings.engine_workers == 1:
        return Ceiling(settings)
    log.info("[bench] ceiling: %d offline engines sharing the device", settings.engine_workers)
    return ShardedCeiling(settings, env, log_stem)


def _child(fd: int) -> int:
    """Child side of ``ShardedCeiling``: build the engine, then answer one command per stdin line."""
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    engine = Ceiling(Settings.from_environ(os.environ))
    with os.fdopen(fd, "w", encoding="utf-8") as replies:
        replies.write(json.dumps({"init_seconds": engine.init_seconds}) + "\n")
        replies.flush()
        for line in sys.stdin:
            command = json.loads(line)
            run = engine.run(command["questions"], command.get("variant"))
            replies.write(json.dumps({"seconds": run.seconds, "questions": run.questions, "tokens": run.tokens}) + "\n")
            replies.flush()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
