"""Raw generation for the OpenAI-compatible API, in the engine worker (beside ``answer.Answerer``).

A ``wire.Generate`` call's prompts (texts, token ids, or one chat rendered with the model's template) are
checked against the context before any work, then generated one engine request each, batched with whatever
else the engine runs.  Streaming calls hand each step's new text to ``emit``; the end is one ``Generated``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from service.contract.errors import EngineRejected
from service.contract.wire import Generate, Generated, Piece, TokenLogprob
from service.pipeline.prompting import engine_kwargs
from service.settings import Settings
from service.worker.backends.base import Engine
from service.worker.backends.tokens import encode_prompts, stop_token_ids

CONTEXT = "context_length_exceeded"  # OpenAI's error code for a prompt or budget over the context


class Completer:
    """Built once the engine is up (it needs the tokenizer)."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.stop_ids = stop_token_ids(engine.tokenizer)

    def _encode(self, call: Generate) -> tuple[list[list[int]], list[str | None], str]:
        """Token ids of every prompt, the prompts' texts where known, and the request field they came from."""
        tokenizer = self.engine.tokenizer
        if call.messages is not None:
            try:
                text = tokenizer.apply_chat_template(call.messages, tokenize=False, add_generation_prompt=True,
                                                     **(call.template_kwargs or {}))
            except Exception as exc:  # a template that refuses these roles or their order
                raise EngineRejected(f"the model's chat template cannot render these messages: {exc}",
                                     "messages") from None
            return encode_prompts(tokenizer, [text]), [text], "messages"
        texts = [p if isinstance(p, str) else None for p in call.prompts]
        strings = [p for p in call.prompts if isinstance(p, str)]
        encoded = iter(encode_prompts(tokenizer, strings) if strings else [])
        ids = [next(encoded) if isinstance(p, str) else list(p) for p in call.prompts]
        return ids, texts, "prompt"

    def _budgets(self, call: Generate, ids: list[list[int]], field: str) -> list[int]:
        """Each prompt's max_tokens; EngineRejected for a prompt or a requested budget over the context."""
        limit, wanted, budgets = self.engine.max_model_len, call.sampling.max_tokens, []
        for index, prompt in enumerate(ids):
            where = f"{field}[{index}]" if field == "prompt" and len(ids) > 1 else field
            if len(prompt) >= limit:
                raise EngineRejected(f"{where} is {len(prompt)} tokens; this model's maximum context length is "
                                     f"{limit} tokens, which leaves no room for an answer", field, CONTEXT)
            budget = fit_max_tokens(wanted, self.settings.max_new_tokens, len(prompt), limit)
            if budget is None:
                raise EngineRejected(f"max_tokens={wanted} and the {len(prompt)} tokens of {where} are more than this "
                                     f"model's maximum context length of {limit} tokens", "max_tokens", CONTEXT)
            budgets.append(budget)
        return budgets

    async def complete(self, call: Generate, emit: Callable[[Piece], None] | None) -> Generated:
        """Generate every prompt of ``call``; ``emit`` gets each step's new text when the call streams."""
        ids, texts, field = self._encode(call)
        budgets = self._budgets(call, ids, field)
        cache: dict[int, dict[str, Any]] = {}
        prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in ids]

        async def one(index: int) -> Piece:
            kwargs = cache.get(budgets[index])
            if kwargs is None:
                kwargs = cache[budgets[index]] = engine_kwargs(self.settings, call.sampling, budgets[index],
                                                               list(call.sampling.stop or []), self.stop_ids)
            parts: list[str] = []
            logprobs: list[TokenLogprob] | None = [] if call.sampling.logprobs is not None else None
            tokens, finish = 0, None
            async for output in self.engine.stream(ids[index], kwargs, delta=emit is not None):
                if output.prompt_logprobs is not None and not prompt_logprobs[index]:
                    prompt_logprobs[index] = self._logprobs(ids[index], output.prompt_logprobs, None)
                completion = output.outputs[0]
                new = (self._logprobs(completion.token_ids, completion.logprobs, call.sampling.logprobs)
                       if logprobs is not None and completion.logprobs is not None else None)
                tokens, finish = tokens + len(completion.token_ids), completion.finish_reason
                if emit is not None:
                    emit(Piece(index, completion.text, len(completion.token_ids), finish, new))
                    continue
                parts.append(completion.text)
                if new is not None and logprobs is not None:
                    logprobs.extend(new)
            return Piece(index, "".join(parts), tokens, finish, logprobs)

        tasks = [asyncio.ensure_future(one(index)) for index in range(len(ids))]
        try:
            choices = list(await asyncio.gather(*tasks))
        finally:  # one failed or the call was cancelled: the others are aborted in the engine
            for task in tasks:
                task.cancel()
        tokenizer = self.engine.tokenizer
        shown = [text if text is not None else tokenizer.decode(prompt) for text, prompt in zip(texts, ids, strict=True)]
        return Generated(id=call.id, choices=choices, prompt_tokens=sum(map(len, ids)),
                         completion_tokens=sum(c.tokens for c in choices), prompts=shown if call.echo else [],
                         prompt_logprobs=prompt_logprobs if call.sampling.prompt_logprobs is not None else None)

    def _logprobs(self, token_ids: Any, positions: Any, top: int | None) -> list[TokenLogprob]:
        """vLLM's per-position ``{token id: Logprob}`` as (token, logprob, top alternatives) per token."""
        tokenizer, out = self.engine.tokenizer, []
        for token_id, options in zip(token_ids, positions, strict=False):
            if options is None:  # the prompt's first token has no log probability
                out.append(TokenLogprob(tokenizer.decode([token_id]), token_id, None, []))
                continue
            chosen = options.get(token_id)
            ranked = sorted(options.items(), key=lambda item: item[1].rank or 0)
            alternatives = [(_text(tokenizer, tid, lp), lp.logprob) for tid, lp in ranked
                            if top and lp.rank is not None and lp.rank <= top]
            out.append(TokenLogprob(_text(tokenizer, token_id, chosen), token_id,
                                    chosen.logprob if chosen is not None else None, alternatives))
        return out


def _text(tokenizer: Any, token_id: int, logprob: Any) -> str:
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


def fit_max_tokens(requested: int | None, default: int, prompt_tokens: int, max_model_len: int) -> int | None:
    """The answer budget of one prompt: ``requested``, or ``default`` cut to the room the context leaves.

    None when a requested budget does not fit beside the prompt (the request is refused, naming max_tokens).
    """
    room = max_model_len - prompt_tokens
    if requested is not None:
        return requested if requested <= room else None
    return max(1, min(default, room))
