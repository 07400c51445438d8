"""A request's questions are dealt out so that every engine worker gets the same predicted work."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from service.pipeline.balance import deal, plan_shards, predicted_work
from service.pipeline.routing import Router, budget, route_all
from service.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pmpp_qa.jsonl"


def _questions() -> list[str]:
    if not DATA.is_file():
        pytest.skip(f"the evaluation data is not at {DATA}")
    with DATA.open(encoding="utf-8") as f:
        return [json.loads(line)["messages"][0]["content"] for line in f]


@pytest.mark.parametrize(("count", "parts"), [(10, 3), (7, 7), (3, 6), (1, 4), (0, 2), (7370, 6)])
def test_every_question_is_in_exactly_one_shard_and_none_is_empty(count: int, parts: int) -> None:
    work = [(i * 37) % 11 for i in range(count)]
    shards = deal(work, parts)
    assert sorted(i for shard in shards for i in shard) == list(range(count))
    assert len(shards) == min(count, parts) and all(shards)
    for shard in shards:  # heaviest first: an engine admits its longest questions first
        assert [work[i] for i in shard] == sorted((work[i] for i in shard), reverse=True)


def test_the_evaluation_set_gets_the_same_routes_and_work_on_every_engine() -> None:
    questions = _questions()
    settings = Settings.from_environ({})
    router = Router.from_settings(settings)
    routes = [router.route(q) for q in questions]
    routed = route_all(settings, router, questions)
    assert routed.routes == routes
    work = predicted_work(questions, routed)
    assert work == [budget(settings, r) + len(q) // 64 for q, r in zip(questions, routes, strict=True)]
    shards = plan_shards(questions, routed, 6)
    totals = [sum(work[i] for i in shard) for shard in shards]
    assert max(totals) - min(totals) <= max(work)
    per_engine = [Counter(routes[i] for i in shard) for shard in shards]
    for route in set(routes):  # e.g. the 192-token questions, which decide the batch's length
        counts = [c[route] for c in per_engine]
        assert max(counts) - min(counts) <= 2, (route, counts)
    # contiguous shards would not be: the hard/long questions cluster in the file
    contiguous = [questions[len(questions) * k // 6: len(questions) * (k + 1) // 6] for k in range(6)]
    contiguous_work = [sum(predicted_work(part, route_all(settings, router, part))) for part in contiguous]
    assert max(contiguous_work) > 1.2 * max(totals)


def test_an_override_or_routing_off_gives_every_question_the_same_budget() -> None:
    questions = ["什么是warp？", "写出 __global__ void k() 的核心代码", "用伪代码写一下归约"]
    on = Settings.from_environ({})
    router = Router.from_settings(on)
    assert len(set(predicted_work(questions, route_all(on, router, questions)))) == 3
    assert route_all(on, router, questions, max_tokens=7).budgets == [7, 7, 7]
    off = Settings.from_environ({"DISABLE_TOKEN_ROUTING": "1"})
    assert route_all(off, Router.from_settings(off), questions).budgets == [off.max_new_tokens] * 3
