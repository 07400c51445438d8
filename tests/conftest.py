"""Shared fixtures: the demo model, free ports, and real server processes whose whole tree is stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "pmpp_qa.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    """A real process (launcher or uvicorn) started in its own session; ``stop`` kills the whole tree."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path = ROOT, log: Path | None = None):
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(list(args), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_port(self, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"port {port} not open after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        tree = descendants(self.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.pid, *tree]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._out is not subprocess.DEVNULL:
            self._out.close()
        return self.proc.returncode


def python_env(**extra: str) -> dict[str, str]:
    """The test process's environment plus ``extra``, with the project importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo model, built once per test session."""
    from downloader.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("model") / "demo")


PYTHON = sys.executable


def demo_env(model_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a server on the demo preset (forced over the test's shell), plus ``extra``."""
    from env import layer

    values = {k: v.value for k, v in layer(os.environ, "demo", force=True).items()}
    env = python_env(**values)
    env.update(MODEL_DIR=str(model_dir), WARMUP_DATA_PATH="", LOG_LEVEL="info")
    env.update(extra)
    return env


def http_json(method: str, url: str, body: object = None, timeout: float = 300, **headers: str):
    """(status, parsed JSON or text) over real HTTP with the standard library."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Service:
    """A real uvicorn process serving the app, and the health states it went through."""

    def __init__(self, server: Server, port: int):
        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"
        self.seen: list[str] = []

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.server.proc.returncode}:\n{self.server.log()[-4000:]}")
            try:
                status, body = http_json("GET", self.url + "/", timeout=5)
            except OSError:
                time.sleep(0.2)
                continue
            state = body.get("status") if isinstance(body, dict) else str(body)
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)
            if state in ("batch", "ok"):
                return
            if state == "error":
                raise AssertionError(f"engine failed: {body}\n{self.server.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout}s:\n{self.server.log()[-4000:]}")


def start_service(tmp: Path, env: Mapping[str, str]) -> Service:
    port = free_port()
    args = [PYTHON, "-m", "service", "--host", "127.0.0.1",
            "--port", str(port), "--timeout-graceful-shutdown", env.get("SHUTDOWN_TIMEOUT", "30")]
    server = Server(args, env, log=tmp / f"server-{port}.log")
    service = Service(server, port)
    server.wait_port(port)
    return service


@pytest.fixture(scope="session")
def service(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real server on the demo model for the whole session (engine start-up dominates test time).

    It warms up on a few questions of the shared workload when that file is present.
    """
    extra = {}
    if SHARED_DATA.is_file():
        extra = {"WARMUP_DATA_PATH": str(SHARED_DATA), "WARMUP_NUM_SAMPLES": "32", "WARMUP_REPEAT": "1"}
    svc = start_service(tmp_path_factory.mktemp("service"), demo_env(demo_model, **extra))
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.server.stop()
