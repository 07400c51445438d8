"""Nothing outlives anything: process groups, the child subreaper, and real servers killed with real signals.

The trees are real (``sleep`` processes in a session of their own, a Python that ignores SIGTERM, an orphan
re-parented to init), and so are the servers (demo preset, the vLLM CPU engine, real uvicorn processes).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil

from service.procs import group_alive, kill_group
from tests.conftest import (
    PYTHON,
    Server,
    alive,
    python_env,
)

# A tree in a session of its own: a child that ignores SIGTERM, a plain child, and an orphan whose parent
# (sh) has exited, so that it hangs from init and only its process group still ties it to the tree.
TREE = r"""
import subprocess, sys, time
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
    stdout=subprocess.PIPE, text=True)
assert stubborn.stdout.readline().strip() == "ready"
plain = subprocess.Popen(["sleep", "300"])
orphan = int(subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True).stdout)
print(stubborn.pid, plain.pid, orphan, flush=True)
time.sleep(300)
"""

# A process that is a child subreaper adopts the orphan of its child (here in a session of its own):
# reap_children stops it, reap_orphans collects its exit status, and a plain child's status is left to Popen.
SUBREAPER = r"""
import json, logging, os, subprocess, psutil
from service.procs import assert_tree_gone, become_subreaper, reap_children, reap_orphans
logging.basicConfig(level=logging.INFO)
become_subreaper()
plain = subprocess.Popen(["sleep", "120"])
orphan = int(subprocess.run(["setsid", "sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True).stdout)
adopted = psutil.Process(orphan).ppid() == os.getpid()
stopped = reap_children(timeout=5)
reaped = reap_orphans()
print(json.dumps({"plain": plain.pid, "orphan": orphan, "adopted": adopted, "stopped": stopped, "reaped": reaped,
                  "plain_status": plain.wait(5), "left": assert_tree_gone(5)}))
"""


def _wait_line(server: Server, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (text := server.log()).endswith("\n"):
        assert time.monotonic() < deadline and server.proc.poll() is None, text
        time.sleep(0.05)
    return text.strip()


def test_kill_group_stops_a_whole_tree_and_names_what_needed_sigkill(tmp_path: Path) -> None:
    tree = Server([PYTHON, "-c", TREE], python_env(), log=tmp_path / "tree.out")
    try:
        stubborn, plain, orphan = map(int, _wait_line(tree).split())
        pgid = tree.pid
        assert psutil.Process(orphan).ppid() != pgid  # the orphan is tied to the tree only by its group
        assert sorted(group_alive(pgid)) == sorted([pgid, stubborn, plain, orphan])
        started = time.monotonic()
        killed = kill_group(pgid, timeout=2)
        assert killed == [stubborn], killed  # the others went on SIGTERM
        assert time.monotonic() - started < 2 + 5
        assert group_alive(pgid) == []
        assert tree.proc.wait(5) == -signal.SIGTERM  # the group's leader is left for its parent to reap
        assert not [pid for pid in (stubborn, plain, orphan) if alive(pid)]
    finally:
        tree.stop(signal.SIGKILL, timeout=1)


def test_a_subreaper_adopts_orphans_and_reap_children_stops_them() -> None:
    done = subprocess.run([PYTHON, "-c", SUBREAPER], env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["adopted"], "the orphan went to init, not to the subreaper"
    assert sorted(result["stopped"]) == sorted([result["plain"], result["orphan"]]), result
    assert result["reaped"] == [result["orphan"]] and result["plain_status"] == -signal.SIGTERM, result
    assert result["left"] == []
    assert not alive(result["orphan"])
    assert "shutdown check: no process of the service's tree is left" in done.stderr
