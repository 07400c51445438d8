"""Process housekeeping: stop every process the service started (engine core, workers); freeze the heap."""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("service")


def freeze_heap(what: str) -> None:
    """Collect once, then move every object alive now out of the garbage collector's reach (``gc.freeze``).

    What vLLM's API server and engine core do once they are up (``vllm.utils.gc_utils.freeze_gc_heap``).
    A process that has imported torch and vLLM holds several hundred thousand tracked objects; without
    this, the first full collection comes with the first large request and stalls it (0.4-0.5 s in each
    engine worker, measured on the CPU and the H200), and later ones stall whichever engine they hit.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("%s: %d objects frozen out of the garbage collector in %.2f s", what, gc.get_freeze_count(),
             time.perf_counter() - started)


def reap_children(timeout: float = 10.0) -> None:
    """Stop every process this one started (engine core, workers) that outlived the engine's shutdown.

    multiprocessing's resource tracker is left alone: it ignores SIGTERM and exits with this process.
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while pids := _descendants(me):
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        time.sleep(0.2)
        if sig is signal.SIGKILL:
            log.warning("engine child processes %s needed SIGKILL", pids)
            _wait_zombies(pids)
            break


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" or b"resource_tracker" in _cmdline(entry):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def _wait_zombies(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
