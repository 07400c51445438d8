"""``python3 -m bench.stall``: every engine worker failing at once (issue 22), measured on a running service.

Starts the service (``python -m service`` with this shell's environment, an optional ``--preset`` layered
under it and ``--set KEY=VALUE`` over it, as ``bench.bench`` does), waits until it is ready, answers a warm
request, then runs each scenario with a request of ``--n`` questions in flight:

- ``stall``: SIGSTOP every ``VLLM::EngineCore`` process under the service, so that every worker's engine makes
  no progress; the service should see ``ENGINE_STALL_TIMEOUT`` pass, kill the workers and restart them.
- ``kill``: SIGKILL every engine worker (``python -m service.worker``) at once.

For each: the in-flight request's HTTP status and how long after the signal it came, how long until the
service is whole again (``GET /`` 200 without ``degraded``, every worker ``up``, the incident closed), the
item errors of ``--n-after`` questions asked then, ``/info``'s ``incidents`` and ``restarts``, and whether the
service process is still running.  One JSON report goes to stdout and ``--output`` (rewritten after each
scenario, so that a run cut short keeps what it measured).  The service is stopped with SIGTERM at the end,
and whatever of its tree is left is killed (and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.bench import DEFAULT_DATA, _exit_on_sigterm, load_questions, service_env
from bench.client import Unreachable, request
from bench.served import started_service

log = logging.getLogger("bench")

SCENARIOS = ("stall", "kill")
ENGINE_CORE = "EngineCore"
WORKER_MODULE = "service.worker"
POLL = 0.25
_IN_FLIGHT = re.compile(r"^qa_in_flight_questions(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


# --- the service's processes ------------------------------------------------------------------------

def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def tree(pid: int) -> list[psutil.Process]:
    """The service process and its live descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def engine_cores(pid: int) -> list[psutil.Process]:
    """vLLM's ``VLLM::EngineCore`` processes among the service's descendants."""
    return [p for p in tree(pid)[1:] if ENGINE_CORE in _name(p) or ENGINE_CORE in _cmdline(p)]


def workers(pid: int) -> list[psutil.Process]:
    """The engine workers: the service's children running ``python -m service.worker``."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if WORKER_MODULE in _cmdline(p) and ENGINE_CORE not in _name(p)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sweep(procs: list[psutil.Process]) -> list[str]:
    """SIGKILL whatever of ``procs`` is still running (a stopped one too); what was left, as 'pid name'."""
    left = running(procs)
    names = [f"{p.pid} {_name(p)} {_cmdline(p)[:120]}" for p in left]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    return names


# --- the service's state ----------------------------------------------------------------------------

def in_flight(url: str) -> float:
    """``qa_in_flight_questions`` from /metrics."""
    status, text = request("GET", url + "/metrics", timeout=10)
    return sum(float(v) for v in _IN_FLIGHT.findall(text)) if status == 200 and isinstance(text, str) else 0.0


def info(url: str) -> dict[str, Any]:
    status, body = request("GET", url + "/info", timeout=10)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"/info answered {status}: {str(body)[:300]}")
    return body


def whole(url: str, beyond: int | None = None) -> bool:
    """Whether the service is whole: ``GET /`` 200 without ``degraded``, every worker up, no incident open.

    ``beyond``: also at least one incident after incident number ``beyond`` (the failure was seen).
    """
    status, body = request("GET", url + "/", timeout=10)
    if status != 200 or not isinstance(body, dict) or body.get("status") not in ("batch", "ok") or "degraded" in body:
        return False
    state = info(url)
    incidents = state.get("incidents", {})
    recent = incidents.get("recent") or [{}]
    return ((beyond is None or incidents.get("total", 0) > beyond) and not recent[-1].get("open", False)
            and all(w.get("state") == "up" for w in state.get("workers", [])))


def wait_whole(url: str, pid: int, timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and alive(pid):
        try:
            if whole(url):
                return True
        except (Unreachable, RuntimeError):
            pass
        time.sleep(POLL)
    return False


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a stopped process counts, a zombie does not)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


# --- one scenario -----------------------------------------------------------------------------------

def ask(url: str, questions: list[str], max_new_tokens: int | None, timeout: float) -> tuple[int, Any]:
    body: dict[str, Any] = {"prompt": questions}
    if max_new_tokens:
        body["max_new_tokens"] = max_new_tokens
    return request("POST", url + "/predict", body, timeout=timeout)


def errors_of(body: Any) -> int:
    return len(body.get("errors", [])) if isinstance(body, dict) else -1


def scenario(name: str, url: str, pid: int, questions: list[str], after: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    """Signal every engine (``stall``) or every worker (``kill``) with a request in flight; what followed."""
    result: dict[str, Any] = {"scenario": name}
    if not wait_whole(url, pid, args.timeout):  # a worker still down or an incident open would blur the figures
        result["error"] = f"the service was not whole (every worker up, no incident open) within {args.timeout:g} s"
        result["service_alive"] = alive(pid)
        return result
    before = info(url).get("incidents", {}).get("total", 0)
    reply: dict[str, Any] = {}

    def send() -> None:
        try:
            reply["status"], reply["body"] = ask(url, questions, args.max_new_tokens, args.timeout)
        except Unreachable as exc:
            reply["status"], reply["body"] = None, str(exc)
        reply["at"] = time.perf_counter()

    thread = threading.Thread(target=send, name=f"{name}-request", daemon=True)
    thread.start()
    deadline = time.perf_counter() + args.timeout
    gauge = 0.0
    while time.perf_counter() < deadline and thread.is_alive() and (gauge := in_flight(url)) <= 0:
        time.sleep(0.02)
    if not thread.is_alive() or gauge <= 0:
        result["error"] = (f"the request ended (status {reply.get('status')}) before questions were in flight: "
                           "raise --max-new-tokens")
        return result
    settled = time.perf_counter() + args.settle
    while gauge < len(questions) and time.perf_counter() < settled:  # every worker has its share
        time.sleep(0.02)
        gauge = in_flight(url)
    targets = engine_cores(pid) if name == "stall" else workers(pid)
    sig = signal.SIGSTOP if name == "stall" else signal.SIGKILL
    result["in_flight_at_signal"] = in_flight(url)
    result["signalled"] = [f"{p.pid} {_name(p)}" for p in targets]
    if not targets or not thread.is_alive():
        result["error"] = ("no process to signal" if not targets
                           else "the request ended during --settle: raise --max-new-tokens")
        return result
    signalled = time.perf_counter()
    for proc in targets:
        proc.send_signal(sig)
    log.info("[stall] %s: %s sent to %d processes with %.0f questions in flight", name, sig.name, len(targets),
             result["in_flight_at_signal"])

    # From now on: the failed reply, the incident, the service whole again.
    detected = back = None
    while time.perf_counter() - signalled < args.timeout and alive(pid):
        try:
            if detected is None and info(url).get("incidents", {}).get("total", 0) > before:
                detected = time.perf_counter() - signalled
            done = whole(url, before)
        except (Unreachable, RuntimeError):
            done = False
        if done and not thread.is_alive():
            back = time.perf_counter() - signalled
            break
        time.sleep(POLL)
    thread.join(max(0.0, args.timeout - (time.perf_counter() - signalled)))
    # A stopped engine whose worker had no call in flight any more (its share was answered before the signal
    # took hold) is not a stall the service can see; let it run on, and say so.
    escaped = running(targets)
    result["escaped"] = [f"{p.pid} {_name(p)}" for p in escaped]
    for proc in escaped:
        proc.send_signal(signal.SIGCONT)
    result.update({
        "reply_status": reply.get("status"),
        "reply_after_s": round(reply["at"] - signalled, 2) if "at" in reply else None,
        "reply_item_errors": errors_of(reply.get("body")),
        "reply_detail": (reply["body"].get("detail") or (reply["body"].get("errors") or [{}])[0].get("message"))
        if isinstance(reply.get("body"), dict) else str(reply.get("body"))[:300],
        "incident_seen_after_s": None if detected is None else round(detected, 2),
        "back_after_s": None if back is None else round(back, 2),
    })
    if back is not None:
        started = time.perf_counter()
        try:
            status, body = ask(url, after, None, args.timeout)
        except Unreachable as exc:
            status, body = None, str(exc)
        result.update({"after_status": status, "after_questions": len(after), "errors_after": errors_of(body),
                       "after_s": round(time.perf_counter() - started, 2)})
    result["service_alive"] = alive(pid)
    if result["service_alive"]:
        state = info(url)
        incidents = state.get("incidents", {})
        recent = incidents.get("recent") or [{}]
        ours = next((i for i in recent if i.get("incident") == before + 1), recent[-1])
        result.update({
            "incidents_total": incidents.get("total"), "incidents_in_window": incidents.get("in_window"),
            "incidents_limit": incidents.get("limit"), "incidents_opened": incidents.get("total", 0) - before,
            "restarts": state.get("restarts"),
            "incident": {k: ours.get(k) for k in ("incident", "cause", "workers", "restarted_after_s", "open",
                                                  "recovered_after_s")},
            "workers": [{k: w.get(k) for k in ("label", "state", "pid", "incident")} for w in state["workers"]],
        })
    return result


# --- main -------------------------------------------------------------------------------------------

def questions_for(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the in-flight request's questions, those asked after it), cycled when the data file is short."""
    pool = load_questions(args.data, args.n + args.n_after, args.offset)
    if not pool:
        raise SystemExit(f"[stall] no questions in {args.data}")
    cycled = [pool[i % len(pool)] for i in range(args.n + args.n_after)]
    return cycled[:args.n], cycled[args.n:]


def measure(args: argparse.Namespace, report: dict[str, Any]) -> None:
    env = service_env(args.preset, args.set)
    in_flight_q, after_q = questions_for(args)
    left: list[psutil.Process] = []
    try:
        log.info("[stall] starting the service (log: %s)", args.log)
        with started_service(env, Path(args.log)) as (url, pid, spawn_to_ready):
            try:
                state = info(url)
                report["service"] = {"spawn_to_ready_s": round(spawn_to_ready, 2),
                                     "ready_after_s": state.get("ready_after_s"),
                                     "engine_workers": len(state.get("workers", [])),
                                     "settings": {k: state.get("settings", {}).get(k) for k in (
                                         "ENGINE_WORKERS", "ENGINE_STALL_TIMEOUT", "RESTART_LIMIT", "RESTART_WINDOW",
                                         "VLLM_KV_CACHE_MEMORY_BYTES", "GPU_MEMORY_UTILIZATION")}}
                started = time.perf_counter()
                status, body = ask(url, in_flight_q[:8], None, args.timeout)
                report["service"]["warm_request"] = {"status": status, "errors": errors_of(body),
                                                     "seconds": round(time.perf_counter() - started, 2)}
                log.info("[stall] ready after %.1f s, %d workers", spawn_to_ready, report["service"]["engine_workers"])
                for name in args.scenario:
                    result = scenario(name, url, pid, in_flight_q, after_q, args)
                    report["scenarios"].append(result)
                    write(report, args.output)
                    log.info("[stall] %s: %s", name, json.dumps(result))
                    if not result.get("service_alive", True) or result.get("back_after_s") is None:
                        break
            finally:
                left = tree(pid)  # the tree as it is now (restarted workers included), checked after the stop
                report["service_alive_at_end"] = alive(pid)
    finally:
        report["left_after_stop"] = sweep(left)
        write(report, args.output)


def write(report: dict[str, Any], output: str | None) -> None:
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="preset layered under this shell's environment (e.g. demo); "
                                                   "none: the automatic layout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a variable for the service, over the environment and the preset (repeatable)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="question file (jsonl, messages format)")
    p.add_argument("--offset", type=int, default=0, help="first question of the file")
    p.add_argument("--n", type=int, default=50, help="questions of the request in flight when the signal comes")
    p.add_argument("--n-after", type=int, default=200, help="questions asked once the service is whole again")
    p.add_argument("--max-new-tokens", type=int, default=800,
                   help="answer budget of the in-flight request, so that it is still running when the signal comes "
                        "(0: the service's routing)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="after questions are first in flight, wait at most this long for all --n of them to be "
                        "(every worker has its share) before the signal")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, default=None,
                   help="stall (SIGSTOP every VLLM::EngineCore) or kill (SIGKILL every engine worker); "
                        "repeatable; default both, in that order")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds each wait may take (the failed reply, the service whole again, a request)")
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "qa-stall-service.log"),
                   help="where the started service logs")
    p.add_argument("--output", help="also write the report to this file (rewritten after each scenario)")
    args = p.parse_args(argv)
    args.scenario = args.scenario or list(SCENARIOS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds: the service is stopped, its tree swept
    report: dict[str, Any] = {"scenarios": []}
    measure(args, report)
    print(json.dumps(report, indent=2))  # noqa: T201 - the report itself
    ok = (len(report["scenarios"]) == len(args.scenario) and not report["left_after_stop"]
          and all(r.get("service_alive") and r.get("back_after_s") is not None for r in report["scenarios"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
