"""End-to-end: the real vLLM CPU engine on the demo model behind a real uvicorn process, over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from env import probe_hardware
from tests.conftest import (
    SHARED_DATA,
    Gate,
    Service,
    demo_env,
    describe,
    group_processes,
    http_json,
    port_is_free,
    served,
    start_service,
    tree_groups,
    wait_for,
)

SHORT = "什么是CUDA中的线程块？"
HARD = "请解释下面的代码：__global__ void add(float *a) { a[threadIdx.x] += 1; } 以及 kernel<<<1, 32>>>(a) 的含义"


def metric(svc: Service, name: str, labels: str = "") -> float:
    status, text = http_json("GET", svc.url + "/metrics")
    assert status == 200
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.MULTILINE)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def questions(n: int) -> list[str]:
    if SHARED_DATA.is_file():
        out = []
        with SHARED_DATA.open(encoding="utf-8") as f:
            for line in f:
                out.append(json.loads(line)["messages"][0]["content"])
                if len(out) == n:
                    return out
    return [f"第{i}个问题：什么是共享内存？" for i in range(n)]


class Batch:
    """A list request of the given questions on a thread, and its reply."""

    def __init__(self, svc: Service, qs: list[str]):
        self.svc, self.n = svc, len(qs)
        self.reply: tuple[int, object] | None = None
        self.thread = threading.Thread(target=self._ask, args=(qs,), daemon=True)
        self.thread.start()

    def _ask(self, qs: list[str]) -> None:
        self.reply = http_json("POST", self.svc.url + "/predict", {"prompt": qs})

    def pending(self) -> bool:
        return self.reply is None

    def check_answered(self, timeout: float = 120) -> None:
        """The whole batch answered."""
        self.thread.join(timeout)
        assert self.reply is not None, f"the batch got no answer within {timeout} s"
        status, body = self.reply
        assert status == 200 and isinstance(body, dict) and len(body["response"]) == self.n, (status, body)
        assert "errors" not in body and all(body["response"]), str(body)[:500]


def test_health_goes_warming_then_batch(service: Service) -> None:
    assert service.seen[0] == "warming"
    assert service.seen[-1] == "batch"
    assert http_json("GET", service.url + "/health/ready")[0] == 200
    assert http_json("GET", service.url + "/health/live") == (200, {"status": "alive"})


def test_list_of_200_in_order(service: Service) -> None:
    qs = questions(200)
    status, body = http_json("POST", service.url + "/predict", {"prompt": qs})
    assert status == 200, body
    answers = body["response"]
    assert isinstance(answers, list) and len(answers) == 200
    assert all(isinstance(a, str) for a in answers)
    assert "errors" not in body
    # Order: each answer is the answer to its own question (greedy decoding is deterministic).
    for index in (0, 57, 199):
        status, single = http_json("POST", service.url + "/predict", {"prompt": qs[index]})
        assert status == 200
        assert single["response"] == answers[index], index


def test_single_string_gives_string(service: Service) -> None:
    status, body = http_json("POST", service.url + "/predict", {"prompt": SHORT})
    assert status == 200
    assert isinstance(body["response"], str)


def test_overrides_change_length(service: Service) -> None:
    before = metric(service, "qa_generated_tokens_total", '{route="hard"}')
    status, short = http_json("POST", service.url + "/predict", {"prompt": [HARD], "max_new_tokens": 4})
    assert status == 200
    middle = metric(service, "qa_generated_tokens_total", '{route="hard"}')
    status, long = http_json("POST", service.url + "/predict", {"prompt": [HARD], "max_new_tokens": 40})
    assert status == 200
    after = metric(service, "qa_generated_tokens_total", '{route="hard"}')
    assert middle - before <= 4
    assert after - middle > 4
    assert len(long["response"][0]) > len(short["response"][0])


def test_routing_reaches_the_engine(service: Service) -> None:
    """A hard code question is generated past MAX_NEW_TOKENS (64): its routed budget (192) reached vLLM."""
    before_hard = metric(service, "qa_generated_tokens_total", '{route="hard"}')
    before_short = metric(service, "qa_generated_tokens_total", '{route="short"}')
    status, body = http_json("POST", service.url + "/predict", {"prompt": [SHORT, HARD]})
    assert status == 200
    hard = metric(service, "qa_generated_tokens_total", '{route="hard"}') - before_hard
    short = metric(service, "qa_generated_tokens_total", '{route="short"}') - before_short
    assert 64 < hard <= 192, hard
    assert 0 < short <= 64, short


def test_one_overlong_question_fails_alone(service: Service) -> None:
    qs = questions(100)
    qs[37] = "很长的问题" * 2000
    status, body = http_json("POST", service.url + "/predict", {"prompt": qs})
    assert status == 200, body
    assert len(body["response"]) == 100
    assert body["response"][37] == ""
    assert [e["index"] for e in body["errors"]] == [37]
    assert "MAX_MODEL_LEN" in body["errors"][0]["message"]
    delivered = [a for i, a in enumerate(body["response"]) if i != 37]
    assert len(delivered) == 99 and all(isinstance(a, str) and a for a in delivered)


def overlong_fails_alone(svc: Service, frontend: str) -> None:
    """PRETOKENIZE=0: vLLM itself meets the over-long question; it fails alone and the server answers on."""
    qs = questions(20)
    qs[7] = "很长的问题" * 2000
    for body in ({"prompt": qs}, {"prompt": SHORT}):
        try:
            status, reply = http_json("POST", svc.url + "/predict", body, timeout=120)
        except TimeoutError:
            raise AssertionError(f"{frontend}: no answer in 120 s to {str(body)[:40]}:\n"
                                 f"{svc.server.log()[-3000:]}") from None
        assert status == 200, (frontend, reply)
        if isinstance(body["prompt"], list):
            assert len(reply["response"]) == 20 and reply["response"][7] == "", reply
            assert [e["index"] for e in reply.get("errors", [])] == [7] and reply["errors"][0]["message"]
            assert all(a for i, a in enumerate(reply["response"]) if i != 7), reply
        else:
            assert isinstance(reply["response"], str) and reply["response"]


MALFORMED: list[tuple[str, str, bytes | None, str]] = [
    ("POST", "/predict", b"", "empty"),
    ("POST", "/predict", b"   ", "empty"),
    ("POST", "/predict", b"{", "JSON"),
    ("POST", "/predict", b"not json", "JSON"),
    ("POST", "/predict", b"[1, 2]", "object"),
    ("POST", "/predict", b'"just a string"', "object"),
    ("POST", "/predict", b"null", "object"),
    ("POST", "/predict", b"{}", "prompt"),
    ("POST", "/predict", b'{"prompt": null}', "prompt"),
    ("POST", "/predict", b'{"prompt": 5}', "prompt"),
    ("POST", "/predict", b'{"prompt": {"a": 1}}', "prompt"),
    ("POST", "/predict", b'{"prompt": []}', "prompt"),
    ("POST", "/predict", b'{"prompt": ["ok", 3]}', "prompt[1]"),
    ("POST", "/predict", b'{"prompt": ["ok", null]}', "prompt[1]"),
    ("POST", "/predict", b'{"prompt": "q", "temperature": 1e9}', "temperature"),
    ("POST", "/predict", b'{"prompt": "q", "temperature": -1}', "temperature"),
    ("POST", "/predict", b'{"prompt": "q", "temperature": 3}', "[0, 2]"),
    ("POST", "/predict", b'{"prompt": "q", "temperature": "hot"}', "temperature"),
    ("POST", "/predict", b'{"prompt": "q", "top_k": -7}', "top_k"),
    ("POST", "/predict", b'{"prompt": "q", "top_k": 1.5}', "top_k"),
    ("POST", "/predict", b'{"prompt": "q", "top_p": 5}', "top_p"),
    ("POST", "/predict", b'{"prompt": "q", "top_p": 0}', "top_p"),
    ("POST", "/predict", b'{"prompt": "q", "max_new_tokens": 0}', "max_new_tokens"),
    ("POST", "/predict", b'{"prompt": "q", "max_new_tokens": -5}', "max_new_tokens"),
    ("POST", "/predict", b'{"prompt": "q", "max_new_tokens": 999999}', "max_new_tokens"),
    ("POST", "/predict", b'{"prompt": "q", "max_new_tokens": "many"}', "max_new_tokens"),
    ("POST", "/predict", b'{"prompt": "q", "repetition_penalty": 0}', "repetition_penalty"),
    ("POST", "/predict", b'{"prompt": "q", "repetition_penalty": -1}', "repetition_penalty"),
    ("POST", "/predict", b'{"prompt": "q", "top_k": 100000000000000000000}', "top_k"),
    ("POST", "/predict", b'{"prompt": "q", "frequency_penalty": 3}', "frequency_penalty"),
    ("POST", "/predict", b'{"prompt": "q", "unknown": 1}', "unknown"),
    ("POST", "/predict", b"{\"prompt\": \"\\ud800\"}", ""),
    ("POST", "/predict", b"\xff\xfe\x00", "JSON"),
    ("POST", "/predict", ("很长的问题" * 3000).join(['{"prompt": "', '"}']).encode(), "MAX_MODEL_LEN"),
    ("GET", "/predict", None, "Method"),
    ("PUT", "/predict", b"{}", "Method"),
    ("GET", "/nowhere", None, "Not Found"),
    ("POST", "/system_prompt", b"{}", "system_prompt"),
    ("POST", "/system_prompt", b'{"system_prompt": 3}', "system_prompt"),
    ("POST", "/system_prompt", b"nope", "JSON"),
]


def test_malformed_requests_are_4xx_and_harmless(service: Service) -> None:
    failed = metric(service, "qa_requests_total", '{path="/predict",status="500"}')
    answered = metric(service, "qa_requests_total", '{path="/predict",status="200"}')
    for method, path, body, needle in MALFORMED:
        status, reply = http_json(method, service.url + path, body, **{"Content-Type": "application/json"})
        assert 400 <= status < 500, (method, path, body[:60] if body else body, status, reply)
        assert isinstance(reply, dict) and reply["status_code"] == status, reply
        assert reply["error"] and reply["detail"], reply
        text = reply["detail"] + " " + str(reply.get("field") or "")
        assert needle.lower() in text.lower(), (body[:60] if body else body, reply)
    status, body = http_json("POST", service.url + "/predict", {"prompt": [SHORT, SHORT]})
    assert status == 200 and len(body["response"]) == 2
    assert metric(service, "qa_requests_total", '{path="/predict",status="500"}') == failed
    assert metric(service, "qa_requests_total", '{path="/predict",status="200"}') == answered + 1


def test_oversized_body_is_413(service: Service) -> None:
    # MAX_REQUEST_BYTES is 64 MiB by default: announce 65 MiB; the server refuses before reading it.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(65 * 1024 * 1024))
    conn.endheaders()
    conn.send(b'{"prompt": "' + b"a" * 65536)
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    conn.close()
    assert resp.status == 413, reply
    assert "MAX_REQUEST_BYTES" in reply["detail"]


def ask_singles(svc: Service, qs: list[str], clients: int) -> list[str]:
    """Each question in a POST /predict of its own, from ``clients`` threads at once; every one answered."""

    def ask(q: str) -> str:
        status, body = http_json("POST", svc.url + "/predict", {"prompt": q})
        assert status == 200, body
        return body["response"]

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, qs))
    assert len(answers) == len(qs) and all(isinstance(a, str) for a in answers)
    return answers


def stop_during_batch(svc: Service, gate: Gate, n: int, workers: int = 1, ctrl_c: bool = False) -> None:
    """SIGTERM (or a terminal's Ctrl-C to the process group) while n questions are held in the engine worker(s):
    the server drains, answers them in full once they are let go, exits 0; no process left, port free; the
    shutdown checked its tree before it said the engine stopped."""
    proc = svc.server.proc
    groups = tree_groups(proc.pid)
    assert len(groups) >= 1 + workers, groups  # the API process's group and one per engine worker
    batch = Batch(svc, gate.marked(questions(n)))
    gate.wait_held(workers, unanswered=batch.pending)
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)  # the server runs in its own session: this is its Ctrl-C
    else:
        proc.terminate()
    wait_for(lambda: "Waiting for connections to close" in svc.server.log(), 30, "uvicorn draining the batch")
    assert proc.poll() is None and batch.pending(), "the server did not wait for the held batch"
    gate.release()
    assert proc.wait(90) == 0, svc.server.log()[-3000:]
    batch.check_answered(30)
    left = group_processes(groups)
    assert not left, f"alive when the API process exited:\n{describe(left)}"
    assert port_is_free(svc.port)
    log = svc.server.log()
    # The shutdown checked its tree (service.procs.assert_tree_gone) before it said the engine stopped.
    checked = log.find("[service] shutdown check: no process of the service's tree is left")
    assert -1 < checked < log.find("[service] engine stopped"), log[-3000:]


def engine_peak_over_singles(svc: Service, n: int, clients: int,
                             peak: str = "qa_engine_running_sequences_peak") -> float:
    """The most sequences the engine ran at once while n one-question requests came from ``clients`` threads.

    Read from the engine's own peak (updated at every step; ``qa_in_flight_questions_peak`` without the engine's
    statistics: the questions inside the engine at once) on a service that has answered nothing yet.  Sampling
    the current gauge instead can miss the opening burst on a 2-core host: vLLM's CPU engine keeps both cores
    busy (its core process spins while its worker computes), the service's own processes get what is left, a
    /metrics sample then takes seconds, and after the burst the engine can settle at one question at a time (a
    CI run sampled a maximum of 1 that way).
    """
    before = metric(svc, peak)
    assert before == 0, f"peak {before} before the requests: the service must not have answered anything yet"
    finished = metric(svc, "qa_questions_total")
    ask_singles(svc, questions(n), clients)
    assert metric(svc, "qa_questions_total") - finished == n
    # The worker pushes its counters when they change: wait until it has pushed the end of this work (nothing
    # in flight, nothing running), so the peak read next is the whole run's.
    wait_for(lambda: metric(svc, "qa_in_flight_questions") == 0 and metric(svc, "qa_engine_running_sequences") == 0
             and metric(svc, peak) > 0, 10, "the engine's counters at rest")
    return metric(svc, peak)


def test_info_masks_secrets_and_shows_settings(service: Service) -> None:
    status, info = http_json("GET", service.url + "/info")
    assert status == 200
    assert info["backend"] == "vllm"
    assert info["settings"]["MODEL_ID"] == "demo"
    assert info["settings"]["MAX_MODEL_LEN"] == 1024
    assert info["chat_format"] == "fast"
    assert info["settings"]["MODELSCOPE_API_TOKEN"] in ("", "***")
    workers = info["layout"]["ENGINE_WORKERS"]  # demo.env leaves the engine layout to `auto`
    assert workers["source"] == "auto" and workers["reason"]
    if probe_hardware().gpus == 0:
        assert workers == {"value": "1", "source": "auto", "reason": "no NVIDIA GPU: the engine's defaults"}


def test_system_prompt_round_trip_from_loopback(service: Service) -> None:
    status, before = http_json("GET", service.url + "/system_prompt")
    assert status == 200 and before["system_prompt"]
    try:
        status, body = http_json("POST", service.url + "/system_prompt", {"system_prompt": "你是GPU编程助教。"})
        assert status == 200 and body["system_prompt"] == "你是GPU编程助教。"
        assert http_json("GET", service.url + "/system_prompt")[1]["system_prompt"] == "你是GPU编程助教。"
        assert http_json("POST", service.url + "/predict", {"prompt": SHORT})[0] == 200
    finally:
        http_json("POST", service.url + "/system_prompt", before)


@pytest.fixture(scope="module")
def guarded(demo_model: Path, gate: Gate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The module's second server, every setting the session's does not have: ADMIN_TOKEN, two engine workers
    (started at once: the test servers' fixed KV cache), vLLM tokenizing the prompts (PRETOKENIZE=0), each answer
    decoded once at the end, no engine statistics (DETOKENIZE_AT_END=1, ENGINE_STATS=0), and the hold gate.
    Its tests run in file order: the first needs a service that has answered nothing yet, the last stops it."""
    yield from served(tmp_path_factory.mktemp("guarded"),
                      demo_env(demo_model, ADMIN_TOKEN="s3cret-token", SHUTDOWN_TIMEOUT="20", ENGINE_WORKERS="2",
                               PRETOKENIZE="0", DETOKENIZE_AT_END="1", ENGINE_STATS="0", FAULT_INJECT=gate.fault),
                      stop_timeout=5)


def test_concurrent_singles_share_the_engines(guarded: Service) -> None:
    most = engine_peak_over_singles(guarded, 128, 64, peak="qa_in_flight_questions_peak")
    # Serialised requests show 1; the bound is one that only batching across requests reaches.
    assert most >= 4, f"the engines never had more than {most} of these questions at once: requests were serialised"


def test_overlong_question_without_pretokenize_fails_alone(guarded: Service) -> None:
    overlong_fails_alone(guarded, "async")


def test_two_engine_workers_split_a_request_and_keep_its_order(guarded: Service, service: Service, gate: Gate) -> None:
    """ENGINE_WORKERS=2: the questions are split over two engines at once and merged back in order.

    This service also lets vLLM tokenize, decodes each answer once at the end and keeps no engine statistics
    (PRETOKENIZE=0, DETOKENIZE_AT_END=1, ENGINE_STATS=0): its answers are still the default service's, and
    /metrics leaves out the scheduler's counts.
    """
    qs = questions(60)
    qs[41] = "很长的问题" * 2000
    status, expected = http_json("POST", service.url + "/predict", {"prompt": qs})
    assert status == 200
    workers = [w for w in http_json("GET", guarded.url + "/info")[1]["workers"] if w["state"] == "up"]
    assert len(workers) == 2, workers
    status, body = http_json("POST", guarded.url + "/predict", {"prompt": qs})
    assert status == 200, body
    assert body["response"] == expected["response"]
    assert [e["index"] for e in body["errors"]] == [41]
    assert http_json("POST", guarded.url + "/predict", {"prompt": SHORT})[0] == 200
    # Both engines have their share at once, not one after the other: both shares wait at the gate together.
    batch = Batch(guarded, gate.marked(questions(60)))
    gate.wait_held(2, unanswered=batch.pending)
    shares = [int(m.read_text()) for m in gate.held()]
    assert sum(shares) == 60 and min(shares) > 0, shares
    gate.release()
    batch.check_answered()
    status, text = http_json("GET", guarded.url + "/metrics")
    assert status == 200 and "qa_engine_running_sequences" not in text, text
    assert "vllm:" not in text  # ENGINE_STATS=0: vLLM's own metrics are off too (service.pool.vllm_metrics)
    # A fixed KV cache: both engines start at once (no memory profiling to disturb); both inits before a ready.
    log = guarded.server.log()
    assert "starting 2 engine workers at once" in log
    engine_inits = [m.start() for m in re.finditer(r"Initializing a V1 LLM engine", log)]
    assert len(engine_inits) == 2 and max(engine_inits) < log.index("vLLM engine ready in"), log[-3000:]


def test_admin_token_guards_system_prompt(guarded: Service) -> None:
    url = guarded.url + "/system_prompt"
    assert http_json("POST", url, {"system_prompt": "x"})[0] == 401
    assert http_json("POST", url, {"system_prompt": "x"}, Authorization="Bearer wrong")[0] == 401
    status, body = http_json("POST", url, {"system_prompt": "新的提示"}, Authorization="Bearer s3cret-token")
    assert status == 200 and body["system_prompt"] == "新的提示"
    status, info = http_json("GET", guarded.url + "/info")
    assert info["settings"]["ADMIN_TOKEN"] == "***"
    assert "s3cret-token" not in json.dumps(info)


def test_sigterm_during_batch_stops_the_whole_tree(guarded: Service, gate: Gate) -> None:
    """Last on its service: it stops it. (Ctrl-C: the last test of tests/test_sync_frontend.py.)"""
    stop_during_batch(guarded, gate, 400, workers=2)


def test_use_vllm_true_without_vllm_fails_clearly(tmp_path: Path, demo_model: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "vllm").mkdir(parents=True)
    (broken / "vllm" / "__init__.py").write_text("raise ImportError('No module named \"msgspec_fake_dep\"')\n")
    env = demo_env(demo_model, USE_VLLM="true")
    env["PYTHONPATH"] = f"{broken}:{env['PYTHONPATH']}"
    from tests.conftest import PYTHON, Server, free_port

    port = free_port()
    server = Server([PYTHON, "-m", "uvicorn", "service.asgi:create_app_from_env", "--factory", "--port", str(port)],
                    env, log=tmp_path / "server.log")
    try:
        code = server.proc.wait(120)
    finally:
        server.stop()
    log = server.log()
    assert code != 0
    assert "vLLM cannot be imported" in log and "msgspec_fake_dep" in log and "USE_VLLM=false" in log
    assert "Traceback" not in log


def test_use_vllm_auto_falls_back_to_transformers_and_says_so(tmp_path: Path, demo_model: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "vllm").mkdir(parents=True)
    (broken / "vllm" / "__init__.py").write_text("raise ImportError('simulated missing dependency')\n")
    env = demo_env(demo_model, USE_VLLM="auto")
    env["PYTHONPATH"] = f"{broken}:{env['PYTHONPATH']}"
    svc = start_service(tmp_path, env)
    try:
        svc.wait_ready(120)
        status, health = http_json("GET", svc.url + "/")
        assert health["status"] == "batch" and health["backend"] == "transformers"
        assert "simulated missing dependency" in health["notice"]
        status, info = http_json("GET", svc.url + "/info")
        assert info["backend"] == "transformers" and "transformers" in info["notice"]
        status, body = http_json("POST", svc.url + "/predict", {"prompt": [SHORT, HARD, "很长" * 2000]})
        assert status == 200, body
        assert len(body["response"]) == 3 and [e["index"] for e in body["errors"]] == [2]
        assert "serving with transformers" in svc.server.log()
    finally:
        svc.server.stop()
