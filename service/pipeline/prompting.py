"""Prompt formatting, token routing, sampling parameters and answer post-processing (SPEC section 3).

Pure Python, no engine or web imports: the service and the measurement tools (`inv bench`,
`inv eval`) share this module so that both send exactly the same prompts and parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import msgspec

from service.settings import Settings

HARD_CODE_SIGNALS = ("kernel<<<", "global void", "__global__", "#include")
LONG_ANSWER_SIGNALS = ("算子", "spmv", "convnets", "im2col", "gemm", "tensor cores", "triton", "tilelang")
CODE_SIGNALS = ("代码", "伪代码", "核心代码", "代码片段", "import ", "def ", *HARD_CODE_SIGNALS)

_EXAMPLE = re.compile(r"(举例来说|举例|例如|比如)\s*[:：]")
_SENTENCE = re.compile(r"[^。！？；\n]*(?:[。！？；\n]|$)")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class Route(StrEnum):
    """Where token routing sends a question (its answer budget and post-processing)."""

    SHORT = "short"
    CODE = "code"
    LONG = "long"
    HARD = "hard"


def _unique(keywords: tuple[str, ...]) -> tuple[str, ...]:
    """Lower-cased keywords without repeats (a keyword listed twice still counts once)."""
    return tuple(dict.fromkeys(k.lower() for k in keywords if k))


def _hits(text: str, keywords: tuple[str, ...]) -> int:
    """How many of ``keywords`` occur in ``text`` (``text`` already lower-case), each counted once."""
    return sum(1 for k in keywords if k and k.lower() in text)


@dataclass(frozen=True, slots=True)
class Router:
    """Classifies questions; built once from the settings."""

    hard: tuple[str, ...]
    long: tuple[str, ...]
    code: tuple[str, ...]
    hard_min: int
    long_min: int

    @classmethod
    def from_settings(cls, s: Settings) -> Router:
        long = (LONG_ANSWER_SIGNALS if s.long_answer_enable_default else ()) + s.long_answer_keywords
        hard = HARD_CODE_SIGNALS + s.hard_code_question_keywords
        return cls(
            hard=_unique(hard),
            long=_unique(long),
            code=_unique(CODE_SIGNALS + s.code_question_keywords + s.hard_code_question_keywords),
            hard_min=s.hard_code_min_hits,
            long_min=s.long_answer_min_hits,
        )

    def route(self, question: str) -> Route:
        text = question.lower()
        if _hits(text, self.hard) >= self.hard_min:
            return Route.HARD
        if self.long and _hits(text, self.long) >= self.long_min:
            return Route.LONG
        if _hits(text, self.code) >= 1:
            return Route.CODE
        return Route.SHORT

    def is_code(self, question: str) -> bool:
        return _hits(question.lower(), self.code) >= 1


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


class Overrides(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request overrides of the decoding settings (None: the setting's value).

    Named once: ``/predict``'s body schema extends it (``service.http.schemas.PredictRequest``), and the
    wire's ``Ask`` message carries it as it is, so a field is added here and nowhere else.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None


def stop_strings(s: Settings) -> list[str]:
    """STOP_STRINGS, with a blank line first when STOP_ON_DOUBLE_NEWLINE=1."""
    stops = list(s.stop_strings)
    if s.stop_on_double_newline:
        stops = ["\n\n", *[x for x in stops if x != "\n\n"]]
    return stops


def budget(s: Settings, route: Route) -> int:
    """Answer budget (max new tokens) of a route; MAX_NEW_TOKENS for everything when routing is off."""
    if s.disable_token_routing:
        return s.max_new_tokens
    return {
        Route.HARD: s.max_new_tokens_code_hard,
        Route.LONG: s.max_new_tokens_code,
        Route.CODE: s.max_new_tokens_code_soft,
        Route.SHORT: s.max_new_tokens,
    }[route]


def is_short_answer(s: Settings, route: Route) -> bool:
    """Short-answer questions get post-processing: all of them when routing is off."""
    return s.disable_token_routing or route is Route.SHORT


def sampling_kwargs(s: Settings, o: Overrides, max_tokens: int, stop: list[str], stop_ids: list[int],
                    detokenize: bool = True) -> dict[str, Any]:
    """Keyword arguments for vLLM's ``SamplingParams`` (also read by the transformers backend)."""
    return {
        "detokenize": detokenize,
        "max_tokens": o.max_new_tokens if o.max_new_tokens is not None else max_tokens,
        "temperature": s.temperature if o.temperature is None else o.temperature,
        "top_p": s.top_p if o.top_p is None else o.top_p,
        "top_k": s.top_k if o.top_k is None else o.top_k,
        "repetition_penalty": s.repetition_penalty if o.repetition_penalty is None else o.repetition_penalty,
        "frequency_penalty": s.frequency_penalty if o.frequency_penalty is None else o.frequency_penalty,
        "stop": stop,
        "stop_token_ids": stop_ids,
        "seed": None,
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
    route: Route
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

    def plan(self, questions: list[str], overrides: Overrides | None = None) -> list[Plan]:
        s = self.settings
        overrides = overrides or Overrides()
        prompts = self.formatter.many(questions)
        cache: dict[int, dict[str, Any]] = {}
        plans = []
        for question, prompt in zip(questions, prompts, strict=True):
            route = self.router.route(question)
            tokens = budget(s, route)
            sampling = cache.get(tokens)
            if sampling is None:
                sampling = cache[tokens] = sampling_kwargs(s, overrides, tokens, self.stop, self.stop_ids, self.detokenize)
            plans.append(Plan(prompt, route, is_short_answer(s, route), sampling))
        return plans
