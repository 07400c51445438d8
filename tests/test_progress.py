"""Progress of long requests: log lines while a batch runs, ``GET /progress`` and the counters in ``/metrics``.

On the session's two-worker server (vLLM CPU engine, demo model) with the hold gate: a batch whose one marked
question holds its worker's share stands part-done (the other share answered) until the test releases it, so
"seen part-done" is a state the test waits for, not a moment it has to catch.  The settings' provenance
(env/provenance.py) is checked without a server.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from env.provenance import encode, sources
from service.settings import Settings
from tests.conftest import Gate, Service, http_json, wait_for
from tests.test_service import metric, questions


def progress(svc: Service) -> dict:
    status, body = http_json("GET", svc.url + "/progress", timeout=10)
    assert status == 200, body
    return body


class HeldBatch:
    """``n`` questions on a thread, the first marked for the gate: one worker's share is held until released."""

    def __init__(self, svc: Service, gate: Gate, n: int):
        qs = questions(n)
        qs[0] = gate.MARK + qs[0]
        self.reply: tuple[int, Any] | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "reply", http_json(
            "POST", svc.url + "/predict", {"prompt": qs})), daemon=True)
        self.thread.start()
        gate.wait_held(1, unanswered=lambda: self.reply is None)

    def answered(self, gate: Gate) -> dict[str, Any]:
        gate.release()
        self.thread.join(300)
        assert self.reply is not None and self.reply[0] == 200, self.reply
        return self.reply[1]


def test_2000_question_batch_reports_progress_while_it_runs(two_workers: Service, gate: Gate) -> None:
    """The log shows a progress line before the end; /progress and /metrics count the questions up to 2,000."""
    svc = two_workers
    svc.wait_ready(300)
    idle = progress(svc)
    assert idle["in_flight"] == [], idle
    counted_before = metric(svc, "qa_progress_questions_done_total")
    log_before = len(svc.server.log())
    batch = HeldBatch(svc, gate, 2000)

    def part_done() -> dict[str, Any] | None:
        mine = [r for r in progress(svc)["in_flight"] if r["questions"] == 2000]
        return mine[0] if mine and 0 < mine[0]["done"] < 2000 else None

    running = wait_for(part_done, 240, "/progress showing the batch part-done", every=0.2)
    assert running["kind"] == "request" and running["state"] == "running", running
    counted = metric(svc, "qa_progress_questions_done_total") - counted_before
    assert 0 < counted < 2000, f"/metrics counts {counted} of the held batch's questions"
    # A line every 5 s while the share is held; the first (at 3 s) may come before any question has finished.
    line = wait_for(lambda: re.search(r"request \d+: ([1-9]\d*)/2000 questions \(\d+%\), [0-9.]+ questions/s, \d+ "
                                      r"tokens/s, ETA ", svc.server.log()[log_before:]), 30, "a part-done progress line")
    assert 0 < int(line.group(1)) < 2000, line.group(0)
    assert batch.reply is None, "answered while one share was held"
    assert len(batch.answered(gate)["response"]) == 2000
    assert metric(svc, "qa_progress_questions_done_total") - counted_before == 2000
    after = progress(svc)
    assert after["in_flight"] == []
    last = after["recent"][0]
    assert (last["questions"], last["done"], last["state"], last["eta_s"]) == (2000, 2000, "done", 0.0), last
    assert last["tokens"] > 0 and last["tokens_per_s"] > 0
    summary = re.search(rf"request {last['id']} finished: 2000 questions \(0 item errors\) in [0-9.]+ s",
                        svc.server.log()[log_before:])
    assert summary, svc.server.log()[-3000:]


def test_in_flight_gauges_per_request(two_workers: Service, gate: Gate) -> None:
    """While a batch runs, /metrics has its questions, questions done, tokens/s and ETA, labelled by request."""
    svc = two_workers
    svc.wait_ready(300)
    batch = HeldBatch(svc, gate, 600)
    text = http_json("GET", svc.url + "/metrics")[1]
    match = re.search(r'^qa_request_questions\{kind="request",request="(\d+)"\} 600\.0$', text, re.MULTILINE)
    assert match, "the held batch's gauges are not in /metrics"
    assert f'qa_request_questions_done{{kind="request",request="{match.group(1)}",worker="all"}}' in text
    assert "qa_request_tokens_per_second{" in text and 'worker="engine worker 1 of 2"' in text, text[-2000:]
    batch.answered(gate)
    text = http_json("GET", svc.url + "/metrics")[1]
    assert "qa_progress_calls_in_flight 0.0" in text and "qa_request_questions{" not in text


def test_settings_know_where_each_value_came_from(tmp_path: Path) -> None:
    """shell, default, preset (named by the launcher in QA_SETTINGS_SOURCES) and auto, for the console."""
    from env import layer

    model = tmp_path / "model"
    layered = layer({"MODEL_DIR": str(model), "MAX_MODEL_LEN": "512"}, "demo")  # as `inv run --preset demo`
    launched = {key: item.value for key, item in layered.items()}  # the server's environment: all look "shell"
    where = dict(Settings.from_environ({**launched, "QA_SETTINGS_SOURCES": encode(layered)}).sources)
    assert (where["MODEL_DIR"], where["MAX_MODEL_LEN"]) == ("shell", "shell")
    assert where["TOP_P"] == "default (defaults.env)"
    assert where["DTYPE"] == "preset (demo.env)"
    assert where["ENGINE_WORKERS"] == "auto"
    alone = dict(Settings.from_environ({"MODEL_DIR": str(model), "MAX_MODEL_LEN": "512"}).sources)
    assert (alone["MODEL_DIR"], alone["MAX_MODEL_LEN"], alone["TOP_P"], alone["ENGINE_WORKERS"]) == (
        "shell", "shell", "default (defaults.env)", "auto")
    assert sources({}, {}) == ()
