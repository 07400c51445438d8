"""Prompt formatting, sampling parameters and answer post-processing (SPEC section 3); routing: ``routing``.

Pure Python, no engine or web imports: the service and the measurement tools (`inv bench`,
`inv eval`) share this module so that both send exactly the same prompts and parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from service.contract.sampling import Sampling, resolved
from service.pipeline.routing import Routed, Router, is_short_answer, route_all
from service.settings import Settings

_EXAMPLE = re.compile(r"(举例来说|举例|例如|比如)\s*[:：]")
_SENTENCE = re.compile(r"[^。！？；\n]*(?:[。！？；\n]|$)")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class ChatTemplate(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def fast_chat(system: str, question: str) -> str:
    """Qwen's ``<|im_start|>`` form: system turn, user turn, assistant header."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


class Formatter:
    """Chat formatting with the tokenizer's template, via the fast path when it is byte-identical.

    ``check`` renders probe conversations with the real template; only when every probe matches the
    fast path exactly is the fast path used, otherwise every question goes through the template.
    """

    PROBES = ("什么是CUDA？", "Explain `kernel<<<1, 32>>>()`.\nLine two.", "", " \n 什么是warp？ \n")

    def __init__(self, tokenizer: ChatTemplate | None, system: str):
        self.tokenizer = tokenizer
        self.system = system
        self.fast = tokenizer is None or all(self._template(q) == fast_chat(system, q) for q in self.PROBES)

    def _template(self, question: str) -> str:
        assert self.tokenizer is not None
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, question: str) -> str:
        return fast_chat(self.system, question) if self.fast else self._template(question)

    def many(self, questions: list[str]) -> list[str]:
        if self.fast:
            system = self.system
            return [fast_chat(system, q) for q in questions]
        return [self._template(q) for q in questions]


def stop_strings(s: Settings) -> list[str]:
    """STOP_STRINGS, with a blank line first when STOP_ON_DOUBLE_NEWLINE=1."""
    stops = list(s.stop_strings)
    if s.stop_on_double_newline:
        stops = ["\n\n", *[x for x in stops if x != "\n\n"]]
    return stops


def engine_kwargs(s: Settings, p: Sampling, max_tokens: int, stop: list[str], stop_ids: list[int],
                  detokenize: bool = True) -> dict[str, Any]:
    """Keyword arguments for vLLM's ``SamplingParams`` of one call (also read by the transformers backend).

    Every row of the sampling table (``service.contract.sampling``) takes the call's value, else its setting's,
    else the engine's default; ``max_tokens`` (the route's budget, or the fitted /v1 one) and ``stop`` are the
    caller's.  The end-of-turn tokens stop generation unless the call asks to ``ignore_eos``.
    """
    return {
        **resolved(p, s),
        "max_tokens": max_tokens,
        "stop": stop,
        "stop_token_ids": [] if p.ignore_eos else stop_ids,
        "detokenize": detokenize,
        "logprobs": p.logprobs,
        "prompt_logprobs": p.prompt_logprobs,
    }


def strip_think(text: str) -> str:
    """Drop ``<think>…</think>`` blocks; if nothing else is left, keep the inner text."""
    if "<think>" not in text:
        return text
    outside = _THINK.sub("", text)
    if "<think>" in outside:  # an unclosed block: keep the answer before it, else what follows the tag
        head, _, tail = outside.partition("<think>")
        outside = head if head.strip() else tail
    if outside.strip():
        return outside.strip()
    return "\n".join(m.strip() for m in _THINK.findall(text)).strip()


def trim_examples(text: str) -> str:
    """Cut the answer before the first 例如：/比如：/举例来说：/举例： (kept whole if that leaves nothing)."""
    match = _EXAMPLE.search(text)
    if match is None:
        return text
    head = text[: match.start()].rstrip()
    return head if head else text


def limit_sentences(text: str, n: int) -> str:
    """Keep at most ``n`` fragments, split after 。！？； and newlines (blank ones not counted); trimmed."""
    kept: list[str] = []
    count = 0
    for piece in _SENTENCE.findall(text):
        if not piece:
            continue
        if piece.strip():
            if count == n:
                break
            count += 1
        kept.append(piece)
    return "".join(kept).strip()


@dataclass(frozen=True, slots=True)
class PostProcessor:
    """SPEC section 3 post-processing, applied to short-answer questions only."""

    trim: bool
    max_sentences: int
    router: Router

    @classmethod
    def from_settings(cls, s: Settings, router: Router) -> PostProcessor:
        return cls(trim=s.output_trim_examples, max_sentences=s.output_max_sentences, router=router)

    def __call__(self, question: str, answer: str, short: bool) -> str:
        if not short:
            return answer
        answer = strip_think(answer)
        if self.trim and not self.router.is_code(question):
            answer = trim_examples(answer)
        return limit_sentences(answer, self.max_sentences)


def is_special_token(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` is one special token of the tokenizer (left out of decoded text)."""
    if tokenizer is None or not hasattr(tokenizer, "added_tokens_decoder"):
        return False
    token = tokenizer.added_tokens_decoder.get(tokenizer.convert_tokens_to_ids(text))
    return token is not None and token.content == text and bool(token.special)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the engine gets for one question: the formatted prompt, its route and sampling kwargs."""

    prompt: str
    route: str
    short: bool
    sampling: dict[str, Any]


class Planner:
    """Turns questions into engine inputs exactly as the service does (the benchmark reuses it)."""

    def __init__(self, settings: Settings, formatter: Formatter, stop_ids: list[int], decode_at_end: bool = False):
        self.settings = settings
        self.formatter = formatter
        self.router = Router.from_settings(settings)
        self.stop = stop_strings(settings)
        self.stop_ids = stop_ids
        self.post = PostProcessor.from_settings(settings, self.router)
        # The engine decodes every answer token by token only to check stop strings. Stop strings that are
        # special tokens never match (special tokens are left out of the text), so when every stop string is
        # one, the answers can be decoded once each, at the end (``service.worker.backends.tokens.decode_answers``).
        self.detokenize = not (decode_at_end and all(is_special_token(formatter.tokenizer, x) for x in self.stop))
        if not self.detokenize:
            self.stop = []

    def plan(self, questions: list[str], sampling: Sampling | None = None, routed: Routed | None = None) -> list[Plan]:
        """Each question's engine input; ``routed``: the routes and budgets the API process decided (else here)."""
        s = self.settings
        sampling = sampling or Sampling()
        if routed is None:
            routed = route_all(s, self.router, questions, sampling.max_tokens)
        prompts = self.formatter.many(questions)
        cache: dict[int, dict[str, Any]] = {}
        plans = []
        stop = self.stop if sampling.stop is None else sampling.stop
        for prompt, route, tokens in zip(prompts, routed.routes, routed.budgets, strict=True):
            kwargs = cache.get(tokens)
            if kwargs is None:
                kwargs = cache[tokens] = engine_kwargs(s, sampling, tokens, stop, self.stop_ids, self.detokenize)
            plans.append(Plan(prompt, route, is_short_answer(s, route), kwargs))
        return plans
