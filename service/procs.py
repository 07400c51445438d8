"""Process housekeeping: nothing the service starts outlives it; freezing the heap.

How the tree is kept together (issue 13, "nothing outlives anything"):

- The API process and every engine worker are child subreapers (``become_subreaper``): an orphan of any of
  their descendants (vLLM's ``VLLM::Worker`` after its ``EngineCore`` died, say) is re-parented to them,
  not to init, so ``psutil.Process().children(recursive=True)`` still finds it (``reap_orphans`` collects
  the exit status of those that died).
- Each worker leads a session of its own (``start_new_session`` and ``os.setsid``): its process group id is
  its pid, and vLLM's ``EngineCore`` and ``Worker`` processes inherit that group (vLLM 0.32 changes process
  groups only in its data-parallel API-server launcher, which the service does not use).  ``kill_group``
  takes a worker's whole group down after it crashed or would not stop.
- ``reap_children`` stops whatever outlived the engine's shutdown; ``assert_tree_gone`` is the check the
  service's shutdown makes before it says that the engine stopped.
- A worker whose API process died gets SIGTERM (``PR_SET_PDEATHSIG``), stops its engine and reaps.

Everything goes through ``psutil``; zombies count as gone (they hold no memory, only an exit status).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import psutil

log = logging.getLogger("service")

PR_SET_CHILD_SUBREAPER = 36
POLL = 0.1
KILL_WAIT = 10.0  # how long a SIGKILLed process may take to go (a process in uninterruptible sleep)
RESOURCE_TRACKER = "multiprocessing.resource_tracker"


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


def become_subreaper() -> None:
    """Linux: orphans of this process's descendants are re-parented to it, not to init (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper (%s): orphans of the engine go to init", exc)


# --- process groups -----------------------------------------------------------------------------


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``, this process excepted."""
    me, found = os.getpid(), []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to see
    return found


def group_alive(pgid: int) -> list[int]:
    """Pids of the processes still alive in process group ``pgid`` (zombies are gone)."""
    return [proc.pid for proc in group_members(pgid)]


def kill_group(pgid: int, timeout: float = 10.0) -> list[int]:
    """Stop every process of group ``pgid``: SIGTERM, up to ``timeout`` s, then SIGKILL; the pids that needed it.

    Returns once the group is gone (or after a further ``KILL_WAIT`` s, logging what is left).  Orphans this
    process adopted as their subreaper are reaped here (``reap_orphans``); the group's leader is not (its
    exit status belongs to whoever started it: ``Popen.wait``).  ``timeout=0``: SIGKILL at once.
    """
    _, killed = _stop(lambda: group_members(pgid), timeout, f"process group {pgid}")
    reap_orphans()
    return killed


# --- this process's descendants -----------------------------------------------------------------


def descendants(skip_resource_tracker: bool = False) -> list[psutil.Process]:
    """The live (not zombie) descendants of this process, multiprocessing's resource tracker left out on request.

    The resource tracker ignores SIGTERM and exits by itself once every process holding its pipe is gone.
    """
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in children:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if skip_resource_tracker and RESOURCE_TRACKER in " ".join(proc.cmdline()):
                continue
            found.append(proc)
    return found


def reap_children(timeout: float = 5.0) -> list[int]:
    """Stop every process this one started (engine core, workers) that outlived the engine's shutdown.

    Its descendants, and, in a process that leads a session of its own (the worker), every process of its
    group: vLLM's processes stay in it even when an orphan went to init.  SIGTERM, up to ``timeout`` s (the
    engine's own shutdown has already waited for them), then SIGKILL; returns the pids that had to be stopped
    (logged, with the ones that needed SIGKILL).  multiprocessing's resource tracker is left alone: it
    ignores SIGTERM and exits once every process holding its pipe is gone.
    """
    stopped, _ = _stop(_leftovers, timeout, "engine child processes")
    return stopped


def _leftovers() -> list[psutil.Process]:
    found = {proc.pid: proc for proc in descendants(skip_resource_tracker=True)}
    if os.getsid(0) == os.getpid():  # a session leader: its group is its own, and everything in it ours
        for proc in group_members(os.getpid()):
            with contextlib.suppress(psutil.Error):
                if RESOURCE_TRACKER not in " ".join(proc.cmdline()):
                    found.setdefault(proc.pid, proc)
    return list(found.values())


def assert_tree_gone(timeout: float = 10.0, groups: Iterable[int] = ()) -> list[int]:
    """Wait up to ``timeout`` s for this process's whole tree (and process ``groups``) to be gone; the survivors.

    The shutdown's last check, before it says that the engine stopped: an empty list is logged at info
    level, survivors (pid and command line) at error level.
    """
    groups = list(groups)
    deadline = time.monotonic() + timeout
    while True:
        left = {proc.pid: proc for proc in descendants()}
        for pgid in groups:
            left.update((proc.pid, proc) for proc in group_members(pgid))
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    if left:
        log.error("processes of the service's tree are still alive after its shutdown: %s", describe(left.values()))
    else:
        log.info("shutdown check: no process of the service's tree is left")
    return sorted(left)


# --- helpers ------------------------------------------------------------------------------------


def describe(procs: Iterable[psutil.Process]) -> str:
    """``pid (command line)`` for each process, for logs and test failures."""
    return ", ".join(f"{proc.pid} ({_cmdline(proc)})" for proc in procs) or "none"


def _cmdline(proc: psutil.Process) -> str:
    try:
        return (" ".join(proc.cmdline()).strip() or proc.name())[:160]
    except psutil.Error:
        return "gone"


def _stop(find: Callable[[], list[psutil.Process]], timeout: float, what: str) -> tuple[list[int], list[int]]:
    """SIGTERM what ``find`` returns (and whatever it returns later), SIGKILL what is left after ``timeout`` s.

    Returns (every pid signalled, the pids that needed SIGKILL); waits until ``find`` returns nothing,
    at most ``KILL_WAIT`` s after the SIGKILL.
    """
    procs = find()
    if not procs:
        return [], []
    log.warning("%s still running, stopping them: %s", what, describe(procs))
    names: dict[int, str] = {}
    termed: set[int] = set()
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while procs:
        now = time.monotonic()
        if now >= deadline + KILL_WAIT:
            log.error("%s survive SIGKILL: %s", what, describe(procs))
            break
        for proc in procs:
            sent, sig = (termed, signal.SIGTERM) if now < deadline else (killed, signal.SIGKILL)
            if proc.pid not in sent:
                names.setdefault(proc.pid, _cmdline(proc))
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
                    sent.add(proc.pid)
        time.sleep(POLL)
        procs = find()
    if killed:
        log.warning("%s needed SIGKILL: %s", what, ", ".join(f"{pid} ({names[pid]})" for pid in sorted(killed)))
    return sorted(termed | killed), sorted(killed)


def reap_orphans() -> list[int]:
    """Collect the exit status of the orphans this process adopted as a child subreaper; their pids.

    An adopted orphan is a zombie child in another process group than this process's, which it does not
    lead: the children this process starts itself either stay in its group (``Popen``, multiprocessing)
    or lead a group of their own (``start_new_session``: the workers), and their exit status is left for
    ``Popen.wait``.  Nobody else will wait for an orphan that came from a dead worker's tree.
    """
    reaped, mine = [], os.getpgrp()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, OSError):
                if child.status() == psutil.STATUS_ZOMBIE and os.getpgid(child.pid) not in (child.pid, mine):
                    if os.waitpid(child.pid, os.WNOHANG)[0] == child.pid:
                        reaped.append(child.pid)
    return reaped


# --- ending one engine worker (its process group) ----------------------------------------------


def exit_code(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """The worker's exit code, waiting up to ``timeout`` s for it (None: still running)."""
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def describe_exit(code: int | None) -> str:
    """An exit code in words: ``killed by SIGKILL``, ``its engine died (exit code 4)``, ``exit code 1``."""
    if code is None:
        return "its connection closed while it still runs"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "its engine died (exit code 4)" if code == 4 else f"exit code {code}"


def kill_tree(proc: subprocess.Popen[bytes], label: str, hard: bool = True) -> None:
    """End the worker's whole process group (the worker, vLLM's EngineCore and Workers); reap the worker.

    ``hard``: SIGKILL at once (a crashed or stuck worker); else what is left of the group after the worker
    exited gets SIGTERM, then SIGKILL.  Returns once no process of the group is alive.
    """
    pgid = proc.pid  # the worker leads a session of its own (start_new_session)
    if hard:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    kill_group(pgid, timeout=0 if hard else 10)
    _reap_group(pgid)
    if left := group_alive(pgid):
        log.error("%s: processes %s of its group are still alive", label, left)


def _reap_group(pgid: int, timeout: float = 2.0) -> None:
    """Collect the exit status of this process's children in group ``pgid`` (orphans it adopted as subreaper).

    An orphan is re-parented to this process only once its own parent has exited, so some may come late.
    """
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        children = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getpgid(child.pid) == pgid:
                        children.append(child)
        for child in children:
            with contextlib.suppress(psutil.Error, OSError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
        if not children or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the worker to stop its engine and exit; SIGTERM, then SIGKILL, if it does not."""
    started = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("engine worker did not stop within %.0f s; terminating it", timeout)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log.info("engine worker exited with %s after %.1f s", proc.returncode, time.monotonic() - started)
