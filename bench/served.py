"""The service under test, for ``inv bench`` and ``inv tune``: started on a free port, waited for, stopped."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.client import Unreachable, generated_tokens, request

# --- HTTP client -------------------------------------------------------------------------------

def service_tokens(url: str) -> float:
    """Generated tokens so far, from the service's /metrics."""
    return generated_tokens(request("GET", url + "/metrics", timeout=30)[1])


def wait_ready(url: str, timeout: float, proc: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"[bench] the service exited with {proc.returncode} before it was ready")
        try:
            status, body = request("GET", url + "/", timeout=5)
        except Unreachable:
            time.sleep(0.3)
            continue
        if isinstance(body, dict) and body.get("status") in ("batch", "ok"):
            return body
        if isinstance(body, dict) and body.get("status") == "error":
            raise SystemExit(f"[bench] the service failed to start: {body}")
        time.sleep(0.3)
    raise SystemExit(f"[bench] the service was not ready after {timeout:.0f} s")


# --- the service under test ----------------------------------------------------------------------

@contextmanager
def started_service(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, int, float]]:
    """``python -m service`` on a free port; yields (url, pid, seconds from spawn to ready); stops it."""
    import signal
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        spawned = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-access-log"], env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 900, proc)
            yield url, proc.pid, time.perf_counter() - spawned
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident memory of one process (not its children) in MB; VmHWM is the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


__all__ = ["rss_mb", "service_tokens", "started_service", "wait_ready"]
