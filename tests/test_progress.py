"""Progress of long requests: log lines while a batch runs, ``GET /progress`` and the counters in ``/metrics``.

On the session's real server (vLLM CPU engine, demo model).  The settings' provenance (env/provenance.py) is
checked without a server.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from env.provenance import encode, sources
from service.settings import Settings
from tests.conftest import Service, http_json
from tests.test_service import Batch, metric


def progress(svc: Service) -> dict:
    status, body = http_json("GET", svc.url + "/progress", timeout=10)
    assert status == 200, body
    return body


def test_2000_question_batch_reports_progress_while_it_runs(service: Service) -> None:
    """The log shows a progress line before the end; /progress and /metrics count the questions up to 2,000."""
    idle = progress(service)
    assert idle["in_flight"] == [], idle
    counted_before = metric(service, "qa_progress_questions_done_total")
    log_before = len(service.server.log())
    batch = Batch(service, 2000)
    seen: list[int] = []  # /progress's done of this request, in order
    counted: list[float] = []  # /metrics's running total
    line_while_running = None
    deadline = time.monotonic() + 300
    while batch.answered_at is None:
        assert time.monotonic() < deadline, "the 2,000 questions were not answered within 300 s"
        mine = [r for r in progress(service)["in_flight"] if r["questions"] == 2000]
        if mine and batch.answered_at is None:
            seen.append(mine[0]["done"])
            assert mine[0]["kind"] == "request" and mine[0]["state"] == "running", mine
        counted.append(metric(service, "qa_progress_questions_done_total") - counted_before)
        if line_while_running is None:
            found = re.search(r"request \d+: (\d+)/2000 questions \(\d+%\), [0-9.]+ questions/s, \d+ tokens/s, ETA ",
                              service.server.log()[log_before:])
            if found and batch.answered_at is None:
                line_while_running = found.group(0)
        time.sleep(0.25)
    batch.thread.join(30)
    assert batch.reply is not None and batch.reply[0] == 200, batch.reply
    assert line_while_running is not None, f"no progress line in the log before the end:\n{service.server.log()[-3000:]}"
    partial = [d for d in seen if 0 < d < 2000]
    assert partial, f"/progress never showed the batch part-done: {seen}"
    assert seen == sorted(seen), f"done went backwards: {seen}"
    assert any(0 < c < 2000 for c in counted), f"/metrics never counted part of the batch: {counted}"
    assert metric(service, "qa_progress_questions_done_total") - counted_before == 2000
    after = progress(service)
    assert after["in_flight"] == []
    last = after["recent"][0]
    assert (last["questions"], last["done"], last["state"], last["eta_s"]) == (2000, 2000, "done", 0.0), last
    assert last["tokens"] > 0 and last["tokens_per_s"] > 0
    summary = re.search(rf"request {last['id']} finished: 2000 questions \(0 item errors\) in [0-9.]+ s",
                        service.server.log()[log_before:])
    assert summary, service.server.log()[-3000:]


def test_in_flight_gauges_per_request(service: Service) -> None:
    """While a batch runs, /metrics has its questions, questions done, tokens/s and ETA, labelled by request."""
    batch = Batch(service, 600)
    found = None
    deadline = time.monotonic() + 120
    while batch.answered_at is None and found is None and time.monotonic() < deadline:
        text = http_json("GET", service.url + "/metrics")[1]
        match = re.search(r'^qa_request_questions\{kind="request",request="(\d+)"\} 600\.0$', text, re.MULTILINE)
        if match and 'qa_request_questions_done{kind="request",request="' + match.group(1) + '",worker="all"}' in text:
            found = text
        time.sleep(0.1)
    batch.thread.join(120)
    assert found is not None, "the batch's gauges never showed in /metrics"
    assert "qa_request_tokens_per_second{" in found and 'worker="engine worker"' in found
    assert batch.reply is not None and batch.reply[0] == 200
    text = http_json("GET", service.url + "/metrics")[1]
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
