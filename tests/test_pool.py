"""The engine pool under faults (issues 13 and 22): every call ends, abandoned work stops, crashed workers come
back, and workers that fail together are one incident of the restart budget.

Real uvicorn processes on the demo model with the real vLLM CPU engine, real HTTP, real signals; the only
help is the worker's test-only fault switch (FAULT_INJECT), whose hold gate (``tests.conftest.Gate``) keeps a
batch in its worker until the test releases it, so that "in flight" is a state the test waits for, not a
moment it samples.  Two servers (an engine takes 30-60 s to start here): one worker with the async front end
(a fault, a dropped request, an engine death as a call is answered, SIGKILL of vLLM's EngineCore), and SIGKILL of the API process; and two workers with the sync front end, PRETOKENIZE=0 and RESTART_LIMIT=3
(a dropped request, an over-long question, one worker killed while the other answers, both stalled, both
killed, then the incident too many: exit 1).
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

from tests.conftest import (
    Gate,
    Service,
    demo_env,
    describe,
    group_processes,
    http_json,
    served,
    tree_groups,
    wait_for,
    wait_groups_gone,
)
from tests.test_service import SHORT, metric, overlong_fails_alone, questions

FAULT = "<<FAULT>>"  # a question with this text makes its call raise in the worker (FAULT_INJECT=raise_on=...)
DIE = "<<DIE>>"  # ... makes the engine count as dead once its call is answered (die_after=...)


def restart_deadline(svc: Service) -> float:
    """How long a restarted worker may take to serve again: the engine's start-up time, generously.

    "Engine start-up + 10 s" (issue 13), with the start-up measured on this server's first boot and tripled:
    on this 2-core machine, shared with other test runs, one start-up took 20 s and the next 150 s.
    """
    first = info(svc)["ready_after_s"] or 60
    return max(3 * first, 240) + 10


# --- helpers --------------------------------------------------------------------------------------


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


def single(svc: Service, question: str = SHORT) -> str:
    status, body = http_json("POST", svc.url + "/predict", {"prompt": question}, timeout=120)
    assert status == 200 and isinstance(body["response"], str) and body["response"], body
    return body["response"]


def answers_in_full(svc: Service, n: int = 200) -> None:
    status, body = http_json("POST", svc.url + "/predict", {"prompt": questions(n)})
    assert status == 200 and len(body["response"]) == n and "errors" not in body, str(body)[:500]
    assert all(isinstance(a, str) and a for a in body["response"])


class Request:
    """A /predict request on a thread: its reply and when it came."""

    def __init__(self, svc: Service, body: dict[str, Any], timeout: float = 300):
        self.reply: tuple[int, Any] | None = None
        self.at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(svc, body, timeout), daemon=True)
        self._thread.start()

    def _run(self, svc: Service, body: dict[str, Any], timeout: float) -> None:
        try:
            self.reply = http_json("POST", svc.url + "/predict", body, timeout=timeout)
        except OSError as exc:  # the server itself went away (SIGKILL of the API process)
            self.reply = (0, repr(exc))
        self.at = time.monotonic()

    def pending(self) -> bool:
        return self.reply is None

    def wait(self, timeout: float) -> tuple[int, Any]:
        self._thread.join(timeout)
        assert self.reply is not None, f"no reply within {timeout} s"
        return self.reply


def held_by(gate: Gate, pid: int) -> int:
    """How many questions the worker ``pid`` holds at the gate (0: none)."""
    return sum(int(m.read_text()) for m in gate.held() if m.name.startswith(f"held-{pid}-"))


def engine_tokens(svc: Service) -> float:
    """Tokens the engine(s) generated so far, counted step by step in the engine (aborted work included)."""
    return metric(svc, "qa_engine_generated_tokens_total")


def idle(svc: Service) -> bool:
    return metric(svc, "qa_in_flight_questions") == 0 and metric(svc, "qa_engine_running_sequences") == 0


BUDGET = 256  # tokens per question in the drop test: 2,000 questions are minutes of work for the CPU engine


def check_drop_stops_the_work(svc: Service) -> None:
    """A client drops 2,000 questions once the engine generates for them: it stops long before their end.

    The engine's own token counter says so, against the tokens per question the same engine generates for
    the same questions when nobody drops them.  Nothing is timed: the engine's end state is awaited.
    """
    wait_for(lambda: idle(svc), 60, "the engine idle before the test")
    start = engine_tokens(svc)
    status, body = http_json("POST", svc.url + "/predict", {"prompt": questions(20), "max_new_tokens": BUDGET})
    assert status == 200 and "errors" not in body, body
    per_question = (engine_tokens(svc) - start) / 20
    assert per_question > BUDGET / 4, f"{per_question:.0f} tokens a question: too few for a drop to show"
    before = engine_tokens(svc)
    payload = json.dumps({"prompt": questions(2000), "max_new_tokens": BUDGET}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as conn:
        conn.sendall(head + payload)
        wait_for(lambda: engine_tokens(svc) > before, 60, "the engine generating for the request")
    wait_for(lambda: idle(svc), 120, "the engine idle after the client went away", every=0.2)
    spent, whole = engine_tokens(svc) - before, 2000 * per_question
    assert spent < whole / 2, f"the engine generated {spent:.0f} of about {whole:.0f} tokens: it was not aborted"
    assert "the client went away" in svc.server.log()
    single(svc)


def crash_and_recover(svc: Service, gate: Gate, victim: Callable[[int], int]) -> None:
    """SIGKILL ``victim(worker pid)`` with a batch in the worker: 503, old group gone, back to batch, a full batch."""
    before = info(svc)
    (worker,) = before["workers"]
    old = worker["pid"]
    assert any(is_engine_core(p) for p in group(old)), "vLLM's processes are not in the worker's group"
    batch = Request(svc, {"prompt": gate.marked(questions(300))})
    gate.wait_held(1, unanswered=batch.pending)
    target = victim(old)
    gate.release()  # the batch goes on into the engine, and is killed there
    os.kill(target, signal.SIGKILL)
    status, body = batch.wait(60)
    assert status == 503 and body["error"] == "unavailable" and body["status_code"] == 503, body
    code, state = health(svc)  # the restart waits 1 s or more, then starts an engine: still down
    assert code == 503 and state["status"] == "error" and state["detail"], state
    assert http_json("GET", svc.url + "/health/ready")[0] == 503
    wait_for(lambda: not group(old), 10, "the old worker's group gone 10 s after the kill")
    wait_for(lambda: health(svc)[1].get("status") == "batch", restart_deadline(svc), "GET / back to batch", every=0.5)
    after = info(svc)
    assert after["workers"][0]["pid"] != old and after["restarts"] == before["restarts"] + 1, after
    newest = after["incidents"]["recent"][-1]
    assert newest["incident"] == after["workers"][0]["incident"] == before["incidents"]["total"] + 1, after
    assert newest["workers"] == ["engine worker"] and not newest["open"], newest
    assert http_json("GET", svc.url + "/health/ready")[0] == 200
    answers_in_full(svc)


def server(demo_model: Path, tmp: Path, **extra: str) -> Iterator[Service]:
    yield from served(tmp, demo_env(demo_model, SHUTDOWN_TIMEOUT="10", **extra), stop_timeout=30)


# --- one worker, async front end ------------------------------------------------------------------


@pytest.fixture(scope="class")
def faulty(demo_model: Path, gate: Gate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from server(demo_model, tmp_path_factory.mktemp("faulty"),
                      FAULT_INJECT=f"raise_on={FAULT};die_after={DIE};{gate.fault}")


class TestOneWorker:
    def test_a_fault_ends_its_call_alone(self, faulty: Service, gate: Gate) -> None:
        batch = Request(faulty, {"prompt": gate.marked(questions(200))})
        gate.wait_held(1, unanswered=batch.pending)
        status, body = http_json("POST", faulty.url + "/predict", {"prompt": [SHORT, f"{FAULT} 这个问题会出错"]},
                                 timeout=30)
        assert status == 500, body
        assert body["error"] == "engine_error" and body["status_code"] == 500 and body["field"] is None, body
        assert "FAULT_INJECT" in body["detail"] and "RuntimeError" in body["detail"], body
        status, body = http_json("POST", faulty.url + "/predict", {"prompt": f"{FAULT} 单个问题"}, timeout=30)
        assert status == 500 and body["error"] == "engine_error", body
        assert batch.pending(), "the held batch was answered while held"
        gate.release()
        status, answered = batch.wait(120)
        assert status == 200 and len(answered["response"]) == 200 and "errors" not in answered, str(answered)[:300]
        single(faulty)
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
        single(faulty)

    def test_sigkill_of_vllm_engine_core_mid_batch(self, faulty: Service, gate: Gate) -> None:
        crash_and_recover(faulty, gate, lambda worker: engine_core(worker).pid)

    def test_sigkill_of_the_api_process_leaves_nothing_behind(self, faulty: Service, gate: Gate) -> None:
        """Last on its service: SIGKILL of the API process with a batch held in its worker; within 10 s no
        process of its tree is left (the worker gets SIGTERM as its parent dies and takes its engine along)."""
        groups = tree_groups(faulty.server.pid)
        procs = group_processes(groups)
        names = " ".join(p.name() + " " + " ".join(p.cmdline()) for p in procs)
        assert "service.worker" in names and "VLLM::EngineCore" in names, describe(procs)
        assert len(groups) >= 2, describe(procs)  # the worker leads a group of its own
        batch = Request(faulty, {"prompt": gate.marked(questions(400))})
        gate.wait_held(1, unanswered=batch.pending)
        killed_at = time.monotonic()
        os.kill(faulty.server.pid, signal.SIGKILL)
        assert faulty.server.proc.wait(5) == -signal.SIGKILL
        left = wait_groups_gone(groups, 10 - (time.monotonic() - killed_at))
        assert not left, f"alive 10 s after SIGKILL of the API process:\n{describe(left)}"
        assert batch.wait(10)[0] == 0, batch.reply  # its connection broke: no answer from a killed server
        gate.close()


# --- two workers, sync front end, RESTART_LIMIT=3 ---------------------------------------------------

LIMIT = 3
STALL = 5  # ENGINE_STALL_TIMEOUT of the two-worker service: a held call is let go well within it


@pytest.fixture(scope="class")
def pair(demo_model: Path, gate: Gate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from server(demo_model, tmp_path_factory.mktemp("pair"), ENGINE_WORKERS="2", ENGINE_FRONTEND="sync",
                      GPU_MEMORY_UTILIZATION="0.1", VLLM_KV_CACHE_MEMORY_BYTES="256MiB",  # both start at once
                      PRETOKENIZE="0", FAULT_INJECT=gate.fault, ENGINE_STALL_TIMEOUT=str(STALL), RESTART_LIMIT=str(LIMIT),
                      RESTART_WINDOW="3600")


def wait_both_up(svc: Service) -> dict[str, Any]:
    wait_for(lambda: health(svc)[1] == {"status": "batch"}, restart_deadline(svc), "both workers up", every=0.5)
    now = info(svc)
    assert [w["state"] for w in now["workers"]] == ["up", "up"] and now["degraded"] is None, now
    return now


def check_one_incident_of_both(svc: Service, before: dict[str, Any], pids: list[int], cause: str) -> dict[str, Any]:
    """Both workers came back as one incident: one more in the budget, two more restarts, new pids."""
    after = wait_both_up(svc)
    budget, newest = after["incidents"], after["incidents"]["recent"][-1]
    assert budget["total"] == before["incidents"]["total"] + 1, budget
    assert sorted(newest["workers"]) == ["engine worker 1 of 2", "engine worker 2 of 2"], newest
    assert cause in newest["cause"] and not newest["open"] and len(newest["restarted_after_s"]) == 2, newest
    assert [w["incident"] for w in after["workers"]] == [newest["incident"]] * 2, after["workers"]
    assert after["restarts"] == before["restarts"] + 2, after
    assert not {w["pid"] for w in after["workers"]} & set(pids), after["workers"]
    wait_for(lambda: not [p for pid in pids for p in group(pid)], 10, "the old workers' groups gone")
    answers_in_full(svc)
    return after


class TestTwoWorkersAndIncidents:
    def test_a_dropped_request_is_aborted_in_the_stepped_engines(self, pair: Service) -> None:
        check_drop_stops_the_work(pair)

    def test_an_overlong_question_without_pretokenize_fails_alone(self, pair: Service) -> None:
        overlong_fails_alone(pair, "sync")

    def test_one_worker_killed_mid_batch_the_other_answers(self, pair: Service, gate: Gate) -> None:
        """The batch keeps the other worker's shard, singles go on while the killed one restarts, then back."""
        before = wait_both_up(pair)
        victim = before["workers"][1]["pid"]
        batch = Request(pair, {"prompt": gate.marked(questions(400))})
        gate.wait_held(2, unanswered=batch.pending)
        lost = held_by(gate, victim)
        assert 0 < lost < 400, gate.held()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: info(pair)["workers"][1]["state"] != "up", 10, "the killed worker seen down")
        gate.release()
        status, body = batch.wait(120)
        assert status == 200, str(body)[:500]
        answers, errors = body["response"], body["errors"]
        failed = {e["index"] for e in errors}
        assert len(answers) == 400 and len(failed) == lost, f"{len(failed)} item errors, the victim held {lost}"
        assert all("engine worker 2 of 2" in e["message"] for e in errors), errors[:3]
        assert all(answers[i] == "" for i in failed)
        assert all(isinstance(a, str) and a for i, a in enumerate(answers) if i not in failed)
        for _ in range(5):  # answered by the worker that is up
            single(pair)
        code, state = health(pair)
        assert code == 200 and state == {"status": "batch", "degraded": "1 of 2 engine workers restarting"}, state
        during = info(pair)
        assert during["degraded"] == "1 of 2 engine workers restarting" and during["workers"][1]["state"] != "up"
        assert http_json("GET", pair.url + "/health/ready")[0] == 200
        wait_for(lambda: not group(victim), 10, "the killed worker's group gone")
        after = wait_both_up(pair)
        assert after["restarts"] == before["restarts"] + 1 and after["workers"][1]["pid"] != victim, after
        assert after["incidents"]["total"] == before["incidents"]["total"] + 1
        assert after["workers"][0]["incident"] is None and after["workers"][1]["incident"] == 1, after["workers"]
        answers_in_full(pair)

    def test_both_stalled_then_both_killed_are_two_incidents_and_it_serves_again(
            self, pair: Service, gate: Gate) -> None:
        """SIGSTOP of both engines with a batch in flight, then SIGKILL of both workers: counted per worker
        these were four crashes, over RESTART_LIMIT=3 with the kill before; as incidents they are two."""
        before = wait_both_up(pair)
        pids = [w["pid"] for w in before["workers"]]
        cores = [engine_core(pid) for pid in pids]
        batch = Request(pair, {"prompt": gate.marked(questions(200))})
        gate.wait_held(2, unanswered=batch.pending)
        for core in cores:
            core.send_signal(signal.SIGSTOP)
        gate.release()  # both shards go to engines that make no progress
        status, body = batch.wait(120)
        assert status == 503 and f"ENGINE_STALL_TIMEOUT={STALL}" in body["detail"], body
        middle = check_one_incident_of_both(pair, before, pids, "made no progress")
        pids = [w["pid"] for w in middle["workers"]]
        batch = Request(pair, {"prompt": gate.marked(questions(200))})
        gate.wait_held(2, unanswered=batch.pending)
        for pid in pids:  # SIGKILL of the workers mid-batch (each holds its share)
            os.kill(pid, signal.SIGKILL)
        status, body = batch.wait(60)
        assert status == 503 and body["error"] == "unavailable" and body["status_code"] == 503, body
        gate.close()
        wait_for(lambda: health(pair)[0] == 503, 10, "the service down with both workers")
        # /v1 says so in OpenAI's shape while no worker is up (the restart waits 4 s, then starts engines).
        status, body = http_json("POST", pair.url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        after = check_one_incident_of_both(pair, middle, pids, "killed by SIGKILL")
        assert after["incidents"]["in_window"] == LIMIT and pair.server.proc.poll() is None, after["incidents"]
        log = pair.server.log()
        assert "incident 3 over: " in log and f"incident {after['incidents']['total']} opened" in log, log[-3000:]

    def test_one_incident_too_many_stops_the_service(self, pair: Service) -> None:
        proc = pair.server.proc
        workers = [w["pid"] for w in info(pair)["workers"]]
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(60) == 1, pair.server.log()[-3000:]
        log = pair.server.log()
        assert f"{LIMIT + 1} incidents within RESTART_WINDOW=3600 s, more than RESTART_LIMIT={LIMIT}" in log, log[-3000:]
        assert "killed by SIGKILL" in log and "exiting with code 1" in log, log[-3000:]
        wait_for(lambda: not [p for pgid in [proc.pid, *workers] for p in group(pgid)], 10,
                 "no process left after the service exited")
