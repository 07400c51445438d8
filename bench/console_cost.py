"""``python -m bench.console_cost``: what an open console page costs ``/predict`` (docs/performance.md).

One service on the demo preset; ``python -m bench.bench --url ... --ceiling`` against it twice (or more), in the
order ``--cases`` gives: ``closed`` (no page) and ``open`` (``bench.console_watch`` keeps the page open in
headless Chromium on this machine, polling as a user's browser does).  Each bench alternates service and
ceiling rounds, so each case has its own service/ceiling ratio measured under the same conditions.  A
benchmark, not a test; needs Selenium, ``chromium`` and ``chromium-driver`` for the ``open`` case.

    python -m bench.console_cost --model-dir DIR --n 1000 --rounds 4 --cases closed,open,closed,open
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.console_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="", help="model to serve (default: the demo preset's MODEL_DIR)")
    parser.add_argument("--n", type=int, default=1000, help="questions per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating service/ceiling rounds per case")
    parser.add_argument("--cases", default="closed,open", help="comma-separated: closed, open")
    parser.add_argument("--page-cpus", default="", metavar="LIST",
                        help="run the page's browser on these CPUs only (taskset -c LIST), e.g. the core vLLM reserves")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="variable for both engines")
    ns = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.served import started_service
    from env import layer

    values = {k: v.value for k, v in layer(os.environ, "demo", force=True).items()}
    if ns.model_dir:
        values["MODEL_DIR"] = ns.model_dir
    values.update(dict(item.split("=", 1) for item in ns.set))
    env = {**os.environ, **values}
    out = Path(tempfile.mkdtemp(prefix="console-cost-"))
    ratios: dict[str, list[float]] = {}
    paired: dict[str, list[float]] = {}
    with started_service(env, out / "service.log") as (url, api_pid, _):
        for index, case in enumerate(ns.cases.split(",")):
            if case not in ("closed", "open"):
                raise SystemExit(f"--cases: {case!r} is neither closed nor open")
            watcher = _open_page(url, env, out / f"{index}-watch.log", ns.page_cpus) if case == "open" else None
            report = out / f"{index}-{case}.json"
            api_cpu, page_cpu, started = _cpu_seconds(api_pid), _cpu_seconds(watcher and watcher.pid, tree=True), time.monotonic()
            try:
                subprocess.run([sys.executable, "-m", "bench.bench", "--url", url, "--preset", "demo", "--n",
                                str(ns.n), "--rounds", str(ns.rounds), "--ceiling", "--json", "--output", str(report),
                                *(f"--set={item}" for item in [f"MODEL_DIR={values['MODEL_DIR']}", *ns.set])],
                               check=True, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
                api_cpu = _cpu_seconds(api_pid) - api_cpu
                page_cpu = _cpu_seconds(watcher and watcher.pid, tree=True) - page_cpu
                if watcher is not None and watcher.poll() is not None:
                    raise SystemExit(f"the console page closed during case {index} ({case}): see {out}/{index}-watch.log")
            finally:
                if watcher is not None:
                    os.killpg(watcher.pid, signal.SIGINT)
                    watcher.wait(60)
            data = json.loads(report.read_text())
            service, ceiling = data["service"]["runs_s"], data["ceiling"]["runs_s"]
            ratio = data["ratio"]["service/ceiling (median seconds)"]
            ratios.setdefault(case, []).append(ratio)
            paired.setdefault(case, []).extend(s / c for s, c in zip(service, ceiling, strict=True))
            print(f"{case}: service {service} s, ceiling {ceiling} s, median ratio {ratio:.3f}, paired "
                  f"{data['ratio']['service/ceiling (paired, median)']:.3f}; CPU during the case "
                  f"({time.monotonic() - started:.0f} s): API process {api_cpu:.1f} s, the page (browser, driver) "
                  f"{page_cpu:.1f} s", flush=True)
    for case, values_ in ratios.items():
        print(f"{case}: median ratios {', '.join(f'{r:.3f}' for r in values_)}; all {len(paired[case])} rounds: "
              f"median paired ratio {statistics.median(paired[case]):.3f}")


def _cpu_seconds(pid: int | None, tree: bool = False) -> float:
    """User + system CPU seconds of a process (and, with ``tree``, of its descendants alive now); 0 for None."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _open_page(url: str, env: dict[str, str], log_path: Path, cpus: str = "") -> subprocess.Popen[bytes]:
    """``bench.console_watch`` with the page open and ready, or SystemExit: an "open" case never runs without it."""
    log_file = log_path.open("wb")
    pinned = ["taskset", "-c", cpus] if cpus else []
    watcher = subprocess.Popen([*pinned, sys.executable, "-m", "bench.console_watch", url], cwd=ROOT,
                               env={**env, "PYTHONPATH": str(ROOT)}, stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and watcher.poll() is None:
        if b"[console_watch] page open, status ready" in log_path.read_bytes():
            return watcher
        time.sleep(0.5)
    if watcher.poll() is None:
        os.killpg(watcher.pid, signal.SIGINT)
        watcher.wait(60)
    raise SystemExit(f"the console page did not open (Selenium, chromium, chromium-driver?): {log_path} ends "
                     f"{log_path.read_text(errors='replace')[-600:]!r}")

if __name__ == "__main__":
    main()
