"""Acceptance tests of ``downloader``: a real HTTP server on loopback stands in for the ModelScope hub.

The fake hub answers the REST paths the downloader and modelscope's own client use: ``GET
/api/v1/models/{id}/repo/files`` and ``GET /api/v1/models/{id}/repo?FilePath=``, with Range support and
injectable faults (HTTP 500, a connection dropped mid-file, corrupt bytes).  That it is the real protocol is
shown in tests/test_hub_protocol.py: the ``modelscope`` package's own client fetches the same trees from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

import downloader
import downloader.hub
from downloader import MARKER, DownloadError, check_draft_tokenizer, download, snapshot_state
from tests.conftest import ROOT, free_port, python_env

TOKEN = "ms-secret-token-3f9a7c"  # a test token that must never reach the logs


# --- the fake hub -------------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHub:
    """Models as ``{(model_id, revision): {path: bytes}}``; ``faults`` as ``{file path: kind}``."""

    models: dict[tuple[str, str], dict[str, bytes]]
    faults: dict[str, str] = field(default_factory=dict)
    require_token: str | None = None
    redirect_files: bool = False  # answer file requests with a 302 to another host name (object storage)
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def file_requests(self, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/repo") and (path is None or s.query["FilePath"] == path)]

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _record(self) -> Seen:
                length = int(self.headers.get("Content-Length") or 0)
                parts = urlsplit(self.path)
                seen = Seen(self.command, parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()},
                            {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
                hub.seen.append(seen)
                return seen

            def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self, seen: Seen) -> bool:
                if hub.require_token is None:
                    return True
                return (seen.headers.get("authorization") == f"Bearer {hub.require_token}"
                        or f"m_session_id={hub.require_token}" in seen.headers.get("cookie", ""))

            def do_POST(self) -> None:  # noqa: N802 - neither client posts anything (no login round trip)
                self._record()
                self._json(404, {"Code": 404, "Message": "not found", "Success": False})

            def do_GET(self) -> None:  # noqa: N802
                seen = self._record()
                prefix = "/api/v1/models/"
                if seen.path.startswith("/oss/"):  # "object storage": no credentials needed
                    model_id, revision = seen.path[len("/oss/"):], seen.query["Revision"]
                    return self._file(seen.query["FilePath"], hub.models[(model_id, revision)])
                if not seen.path.startswith(prefix):
                    return self._json(404, {"Code": 404, "Message": "not found", "Success": False})
                rest = seen.path[len(prefix):]
                if rest.endswith("/repo/files"):
                    model_id, kind = rest[: -len("/repo/files")], "list"
                elif rest.endswith("/repo"):
                    model_id, kind = rest[: -len("/repo")], "file"
                else:
                    return self._json(404, {"Code": 404, "Message": "not found", "Success": False})
                if not self._authorized(seen):
                    return self._json(401, {"Code": 401, "Message": "login required", "Success": False})
                files = hub.models.get((model_id, seen.query.get("Revision", "master")))
                if files is None:
                    return self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
                if kind == "list":
                    entries = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(b),
                                "Sha256": hashlib.sha256(b).hexdigest(), "IsLFS": p.endswith(".safetensors")}
                               for p, b in sorted(files.items())]
                    entries.append({"Name": "sub", "Path": "sub", "Type": "tree", "Size": 0})
                    return self._json(200, {"Code": 200, "Data": {"Files": entries}, "Success": True})
                if hub.redirect_files:
                    port = self.server.server_address[1]
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{port}/oss/{model_id}?{urlsplit(self.path).query}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._file(seen.query.get("FilePath", ""), files)

            def _file(self, path: str, files: dict[str, bytes]) -> None:
                if path not in files:
                    return self._json(404, {"Code": 404, "Message": "file not found", "Success": False})
                data, fault = files[path], hub.faults.get(path)
                if fault == "500":
                    return self._json(500, {"Code": 500, "Message": "internal error", "Success": False})
                if fault == "corrupt":
                    data = bytes(len(data))
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if fault == "drop":  # die at the middle of the file, whatever range was asked for
                    self.wfile.write(data[start: max(start, len(data) // 2)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def read_tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def hash_tree(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in read_tree(path).items()}


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def tiny_files(demo_model: Path) -> dict[str, bytes]:
    """The files of a small real model (the demo model's bytes) as the hub serves them."""
    return read_tree(demo_model)


@pytest.fixture
def other_tokenizer_files(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    tok = json.loads(tiny_files["tokenizer.json"])
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz-not-in-main"] = vocab.pop(first)
    return {**tiny_files, "tokenizer.json": json.dumps(tok).encode()}


@pytest.fixture
def hub(tiny_files: dict[str, bytes], other_tokenizer_files: dict[str, bytes]) -> Iterator[FakeHub]:
    nested = {**tiny_files, "sub/extra.txt": b"nested file\n"}
    server = FakeHub({
        ("acme/tiny", "master"): tiny_files,
        ("acme/tiny", "v2"): {**tiny_files, "README.md": b"v2\n"},
        ("acme/nested", "master"): nested,
        ("acme/draft", "master"): tiny_files,
        ("acme/other-vocab", "master"): other_tokenizer_files,
    }).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter backoff for tests that fail on purpose (the bounds themselves are tested unpatched)."""
    monkeypatch.setattr(downloader.hub, "BACKOFF", 0.02)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="download")
    return caplog


def values_for(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    values = {
        "MODEL_ID": "acme/tiny", "MODEL_REVISION": "master", "MODEL_DIR": str(tmp_path / "model" / "acme" / "tiny"),
        "MODELSCOPE_API_TOKEN": "", "MODELSCOPE_ENDPOINT": endpoint, "ENABLE_SPECULATIVE_DECODING": "0",
        "SPEC_METHOD": "draft_model", "SPEC_DRAFT_MODEL_ID": "", "SPEC_DRAFT_MODEL_REVISION": "master",
        "SPEC_DRAFT_MODEL_DIR": str(tmp_path / "model" / "draft"), "SPEC_DRAFT_OPTIONAL": "1",
    }
    values.update(extra)
    return values


def download_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "download"]


# --- hub downloads ------------------------------------------------------------------------------

def test_fresh_download(tmp_path: Path, hub: FakeHub, tiny_files: dict[str, bytes],
                        logs: pytest.LogCaptureFixture) -> None:
    values = values_for(tmp_path, hub.url)
    target = Path(values["MODEL_DIR"])
    assert download(values, progress=False) == [target]
    got = read_tree(target)
    assert {k: v for k, v in got.items() if k != MARKER} == tiny_files
    marker = json.loads(got[MARKER])
    assert (marker["model_id"], marker["revision"]) == ("acme/tiny", "master")
    assert snapshot_state(target, "acme/tiny", "master") == "complete"
    assert sorted(s.query["FilePath"] for s in hub.file_requests()) == sorted(tiny_files)
    assert not list(target.parent.glob(".tiny.partial*")), "the staging directory is renamed into place"
    lines = download_lines(logs)
    assert lines and all(line.startswith("[download]") for line in lines)
    assert len([r for r in logs.records if r.levelno >= logging.INFO]) <= 3, "quiet when not on a terminal"


def test_nested_paths(tmp_path: Path, hub: FakeHub) -> None:
    target = tmp_path / "nested"
    values = values_for(tmp_path, hub.url, MODEL_ID="acme/nested", MODEL_DIR=str(target))
    assert download(values, progress=False) == [target]
    assert (target / "sub" / "extra.txt").read_bytes() == b"nested file\n"


def test_second_run_skips_without_hub_contact(tmp_path: Path, hub: FakeHub, logs: pytest.LogCaptureFixture) -> None:
    values = values_for(tmp_path, hub.url)
    download(values, progress=False)
    assert hub.file_requests(), "the first run downloads"
    del hub.seen[:]
    assert download(values, progress=False) == [Path(values["MODEL_DIR"])]
    assert hub.seen == [], "a complete snapshot needs no hub request"
    assert "skipped" in download_lines(logs)[-1]
    hub.stop()  # and it works with the hub gone, too (a request would fail: connection refused)
    assert download(values, progress=False) == [Path(values["MODEL_DIR"])]
    assert "skipped" in download_lines(logs)[-1]


def test_progress_lines_on_a_terminal(tmp_path: Path, hub: FakeHub, logs: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloader, "PROGRESS_INTERVAL", 0.0)
    download(values_for(tmp_path, hub.url), progress=True)
    progress = [line for line in download_lines(logs) if " files, " in line and " of " in line]
    assert progress and all(line.startswith("[download] acme/tiny@master: ") for line in progress)
    assert any("MB" in line and "model.safetensors" in line for line in progress)


def test_progress_lines_off_a_terminal(tmp_path: Path, hub: FakeHub, logs: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under docker build, CI or nohup (stderr is no terminal) the default still prints lines, every LOG_INTERVAL s."""
    assert 10 <= downloader.LOG_INTERVAL <= 30
    monkeypatch.setattr(downloader.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(downloader, "LOG_INTERVAL", 0.0)
    download(values_for(tmp_path, hub.url))
    progress = [line for line in download_lines(logs) if " files, " in line and " of " in line]
    assert progress and any("model.safetensors" in line for line in progress)


@pytest.mark.parametrize("fault", ["drop", "500", "corrupt"])
def test_interrupted_download_is_not_served_and_rerun_completes(
        tmp_path: Path, hub: FakeHub, tiny_files: dict[str, bytes], fault: str, fast_retries: None) -> None:
    values = values_for(tmp_path, hub.url)
    target = Path(values["MODEL_DIR"])
    hub.faults["model.safetensors"] = fault
    with pytest.raises(DownloadError) as err:
        download(values, progress=False)
    assert err.value.exit_code == 1
    assert "acme/tiny" in err.value.message and "master" in err.value.message
    assert not target.exists() and snapshot_state(target, "acme/tiny", "master") != "complete"
    assert len(hub.file_requests("model.safetensors")) > 1, "transient failures are retried"

    hub.faults.clear()
    del hub.seen[:]
    assert download(values, progress=False) == [target]
    assert {k: v for k, v in read_tree(target).items() if k != MARKER} == tiny_files
    assert snapshot_state(target, "acme/tiny", "master") == "complete"
    assert not hub.file_requests("config.json"), "files finished before the failure are not fetched again"
    if fault == "drop":
        rerun = hub.file_requests("model.safetensors")
        start = int(rerun[0].headers["range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < start <= len(tiny_files["model.safetensors"]) // 2, "the rerun resumes the partial file"


def test_partial_directory_is_replaced_never_served(tmp_path: Path, hub: FakeHub,
                                                    tiny_files: dict[str, bytes]) -> None:
    values = values_for(tmp_path, hub.url)
    target = Path(values["MODEL_DIR"])
    target.mkdir(parents=True)
    (target / "config.json").write_bytes(tiny_files["config.json"])  # no tokenizer, no weights, no marker
    assert snapshot_state(target, "acme/tiny", "master") == "incomplete"
    download(values, progress=False)
    assert snapshot_state(target, "acme/tiny", "master") == "complete"
    # A marker that lists a file that has gone missing is not complete either; the rest is kept.
    (target / "tokenizer.json").unlink()
    assert snapshot_state(target, "acme/tiny", "master") == "incomplete"
    del hub.seen[:]
    download(values, progress=False)
    assert (target / "tokenizer.json").read_bytes() == tiny_files["tokenizer.json"]
    assert [s.query["FilePath"] for s in hub.file_requests()] == ["tokenizer.json"]


def test_unrelated_directory_is_never_deleted(tmp_path: Path, hub: FakeHub) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DownloadError) as err:
        download(values_for(tmp_path, hub.url, MODEL_DIR=str(target)), progress=False)
    assert err.value.exit_code == 1 and "notes.txt" in err.value.message
    assert (target / "notes.txt").read_text() == "keep me"


def test_other_revision_is_fetched(tmp_path: Path, hub: FakeHub) -> None:
    values = values_for(tmp_path, hub.url)
    download(values, progress=False)
    target = Path(values["MODEL_DIR"])
    download({**values, "MODEL_REVISION": "v2"}, progress=False)
    assert (target / "README.md").read_bytes() == b"v2\n"
    assert snapshot_state(target, "acme/tiny", "v2") == "complete"


def test_local_model_without_marker_needs_no_hub(tmp_path: Path, demo_model: Path, hub: FakeHub) -> None:
    target = tmp_path / "local"
    shutil.copytree(demo_model, target)
    values = values_for(tmp_path, hub.url, MODEL_ID="someone/private-model", MODEL_DIR=str(target))
    assert download(values, progress=False) == [target]
    assert hub.seen == [], "a local model needs no hub request"
    assert not (target / MARKER).exists(), "a user's model directory is left as it is"


def test_relative_model_dir_resolves_against_the_project_root(tmp_path: Path, demo_model: Path, hub: FakeHub,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "relative"
    shutil.copytree(demo_model, target)
    monkeypatch.chdir("/")
    values = values_for(tmp_path, hub.url, MODEL_DIR=os.path.relpath(target, ROOT))
    assert download(values, progress=False) == [target.resolve()]
    assert hub.seen == [], "the local model was found: nothing fetched"


def test_unknown_model_names_id_and_hints(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(DownloadError) as err:
        download(values_for(tmp_path, hub.url, MODEL_ID="acme/nope"), progress=False)
    assert err.value.exit_code == 1
    assert "acme/nope" in err.value.message and "HTTP 404" in err.value.message
    assert len(hub.seen) == 1, "a 404 is not retried"


# --- token ----------------------------------------------------------------------------------------

def test_token_goes_with_every_request_and_never_appears_in_logs(tmp_path: Path, hub: FakeHub,
                                                                 logs: pytest.LogCaptureFixture) -> None:
    hub.require_token = TOKEN
    values = values_for(tmp_path, hub.url, MODELSCOPE_API_TOKEN=TOKEN)
    download(values, progress=True)
    assert hub.seen and all(seen.method == "GET" for seen in hub.seen), "no login round trip"
    for seen in hub.seen:
        assert seen.headers.get("authorization") == f"Bearer {TOKEN}"
        assert f"m_session_id={TOKEN}" in seen.headers.get("cookie", "")
    assert TOKEN not in logs.text


def test_token_is_not_sent_to_a_redirect_host(tmp_path: Path, hub: FakeHub) -> None:
    hub.require_token = TOKEN
    hub.redirect_files = True
    target = download(values_for(tmp_path, hub.url, MODELSCOPE_API_TOKEN=TOKEN), progress=False)[0]
    storage = [s for s in hub.seen if s.path.startswith("/oss/")]
    assert storage and snapshot_state(target, "acme/tiny", "master") == "complete"
    for seen in storage:
        assert seen.headers.get("host", "").startswith("localhost")
        assert "authorization" not in seen.headers and TOKEN not in seen.headers.get("cookie", "")


def test_anonymous_download_sends_no_credentials(tmp_path: Path, hub: FakeHub) -> None:
    download(values_for(tmp_path, hub.url), progress=False)
    assert all(s.method == "GET" and "authorization" not in s.headers for s in hub.seen)


def test_rejected_token_is_a_clear_error(tmp_path: Path, hub: FakeHub, logs: pytest.LogCaptureFixture) -> None:
    hub.require_token = "the-right-one"
    with pytest.raises(DownloadError) as err:
        download(values_for(tmp_path, hub.url, MODELSCOPE_API_TOKEN=TOKEN), progress=False)
    assert err.value.exit_code == 1
    assert "MODELSCOPE_API_TOKEN" in err.value.message and TOKEN not in err.value.message
    assert TOKEN not in logs.text


# --- draft model ----------------------------------------------------------------------------------

def draft_values(tmp_path: Path, hub: FakeHub, draft_id: str, optional: str) -> dict[str, str]:
    return values_for(tmp_path, hub.url, ENABLE_SPECULATIVE_DECODING="1", SPEC_DRAFT_MODEL_ID=draft_id,
                      SPEC_DRAFT_OPTIONAL=optional)


def test_draft_model_is_downloaded_beside_the_main_one(tmp_path: Path, hub: FakeHub) -> None:
    values = draft_values(tmp_path, hub, "acme/draft", "0")
    paths = download(values, progress=False)
    assert paths == [Path(values["MODEL_DIR"]), Path(values["SPEC_DRAFT_MODEL_DIR"])]
    assert snapshot_state(paths[1], "acme/draft", "master") == "complete"


def test_draft_ignored_without_speculative_decoding(tmp_path: Path, hub: FakeHub) -> None:
    values = {**draft_values(tmp_path, hub, "acme/draft", "0"), "ENABLE_SPECULATIVE_DECODING": "0"}
    assert download(values, progress=False) == [Path(values["MODEL_DIR"])]
    assert not Path(values["SPEC_DRAFT_MODEL_DIR"]).exists()


def test_optional_draft_failure_is_a_warning(tmp_path: Path, hub: FakeHub, logs: pytest.LogCaptureFixture) -> None:
    values = draft_values(tmp_path, hub, "acme/missing-draft", "1")
    assert download(values, progress=False) == [Path(values["MODEL_DIR"])]
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert any(w.startswith("[download]") and "acme/missing-draft" in w and "SPEC_DRAFT_OPTIONAL=1" in w
               for w in warnings)


def test_required_draft_failure_exits_2(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(DownloadError) as err:
        download(draft_values(tmp_path, hub, "acme/missing-draft", "0"), progress=False)
    assert err.value.exit_code == 2
    assert "acme/missing-draft" in err.value.message and "SPEC_DRAFT_OPTIONAL=1" in err.value.message


def test_draft_with_another_tokenizer_is_reported(tmp_path: Path, hub: FakeHub,
                                                  logs: pytest.LogCaptureFixture) -> None:
    values = draft_values(tmp_path, hub, "acme/other-vocab", "1")
    assert download(values, progress=False) == [Path(values["MODEL_DIR"])]
    assert any("tokenizer" in r.getMessage() for r in logs.records if r.levelno == logging.WARNING)
    with pytest.raises(DownloadError) as err:
        download({**values, "SPEC_DRAFT_OPTIONAL": "0"}, progress=False)
    assert err.value.exit_code == 2 and "2 missing or with other ids" in err.value.message


def test_check_draft_tokenizer(tmp_path: Path, demo_model: Path, other_tokenizer_files: dict[str, bytes]) -> None:
    assert check_draft_tokenizer(demo_model, demo_model) is None
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_bytes(other_tokenizer_files["tokenizer.json"])
    message = check_draft_tokenizer(demo_model, other)
    assert message and str(other) in message and "SPEC_METHOD=ngram" in message
    eagle = tmp_path / "eagle"  # a draft head without tokenizer files uses the target's
    eagle.mkdir()
    assert check_draft_tokenizer(demo_model, eagle) is None


# --- offline ----------------------------------------------------------------------------------------

def test_unreachable_hub_fails_fast_with_hints(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    endpoint = closed_port_url()
    values = values_for(tmp_path, endpoint, MODEL_REVISION="v1.2")
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(values, progress=False)
    assert time.monotonic() - started < 60
    message = err.value.message
    assert err.value.exit_code == 1
    for needle in ("acme/tiny", "v1.2", endpoint, "connection refused", "MODEL_DIR", "SKIP_MODEL_DOWNLOAD=1",
                   "MODEL_ID=demo"):
        assert needle in message, needle
    assert "\n" not in message and "Traceback" not in message
    assert not Path(values["MODEL_DIR"]).exists()


def test_demo_twice_is_byte_identical_and_skips(tmp_path: Path, demo_model: Path, hub: FakeHub,
                                                logs: pytest.LogCaptureFixture) -> None:
    first = tmp_path / "a"
    second = tmp_path / "b"
    values = values_for(tmp_path, hub.url, MODEL_ID="demo")
    assert download({**values, "MODEL_DIR": str(first)}, progress=False) == [first]
    assert download({**values, "MODEL_DIR": str(second)}, progress=False) == [second]
    assert hash_tree(first) == hash_tree(second)
    assert {k: v for k, v in hash_tree(first).items() if k != MARKER} == hash_tree(demo_model)
    built = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()}
    assert download({**values, "MODEL_DIR": str(first)}, progress=False) == [first]
    assert "skipped" in download_lines(logs)[-1]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()} == built, "not rebuilt"
    (first / "tokenizer.json").write_text("{}")  # damaged: rebuilt, same bytes again
    download({**values, "MODEL_DIR": str(first)}, progress=False)
    assert hash_tree(first) == hash_tree(second)
    assert hub.seen == [], "the demo model is built offline"


def test_demo_loads_in_transformers(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = download(values_for(tmp_path, closed_port_url(), MODEL_ID="demo",
                               MODEL_DIR=str(tmp_path / "demo")), progress=False)[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is a warp?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:]), str)


# --- the CLI ----------------------------------------------------------------------------------------

def run_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "downloader"], env=python_env(**env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)


def test_cli_builds_demo(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    proc = run_cli(tmp_path, MODEL_ID="demo", MODEL_DIR=str(target))
    assert proc.returncode == 0, proc.stderr
    assert snapshot_state(target, "demo", json.loads((target / MARKER).read_text())["revision"]) == "complete"
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("[download]") for line in lines), proc.stderr


def test_cli_unreachable_hub_exits_1_without_traceback(tmp_path: Path) -> None:
    endpoint = closed_port_url()
    started = time.monotonic()
    proc = run_cli(tmp_path, MODEL_ID="acme/tiny", MODEL_DIR=str(tmp_path / "m"), MODELSCOPE_ENDPOINT=endpoint,
                   MODELSCOPE_API_TOKEN="")
    assert time.monotonic() - started < 60
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    paragraph = [line for line in proc.stderr.splitlines() if "Cannot download" in line]
    assert len(paragraph) == 1 and paragraph[0].startswith("[download] ")
    assert "acme/tiny" in paragraph[0] and endpoint in paragraph[0] and "MODEL_ID=demo" in paragraph[0]


def test_cli_skip(tmp_path: Path, hub: FakeHub) -> None:
    proc = run_cli(tmp_path, SKIP_MODEL_DOWNLOAD="1", MODELSCOPE_ENDPOINT=hub.url)
    assert proc.returncode == 0 and "skipped" in proc.stderr
    assert hub.seen == [], "SKIP_MODEL_DOWNLOAD=1 contacts no hub"


def test_inv_download_demo_twice_is_byte_identical(tmp_path: Path, hub: FakeHub) -> None:
    """`MODEL_ID=demo inv download`, twice, into two directories: the same bytes, built offline."""
    from tests.test_env import clean_env, inv

    trees = []
    for name in ("a", "b"):
        target = tmp_path / name
        env = clean_env(MODEL_ID="demo", MODEL_DIR=str(target), MODELSCOPE_ENDPOINT=hub.url)
        result = inv("download", env=env)
        assert result.returncode == 0, result.stderr
        trees.append(hash_tree(target))
    assert trees[0] == trees[1] and "model.safetensors" in trees[0]
    assert hub.seen == [], "the demo model is built offline"  # (NO_PROXY covers the hub: autouse fixture)



def test_a_bare_interpreter_gets_one_clear_line_not_a_traceback(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The launcher's download step in a Python without the project's packages (``inv run --skip-install`` into a
    bare interpreter): exit 3 and one ``[download]`` line naming the missing package and the interpreter."""
    from env.steps.download import download_with
    from env.steps.errors import LaunchError
    from env.steps.interpreter import probe

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = probe(bare / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with pytest.raises(LaunchError) as raised:
        download_with(python, env)
    assert raised.value.code == 3 and "lacks the project's packages" in str(raised.value)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert "[download]" in err and "is not installed in" in err and python.executable in err
