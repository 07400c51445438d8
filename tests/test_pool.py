"""The engine pool under faults (issue 13): every call ends, abandoned work stops, crashed workers come back.

Real uvicorn processes on the demo model with the real vLLM CPU engine, real HTTP, real signals; the only
help is the worker's test-only fault switch (FAULT_INJECT).  Three servers, one per class (an engine takes
30-60 s to start here): one worker with the async front end (a fault, a dropped request, an engine death as
a call is answered, SIGKILL of the worker and of vLLM's EngineCore), two workers (one killed mid-batch), and
the sync front end with RESTART_LIMIT=1 (a dropped request, a stuck call, then the crash too many: exit 1).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Service, demo_env, http_json, served
from tests.test_service import SHORT, metric, questions

FAULT = "<<FAULT>>"  # a question with this text makes its call raise in the worker (FAULT_INJECT=raise_on=...)
HANG = "<<HANG>>"  # ... makes its call hang (hang_on=...): the stall detector must end it
DIE = "<<DIE>>"  # ... makes the engine count as dead once its call is answered (die_after=...)


def restart_deadline(svc: Service) -> float:
    """How long a restarted worker may take to serve again: the engine's start-up time, generously.

    "Engine start-up + 10 s" (issue 13), with the start-up measured on this server's first boot and tripled:
    on this 2-core machine, shared with other test runs, one start-up took 20 s and the next 150 s.
    """
    first = info(svc)["ready_after_s"] or 60
    return max(3 * first, 240) + 10


# --- helpers --------------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true; its value, or an AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(every)


def health(svc: Service) -> tuple[int, dict[str, Any]]:
    return http_json("GET", svc.url + "/", timeout=10)


def info(svc: Service) -> dict[str, Any]:
    status, body = http_json("GET", svc.url + "/info", timeout=10)
    assert status == 200, body
    return body


def group(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def is_engine_core(proc: psutil.Process) -> bool:
    try:
        return "EngineCor" in proc.name() or "EngineCore" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def engine_core(worker_pid: int) -> psutil.Process:
    """vLLM's ``VLLM::EngineCore`` process among the worker's descendants."""
    found = [proc for proc in psutil.Process(worker_pid).children(recursive=True) if is_engine_core(proc)]
    assert found, f"no VLLM::EngineCore under the worker {worker_pid}"
    return found[0]


def timed_single(svc: Service, question: str = SHORT) -> float:
    started = time.monotonic()
    status, body = http_json("POST", svc.url + "/predict", {"prompt": question}, timeout=120)
    assert status == 200, body
    return time.monotonic() - started


class Request:
    """A /predict request on a thread: its reply and when it came."""

    def __init__(self, svc: Service, body: dict[str, Any], timeout: float = 300):
        self.reply: tuple[int, Any] | None = None
        self.at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(svc, body, timeout), daemon=True)
        self._thread.start()

    def _run(self, svc: Service, body: dict[str, Any], timeout: float) -> None:
        self.reply = http_json("POST", svc.url + "/predict", body, timeout=timeout)
        self.at = time.monotonic()

    def wait(self, timeout: float) -> tuple[int, Any]:
        self._thread.join(timeout)
        assert self.reply is not None, f"no reply within {timeout} s"
        return self.reply


def in_flight(svc: Service, request: Request, timeout: float = 60) -> None:
    """Return once the engine has questions in flight while ``request`` has no answer yet."""
    def seen() -> bool:
        assert request.reply is None, f"answered before it was seen in flight: {str(request.reply)[:300]}"
        return metric(svc, "qa_in_flight_questions") >= 1

    wait_for(seen, timeout, "questions in flight")


def drop_after(svc: Service, n: int, seconds: float) -> float:
    """Send ``n`` questions, close the connection ``seconds`` later (engine seen busy); when it was closed."""
    body = json.dumps({"prompt": questions(n)}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    conn = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    sent = time.monotonic()
    conn.sendall(head + body)
    wait_for(lambda: metric(svc, "qa_engine_running_sequences") > 0, 30, "the engine running the request")
    time.sleep(max(0.0, sent + seconds - time.monotonic()))
    assert metric(svc, "qa_engine_running_sequences") > 0, "the request finished before it was dropped"
    conn.close()
    return time.monotonic()


def check_drop_stops_the_work(svc: Service) -> None:
    """A client drops 2,000 questions after 2 s: running sequences 0 within 2 s, then a normal single answer."""
    normal = max(timed_single(svc) for _ in range(3))
    closed = drop_after(svc, 2000, 2.0)
    wait_for(lambda: metric(svc, "qa_engine_running_sequences") == 0 and metric(svc, "qa_in_flight_questions") == 0,
             2.0, "the engine idle after the client went away")
    assert time.monotonic() - closed < 2.0
    took = timed_single(svc)
    assert took <= normal + 1.0, f"a single question took {took:.2f} s after the drop (normally {normal:.2f} s)"
    assert "the client went away" in svc.server.log()


def crash_and_recover(svc: Service, victim: Callable[[int], int]) -> None:
    """SIGKILL ``victim(worker pid)`` mid-batch: 503 within 5 s, old group gone, back to batch, a full batch."""
    before = info(svc)
    (worker,) = before["workers"]
    old = worker["pid"]
    assert any(is_engine_core(p) for p in group(old)), "vLLM's processes are not in the worker's group"
    batch = Request(svc, {"prompt": questions(300)})
    in_flight(svc, batch)
    killed_at = time.monotonic()
    os.kill(victim(old), signal.SIGKILL)
    status, body = batch.wait(10)
    assert batch.at is not None and batch.at - killed_at < 5.0, f"the request took {batch.at - killed_at:.1f} s"
    assert status == 503 and body["error"] == "unavailable" and body["status_code"] == 503, body
    code, state = health(svc)
    assert code == 503 and state["status"] == "error" and state["detail"], state
    assert http_json("GET", svc.url + "/health/ready")[0] == 503
    time.sleep(max(0.0, killed_at + 10 - time.monotonic()))
    left = group(old)
    assert not left, f"processes of the old worker's group alive 10 s after the kill: {left}"
    wait_for(lambda: health(svc)[1].get("status") == "batch", restart_deadline(svc), "GET / back to batch", every=0.5)
    after = info(svc)
    assert after["workers"][0]["pid"] != old and after["restarts"] == before["restarts"] + 1, after
    assert http_json("GET", svc.url + "/health/ready")[0] == 200
    status, body = http_json("POST", svc.url + "/predict", {"prompt": questions(200)})
    assert status == 200 and len(body["response"]) == 200 and "errors" not in body, str(body)[:500]
    assert all(isinstance(a, str) and a for a in body["response"])


def server(demo_model: Path, tmp: Path, **extra: str) -> Iterator[Service]:
    yield from served(tmp, demo_env(demo_model, SHUTDOWN_TIMEOUT="10", **extra), stop_timeout=30)


# --- one worker, async front end ------------------------------------------------------------------


@pytest.fixture(scope="class")
def faulty(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from server(demo_model, tmp_path_factory.mktemp("faulty"),
                      FAULT_INJECT=f"raise_on={FAULT};die_after={DIE}")


class TestOneWorker:
    def test_a_fault_ends_its_call_alone(self, faulty: Service) -> None:
        batch = Request(faulty, {"prompt": questions(200)})
        in_flight(faulty, batch)
        started = time.monotonic()
        status, body = http_json("POST", faulty.url + "/predict", {"prompt": [SHORT, f"{FAULT} 这个问题会出错"]},
                                 timeout=30)
        assert time.monotonic() - started < 5.0
        assert status == 500, body
        assert body["error"] == "engine_error" and body["status_code"] == 500 and body["field"] is None, body
        assert "FAULT_INJECT" in body["detail"] and "RuntimeError" in body["detail"], body
        faulted_at = time.monotonic()
        status, body = http_json("POST", faulty.url + "/predict", {"prompt": f"{FAULT} 单个问题"}, timeout=30)
        assert status == 500 and body["error"] == "engine_error", body
        status, answered = batch.wait(120)
        assert status == 200 and len(answered["response"]) == 200 and "errors" not in answered, str(answered)[:300]
        assert batch.at is not None and batch.at > faulted_at, "the concurrent batch was not in flight during the fault"
        assert timed_single(faulty) < 30
        assert health(faulty) == (200, {"status": "batch"})
        log = faulty.server.log()
        # The traceback is logged once per failed call, in the worker (its raising line appears once in each).
        assert log.count('raise RuntimeError("FAULT_INJECT') == 2, log[-3000:]
        assert info(faulty)["restarts"] == 0

    def test_a_dropped_request_is_aborted_in_the_engine(self, faulty: Service) -> None:
        check_drop_stops_the_work(faulty)

    def test_an_answer_made_as_the_engine_dies_reaches_its_caller(self, faulty: Service) -> None:
        """The worker sees its engine die in the round before this call's reply leaves: the reply still goes
        first, then the death (the API process ends every open call at the first Dead or Failed frame)."""
        before = info(faulty)
        (worker,) = before["workers"]
        status, body = http_json("POST", faulty.url + "/predict", {"prompt": [SHORT, f"{DIE} 答完这个引擎就算死了"]},
                                 timeout=60)
        assert status == 200, body
        assert len(body["response"]) == 2 and "errors" not in body and all(body["response"]), body
        assert "FAULT_INJECT: the engine counts as dead" in faulty.server.log()
        wait_for(lambda: health(faulty)[1].get("status") == "batch" and info(faulty)["restarts"] == before["restarts"] + 1,
                 restart_deadline(faulty), "the worker restarted and back to batch", every=0.5)
        assert info(faulty)["workers"][0]["pid"] != worker["pid"]
        wait_for(lambda: not group(worker["pid"]), 10, "the old worker's processes gone")
        assert timed_single(faulty) < 30

    def test_sigkill_of_the_worker_mid_batch(self, faulty: Service) -> None:
        crash_and_recover(faulty, lambda worker: worker)

    def test_sigkill_of_vllm_engine_core_mid_batch(self, faulty: Service) -> None:
        crash_and_recover(faulty, lambda worker: engine_core(worker).pid)


# --- two workers ------------------------------------------------------------------------------------


@pytest.fixture
def pair(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from server(demo_model, tmp_path_factory.mktemp("pair"), ENGINE_WORKERS="2", GPU_MEMORY_UTILIZATION="0.1",
                      VLLM_KV_CACHE_MEMORY_BYTES="256MiB")  # a fixed KV cache: both engines start at once


def test_two_workers_one_killed_mid_batch(pair: Service) -> None:
    """The other worker keeps answering single questions; the batch keeps the other shard; degraded, then back."""
    workers = info(pair)["workers"]
    assert [w["state"] for w in workers] == ["up", "up"]
    victim = workers[1]["pid"]
    batch = Request(pair, {"prompt": questions(400)})
    in_flight(pair, batch)
    singles: list[tuple[int, Any]] = []
    stop = threading.Event()

    def ask_singles() -> None:  # one every 0.5 s: enough to see, not enough to starve the restarting engine
        while not stop.is_set():
            singles.append(http_json("POST", pair.url + "/predict", {"prompt": SHORT}, timeout=60))
            stop.wait(0.5)

    asker = threading.Thread(target=ask_singles, daemon=True)
    asker.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        status, body = batch.wait(120)
        assert status == 200, str(body)[:500]
        answers, errors = body["response"], body["errors"]
        assert len(answers) == 400
        failed = {e["index"] for e in errors}
        assert all("engine worker 2 of 2" in e["message"] for e in errors), errors[:3]
        assert 150 <= len(failed) <= 250, f"{len(failed)} item errors: not one worker's shard of 400"
        assert all(answers[i] == "" for i in failed)
        assert all(isinstance(a, str) and a for i, a in enumerate(answers) if i not in failed)
        code, state = health(pair)
        assert code == 200 and state == {"status": "batch", "degraded": "1 of 2 engine workers restarting"}, state
        assert info(pair)["degraded"] == "1 of 2 engine workers restarting"
        assert http_json("GET", pair.url + "/health/ready")[0] == 200
        time.sleep(max(0.0, killed_at + 10 - time.monotonic()))
        assert not group(victim), "processes of the killed worker's group are alive 10 s later"
        assert health(pair)[1].get("degraded"), "the killed worker is back already: nothing was tested"
    finally:
        stop.set()
        asker.join(90)
    # Singles stop here: on this CPU every engine's OpenMP threads are bound to core 0, and a busy neighbour
    # slows the restarting engine's start-up (its compilation) by an order of magnitude.
    bad = [reply for reply in singles if reply[0] != 200]
    assert len(singles) >= 10 and not bad, f"{len(singles)} single questions, failed: {bad[:3]}"
    wait_for(lambda: health(pair)[1] == {"status": "batch"}, restart_deadline(pair), "both workers up again",
             every=0.5)
    after = info(pair)
    assert after["degraded"] is None and after["restarts"] == 1 and after["workers"][1]["pid"] != victim
    status, body = http_json("POST", pair.url + "/predict", {"prompt": questions(200)})
    assert status == 200 and "errors" not in body and len(body["response"]) == 200


# --- sync front end, RESTART_LIMIT=1 ------------------------------------------------------------------


@pytest.fixture(scope="class")
def fragile(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from server(demo_model, tmp_path_factory.mktemp("fragile"), ENGINE_FRONTEND="sync",
                      FAULT_INJECT=f"hang_on={HANG}", ENGINE_STALL_TIMEOUT="5", RESTART_LIMIT="1",
                      RESTART_WINDOW="300")


class TestSyncFrontEndAndRestartLimit:
    def test_a_dropped_request_is_aborted_in_the_stepped_engine(self, fragile: Service) -> None:
        check_drop_stops_the_work(fragile)

    def test_a_stuck_call_is_treated_as_a_dead_worker(self, fragile: Service) -> None:
        old = info(fragile)["workers"][0]["pid"]
        started = time.monotonic()
        status, body = http_json("POST", fragile.url + "/predict", {"prompt": f"{HANG} 会卡住的问题"}, timeout=60)
        assert 5.0 <= time.monotonic() - started < 15.0
        assert status == 503 and "ENGINE_STALL_TIMEOUT=5" in body["detail"], body
        wait_for(lambda: health(fragile)[1].get("status") == "batch", restart_deadline(fragile), "GET / back to batch",
                 every=0.5)
        assert info(fragile)["workers"][0]["pid"] != old and not group(old)
        assert timed_single(fragile) < 30

    def test_one_crash_too_many_stops_the_service(self, fragile: Service) -> None:
        proc = fragile.server.proc
        worker = info(fragile)["workers"][0]["pid"]
        groups = [proc.pid, worker]
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(60) == 1, fragile.server.log()[-3000:]
        log = fragile.server.log()
        assert "RESTART_LIMIT=1" in log and "RESTART_WINDOW=300" in log and "killed by SIGKILL" in log, log[-3000:]
        assert "exiting with code 1" in log
        time.sleep(2)
        left = [p for pgid in groups for p in group(pgid)]
        assert not left, f"processes left after the service exited: {left}"
