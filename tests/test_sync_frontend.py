"""``ENGINE_FRONTEND=sync``: the real vLLM CPU engine as ``LLMEngine`` stepped on a thread, over real HTTP.

The answers must be the default (``AsyncLLM``) service's, item errors stay per item, concurrent requests
batch together within ``BATCH_CONCURRENCY``, and a Ctrl-C during a (held) batch still stops the whole tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.client import generated_tokens
from tests.conftest import Gate, Service, demo_env, http_json, start_service
from tests.test_service import SHORT, engine_peak_over_singles, questions, stop_during_batch

LIMIT = 8  # BATCH_CONCURRENCY of the stepped service: the most questions in its engine at once


@pytest.fixture(scope="module")
def stepped(demo_model: Path, gate: Gate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("stepped"),
                        demo_env(demo_model, ENGINE_FRONTEND="sync", BATCH_CONCURRENCY=str(LIMIT),
                                 SHUTDOWN_TIMEOUT="20", FAULT_INJECT=gate.fault))
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.server.stop(timeout=5)


def test_sync_front_end_batches_concurrent_requests_within_the_limit(stepped: Service) -> None:
    """First on the module's service: the engine's peak must be this test's (``engine_peak_over_singles``)."""
    most = engine_peak_over_singles(stepped, 96, 32)
    assert 4 <= most <= LIMIT, f"{most} at once: requests were serialised (< 4) or BATCH_CONCURRENCY ignored (> {LIMIT})"


def test_sync_front_end_gives_the_async_answers(stepped: Service, service: Service) -> None:
    qs = questions(60)
    qs[41] = "很长的问题" * 2000
    status, expected = http_json("POST", service.url + "/predict", {"prompt": qs})
    assert status == 200, expected
    status, body = http_json("POST", stepped.url + "/predict", {"prompt": qs})
    assert status == 200, body
    assert body["response"] == expected["response"]
    assert [e["index"] for e in body["errors"]] == [41]
    assert "MAX_MODEL_LEN" in body["errors"][0]["message"]
    assert http_json("POST", stepped.url + "/predict", {"prompt": SHORT}) == \
        http_json("POST", service.url + "/predict", {"prompt": SHORT})
    log = stepped.server.log()
    assert "LLMEngine front end" in log
    # Both processes froze their start-up heap before serving (no full collection inside the first request).
    assert "engine worker: " in log and "API process: " in log and "objects frozen" in log
    assert http_json("GET", stepped.url + "/info")[1]["settings"]["ENGINE_FRONTEND"] == "sync"


def generated(svc: Service) -> float:
    return generated_tokens(http_json("GET", svc.url + "/metrics")[1])


def test_sync_front_end_overrides_reach_the_engine(stepped: Service) -> None:
    before = generated(stepped)
    status, reply = http_json("POST", stepped.url + "/predict", {"prompt": questions(4), "max_new_tokens": 3})
    assert status == 200, reply
    middle = generated(stepped)
    status, reply = http_json("POST", stepped.url + "/predict", {"prompt": questions(4), "max_new_tokens": 30})
    assert status == 200, reply
    assert 4 <= middle - before <= 12, middle - before
    assert generated(stepped) - middle > 12


def test_sync_front_end_ctrl_c_to_the_process_group_drains_then_stops(stepped: Service, gate: Gate) -> None:
    """Last on the module's service: a terminal's Ctrl-C signals the whole foreground group; the (held) batch in
    flight still completes. (SIGTERM: tests/test_service.py's two-worker server; the over-long question with
    PRETOKENIZE=0 on the stepped engine: tests/test_pool.py's two-worker service, which runs this front end.)"""
    stop_during_batch(stepped, gate, 200, ctrl_c=True)
