"""Reasoning text of the OpenAI-compatible API: ``<think>…</think>`` split from the content, whole or streamed.

Pure Python, no engine or web imports.  ``/v1`` gives the engine's raw text (no token routing, no answer
post-processing: those are ``/predict``'s); this only separates the reasoning for chat responses.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
