"""How a request's questions are spread over several engine workers: the same predicted work on each.

A batch lasts as long as its slowest engine.  Contiguous shards of the evaluation set are not alike: one
engine of six held 1,188 of the 2,288 questions routed to 192 tokens (146k / 79k / 142k / 231k / 89k / 80k
routed tokens), and the whole batch waited for it.  So each question's work is predicted from what the
API process knows without a tokenizer (its routed token budget, and its length for the prefill), the
questions are sorted by it, and dealt out like cards, back and forth (1..N, N..1, ...): every engine gets
the same number of questions of each budget, within one, and the same total within one question's work.
The budgets are the request's own (``service.pipeline.routing.route_all``, decided once and sent with each shard).
Each shard keeps that order, so an engine admits its longest questions first and its short ones fill in
around them.  Answers are put back in the request's order by index (``merge_arrays``).

Pure Python, no engine imports: the service and the offline ceiling of ``inv bench`` use the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from service.pipeline.routing import Routed

# Prompt characters worth one generated token of work: a decode step costs every running sequence about
# the same CPU time in the scheduler, while prefill tokens go through in large batches. Only breaks ties.
CHARS_PER_WORK = 64

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()


def predicted_work(questions: Sequence[str], routed: Routed) -> list[int]:
    """Each question's predicted work: its answer budget plus its prompt length."""
    return [tokens + len(q) // CHARS_PER_WORK for q, tokens in zip(questions, routed.budgets, strict=True)]


def deal(work: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of the questions for each of ``parts`` engines, heaviest first; no shard is empty."""
    order = sorted(range(len(work)), key=lambda i: -work[i])  # stable: equal work keeps request order
    shards: list[list[int]] = [[] for _ in range(parts)]
    for rank, index in enumerate(order):
        row, col = divmod(rank, parts)
        shards[col if row % 2 == 0 else parts - 1 - col].append(index)
    return [shard for shard in shards if shard]


def plan_shards(questions: Sequence[str], routed: Routed, parts: int) -> list[list[int]]:
    """The shards of one request over ``parts`` engines (see the module's docstring)."""
    return deal(predicted_work(questions, routed), parts)


def merge_arrays(shards: Sequence[Sequence[int]], arrays: Sequence[bytes], count: int) -> bytes:
    """One JSON array in request order from each shard's JSON array, without decoding the answers' text."""
    slots: list[msgspec.Raw | None] = [None] * count
    for shard, array in zip(shards, arrays, strict=True):
        items = _raw_list.decode(array)
        if len(items) != len(shard):
            raise ValueError(f"a shard of {len(shard)} questions came back with {len(items)} answers")
        for index, item in zip(shard, items, strict=True):
            slots[index] = item
    if any(slot is None for slot in slots):
        raise ValueError("a question of the request is in no shard")
    return _encoder.encode(slots)
