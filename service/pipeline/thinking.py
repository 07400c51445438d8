"""The OpenAI-compatible API's side of the pipeline: sampling parameters, prompts, reasoning text.

Pure Python, no engine or web imports.  ``/v1/completions`` and ``/v1/chat/completions`` give the engine's raw
text: no token routing and no answer post-processing (those are ``/predict``'s).  A parameter a request leaves
out takes the same setting ``/predict`` uses (MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K, REPETITION_PENALTY,
FREQUENCY_PENALTY); the settings' STOP_STRINGS are ``/predict``'s answer-format rule and are not applied
(``stop`` is the request's own).  Generation ends at the tokenizer's end-of-turn tokens unless ``ignore_eos``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from service.settings import Settings

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class Knobs(msgspec.Struct, frozen=True, kw_only=True):
    """The sampling values a ``/v1`` request sets as they are (None: the setting's value, or the engine's default).

    Named once: the request bodies (``service.http.v1.schemas``) extend it, and ``Sampling`` adds what the
    route derives (the budget, the stop list, the log-probability counts).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def knobs(self) -> dict[str, Any]:
        """These fields' values, by name."""
        return {name: getattr(self, name) for name in Knobs.__struct_fields__}


class Sampling(Knobs, frozen=True, kw_only=True):
    """What one ``/v1`` call asks of the engine, as the wire carries it."""

    max_tokens: int | None = None
    stop: list[str] = []
    logprobs: int | None = None  # top-N log probabilities of every generated token (0: the sampled one only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions with ``echo``)


def sampling_kwargs(s: Settings, p: Sampling, max_tokens: int, stop_ids: list[int]) -> dict[str, Any]:
    """Keyword arguments for vLLM's ``SamplingParams`` of one ``/v1`` request (``max_tokens`` already fitted)."""
    return {
        "max_tokens": max_tokens,
        "temperature": s.temperature if p.temperature is None else p.temperature,
        "top_p": s.top_p if p.top_p is None else p.top_p,
        "top_k": s.top_k if p.top_k is None else p.top_k,
        "min_p": 0.0 if p.min_p is None else p.min_p,
        "presence_penalty": 0.0 if p.presence_penalty is None else p.presence_penalty,
        "frequency_penalty": s.frequency_penalty if p.frequency_penalty is None else p.frequency_penalty,
        "repetition_penalty": s.repetition_penalty if p.repetition_penalty is None else p.repetition_penalty,
        "stop": list(p.stop),
        "stop_token_ids": [] if p.ignore_eos else stop_ids,
        "ignore_eos": p.ignore_eos,
        "min_tokens": p.min_tokens,
        "seed": p.seed,
        "logprobs": p.logprobs,
        "prompt_logprobs": p.prompt_logprobs,
    }


def fit_max_tokens(requested: int | None, default: int, prompt_tokens: int, max_model_len: int) -> int | None:
    """The answer budget of one prompt: ``requested``, or ``default`` cut to the room the context leaves.

    None when a requested budget does not fit beside the prompt (the request is refused, naming max_tokens).
    """
    room = max_model_len - prompt_tokens
    if requested is not None:
        return requested if requested <= room else None
    return max(1, min(default, room))


def split_think(text: str) -> tuple[str, str | None]:
    """``(content, reasoning)``: text inside ``<think>…</think>`` is reasoning, the rest is content.

    An unclosed ``<think>`` (a budget that ran out while the model was thinking) makes the rest reasoning, so
    the streamed deltas (``ThinkSplitter``) always join to the same two texts.  Whitespace after a closing tag
    is dropped from the content.  No tag at all: ``(text, None)``.
    """
    splitter = ThinkSplitter()
    content, reasoning = splitter.feed(text)
    tail_content, tail_reasoning = splitter.flush()
    content, reasoning = content + tail_content, reasoning + tail_reasoning
    return content, (reasoning if splitter.seen else None)


class ThinkSplitter:
    """Splits streamed text into content and reasoning deltas, holding back what may be half a tag."""

    def __init__(self) -> None:
        self.thinking = False
        self.seen = False  # a <think> tag was found
        self._held = ""
        self._after_close = False  # drop whitespace right after </think>

    def feed(self, text: str) -> tuple[str, str]:
        """The content and reasoning that ``text`` completes (either may be empty)."""
        text = self._held + text
        self._held = ""
        content: list[str] = []
        reasoning: list[str] = []
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            at = text.find(tag)
            if at < 0:
                keep = _partial_suffix(text, tag)
                piece, self._held = text[: len(text) - keep], text[len(text) - keep:]
                self._emit(piece, content, reasoning)
                break
            self._emit(text[:at], content, reasoning)
            text = text[at + len(tag):]
            self.seen = True
            self.thinking = not self.thinking
            self._after_close = not self.thinking
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        """What was held back at the end of the text."""
        held, self._held = self._held, ""
        content: list[str] = []
        reasoning: list[str] = []
        self._emit(held, content, reasoning)
        return "".join(content), "".join(reasoning)

    def _emit(self, piece: str, content: list[str], reasoning: list[str]) -> None:
        if self.thinking:
            reasoning.append(piece)
            return
        if self._after_close:
            piece = piece.lstrip()
            if not piece:
                return
            self._after_close = False
        content.append(piece)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (it may be completed next)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
