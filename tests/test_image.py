"""The built CPU image, for real: a container with the demo model turns healthy, answers ``POST /predict``
with a list, stops with exit code 0 within the shutdown timeout on ``docker stop``, and leaves no process.

Runs when ``QA_CI_IMAGE`` names a built image (``.ci/image`` builds it; ``.ci/run`` sets it), and skips
otherwise: building takes minutes and needs Docker.  The image is the real one (real daemon, engine, HTTP).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from env.locks import freeze_differences, lock_path, normalize, read_lock
from tests.conftest import free_port

IMAGE = os.environ.get("QA_CI_IMAGE", "")
DOCKER = os.environ.get("DOCKER") or shutil.which("docker") or "docker"
HEALTHY_WITHIN = 600.0
# SHUTDOWN_TIMEOUT of env/defaults.env (uvicorn's graceful drain) plus the engine's stop.
STOP_GRACE = 60

pytestmark = pytest.mark.skipif(not IMAGE, reason="QA_CI_IMAGE names no built image (.ci/run builds one)")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=check)


def state(name: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)


def processes_in(container_id: str) -> list[str]:
    """Host processes whose cgroup belongs to the container (found from /proc, not from docker)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if container_id in (proc / "cgroup").read_text():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {command[:120]}")
        except OSError:
            continue
    return found


def service_status(port: int) -> str:
    """``status`` of ``GET /`` (``warming``, ``batch``, ``error``), or ``""`` while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return json.loads(response.read()).get("status", "")
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read()).get("status", "")
        except ValueError:
            return ""
    except (OSError, ValueError):
        return ""


@pytest.fixture(scope="module")
def container() -> Iterator[tuple[str, int]]:
    name = f"qa-test-{os.getpid()}"
    port = free_port()
    docker("run", "-d", "--name", name, "--shm-size", "1g", "--health-interval", "2s", "-p", f"127.0.0.1:{port}:8000",
           IMAGE)
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN
        errors = 0  # consecutive `GET /` answers saying the engine failed (health stays "starting" meanwhile)
        while True:
            current = state(name)
            health = current.get("Health", {}).get("Status")
            if health == "healthy":
                break
            errors = errors + 1 if service_status(port) == "error" else 0
            if not current["Running"] or health == "unhealthy" or errors >= 10 or time.monotonic() > deadline:
                logs = docker("logs", "--tail", "60", name, check=False)
                pytest.fail(f"container not healthy ({health}, running={current['Running']}):\n"
                            f"{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
            time.sleep(1)
        yield name, port
    finally:
        docker("rm", "-f", name, check=False)


def test_container_turns_healthy_and_answers_a_list(container: tuple[str, int]):
    name, port = container
    assert state(name)["Health"]["Status"] == "healthy"
    body = json.dumps({"prompt": ["What is a GPU?", "写一个CUDA kernel", "hello"]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    assert isinstance(answer["response"], list) and len(answer["response"]) == 3
    assert all(isinstance(item, str) for item in answer["response"]) and "errors" not in answer


def test_the_image_holds_exactly_the_cpu_lock():
    done = docker("run", "--rm", IMAGE, "python3", "-m", "pip", "freeze", "--all", timeout=300)
    frozen = {normalize(line.split("==")[0]): line.split("==", 1)[1] for line in done.stdout.split() if "==" in line}
    problems = freeze_differences(read_lock(lock_path("cpu")), frozen)
    assert not problems, "\n".join(problems)


def test_the_service_runs_as_a_non_root_user():
    assert docker("run", "--rm", IMAGE, "id", "-u").stdout.strip() != "0"


def test_docker_stop_exits_0_within_the_timeout_and_leaves_no_process(container: tuple[str, int]):
    name, _ = container
    container_id = docker("inspect", "--format", "{{.Id}}", name).stdout.strip()
    assert processes_in(container_id), "the check finds no process of a running container: it cannot work"
    start = time.monotonic()
    docker("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
    took = time.monotonic() - start
    final = state(name)
    assert not final["Running"] and final["ExitCode"] == 0, final
    assert took < STOP_GRACE, f"docker stop took {took:.1f} s: the service did not stop before SIGKILL"
    assert not final["OOMKilled"]
    assert processes_in(container_id) == []
