"""OpenAI's response and stream-chunk shapes for completions and chat completions.

One ``Shape`` per endpoint turns the worker's pieces (``wire.Piece``) into ``choices``; the rest (ids, usage,
the server-sent events and ``data: [DONE]``) is common.  Chat text is split into ``content`` and
``reasoning_content`` at ``<think>`` tags (``service.pipeline.thinking.split_think``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from service.contract.wire import Generated, Piece, TokenLogprob
from service.http.v1.schemas import finite
from service.pipeline.thinking import ThinkSplitter, split_think

_json = msgspec.json.Encoder()


def sse(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + _json.encode(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def usage(result: Generated) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def merge(pieces: list[Piece]) -> list[Piece]:
    """Consecutive pieces of one prompt joined (a Deltas frame may carry several steps of each)."""
    out: dict[int, Piece] = {}
    for p in pieces:
        seen = out.get(p.index)
        if seen is None:
            out[p.index] = Piece(p.index, p.text, p.tokens, p.finish_reason,
                                  list(p.logprobs) if p.logprobs is not None else None)
            continue
        seen.text += p.text
        seen.tokens += p.tokens
        seen.finish_reason = p.finish_reason or seen.finish_reason
        if p.logprobs:
            seen.logprobs = [*(seen.logprobs or []), *p.logprobs]
    return list(out.values())


class Shape:
    """What differs between the endpoints; ``model`` is the served model id."""

    object = ""
    chunk_object = ""
    prefix = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def response(self, result: Generated) -> dict[str, Any]:
        return {**self.head(self.object), "choices": [self.choice(c, result) for c in result.choices],
                "usage": usage(result)}

    def opening(self) -> list[bytes]:
        """Events before the first delta."""
        return []

    def chunks(self, pieces: list[Piece]) -> list[bytes]:
        return [sse({**self.head(self.chunk_object), "choices": [c]}) for p in merge(pieces)
                if (c := self.delta(p)) is not None]

    def closing(self) -> list[bytes]:
        """Events after the last delta (text held back by the think splitter)."""
        return []

    def usage_chunk(self, result: Generated) -> bytes:
        return sse({**self.head(self.chunk_object), "choices": [], "usage": usage(result)})

    def choice(self, piece: Piece, result: Generated) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, piece: Piece) -> dict[str, Any] | None:
        raise NotImplementedError


class CompletionShape(Shape):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def choice(self, piece: Piece, result: Generated) -> dict[str, Any]:
        text, logprobs = piece.text, piece.logprobs
        if result.prompts:  # echo
            text = result.prompts[piece.index] + text
            if result.prompt_logprobs is not None:
                logprobs = [*result.prompt_logprobs[piece.index], *(logprobs or [])]
        return {"index": piece.index, "text": text, "logprobs": completion_logprobs(logprobs),
                "finish_reason": piece.finish_reason}

    def delta(self, piece: Piece) -> dict[str, Any] | None:
        return {"index": piece.index, "text": piece.text, "logprobs": completion_logprobs(piece.logprobs),
                "finish_reason": piece.finish_reason}


class ChatShape(Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, model: str):
        super().__init__(model)
        self.splitter = ThinkSplitter()

    def choice(self, piece: Piece, result: Generated) -> dict[str, Any]:
        content, reasoning = split_think(piece.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": piece.index, "message": message, "logprobs": chat_logprobs(piece.logprobs),
                "finish_reason": piece.finish_reason}

    def opening(self) -> list[bytes]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [sse({**self.head(self.chunk_object), "choices": [first]})]

    def delta(self, piece: Piece) -> dict[str, Any] | None:
        content, reasoning = self.splitter.feed(piece.text)
        if piece.finish_reason is not None:
            more_content, more_reasoning = self.splitter.flush()
            content, reasoning = content + more_content, reasoning + more_reasoning
        if not (content or reasoning or piece.finish_reason or piece.logprobs):
            return None
        delta: dict[str, Any] = {}
        if content or not reasoning:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        return {"index": piece.index, "delta": delta, "logprobs": chat_logprobs(piece.logprobs),
                "finish_reason": piece.finish_reason}


def completion_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The completions API's ``logprobs``: tokens, their log probabilities, the alternatives, text offsets."""
    if items is None:
        return None
    offsets, at = [], 0
    for item in items:
        offsets.append(at)
        at += len(item.token)
    return {"tokens": [i.token for i in items], "token_logprobs": [finite(i.logprob) for i in items],
            "top_logprobs": [{t: finite(lp) for t, lp in i.top} if i.logprob is not None else None for i in items],
            "text_offset": offsets}


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The chat API's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if items is None:
        return None
    return {"content": [{"token": i.token, "logprob": finite(i.logprob), "bytes": list(i.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": finite(lp), "bytes": list(t.encode())}
                                          for t, lp in i.top]} for i in items]}
