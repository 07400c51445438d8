"""``inv bench``: the service's throughput against the engine's own ceiling, measured in one run.

A client of the service: it starts the service as a subprocess (``python -m service`` on a free port)
or targets ``--url``, and sends the evaluation harness's request (every question in one
``POST /predict``).  ``--ceiling`` also builds vLLM's offline ``LLM`` in this process with the same
engine arguments, the same chat-formatted prompts and the same per-question sampling parameters
(``service.pipeline.prompting.Planner``), and times one ``LLM.generate`` call.  Runs alternate
(service, ceiling, service, ...) and each figure is reported as median and spread.
``--concurrency C`` sends single-question requests from C clients instead and compares them with the
same questions in one request.

Run as ``python -m bench.bench`` (``inv bench`` does that with the project's interpreter).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.ceiling import Ceiling, Run, ShardedCeiling
from bench.ceiling import ceiling as offline_ceiling
from bench.client import request
from bench.served import rss_mb, service_tokens, started_service, wait_ready

log = logging.getLogger("bench")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pmpp_qa.jsonl"


# --- measurements ---------------------------------------------------------------------------------

def service_batch(url: str, questions: list[str]) -> Run:
    before = service_tokens(url)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    status, body = request("POST", url + "/predict", {"prompt": questions}, timings=timings)
    seconds = time.perf_counter() - started
    if status != 200 or len(body.get("response", [])) != len(questions):
        raise SystemExit(f"[bench] /predict answered {status}: {str(body)[:500]}")
    return Run(seconds, len(questions), service_tokens(url) - before, len(body.get("errors", [])), timings)


def service_concurrent(url: str, questions: list[str], clients: int) -> Run:
    before = service_tokens(url)

    def ask(question: str) -> int:
        status, body = request("POST", url + "/predict", {"prompt": question})
        if status != 200:
            raise SystemExit(f"[bench] /predict answered {status}: {str(body)[:300]}")
        return 0

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, questions))
    seconds = time.perf_counter() - started
    return Run(seconds, len(questions), service_tokens(url) - before)


ENGINE_ALONE = """
import sys
from vllm import LLM
from bench.bench import service_env
from service.settings import Settings
from service.worker.backends.vllm_args import engine_args
llm = LLM(**engine_args(Settings.from_environ(service_env(sys.argv[1] or None, sys.argv[2:]))))
print("ENGINE-READY", flush=True)
llm.llm_engine.engine_core.shutdown()
"""


def engine_alone_seconds(args: argparse.Namespace, env: dict[str, str]) -> float:
    """Wall time from spawning a fresh Python to vLLM's ``LLM(...)`` built (import included)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    child_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_ALONE, args.preset or "", *args.set], env=child_env,
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("ENGINE-READY"):
            seconds = time.perf_counter() - started
            proc.wait(120)
            return seconds
    raise SystemExit(f"[bench] the engine alone failed to start (exit {proc.wait()})")


def measure_startup(args: argparse.Namespace) -> dict[str, Any]:
    """Alternating start-ups: the service (spawn to ready) and the engine alone (spawn to built)."""
    env = service_env(args.preset, args.set)
    service_s, engine_s = [], []
    for round_ in range(1, args.startup + 1):
        with started_service(env, Path(args.log)) as (_, _, spawn_to_ready):
            service_s.append(spawn_to_ready)
        engine_s.append(engine_alone_seconds(args, env))
        log.info("[bench] start-up round %d/%d: service %.1f s, engine alone %.1f s", round_, args.startup,
                 service_s[-1], engine_s[-1])
    return {"service_spawn_to_ready_s": spread(service_s), "engine_alone_spawn_to_built_s": spread(engine_s),
            "overhead_s (paired, median)": statistics.median(a - b for a, b in zip(service_s, engine_s, strict=True))}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Report:
    questions: int
    rounds: int
    mode: str
    service: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, Any] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    startup: dict[str, Any] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)
    breakdown_s: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def summarize(runs: list[Run]) -> dict[str, Any]:
    client = {}
    if runs and all(r.client for r in runs):  # service rounds: the client's JSON work and its wait
        client = {key: spread([r.client[key] for r in runs]) for key in runs[0].client}  # type: ignore[index]
    return {
        **({"client": client} if client else {}),
        "seconds": spread([r.seconds for r in runs]),
        "questions_per_s": spread([r.questions / r.seconds for r in runs]),
        "tokens_per_s": spread([r.tokens_per_s for r in runs]),
        "tokens": spread([r.tokens for r in runs]),
        "errors": max(r.errors for r in runs),
        "runs_s": [round(r.seconds, 3) for r in runs],
    }


def table(report: Report) -> str:
    lines = [f"{report.questions} questions, {report.rounds} rounds, {report.mode}"]
    header = f"{'':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'q/s':>9}{'tok/s':>10}"
    lines.append(header)
    names = (("service, C clients", "service, one request") if report.mode.startswith("concurrency")
             else ("service", "ceiling (LLM.generate)"))
    for name, part in zip(names, (report.service, report.ceiling), strict=True):
        if not part:
            continue
        s = part["seconds"]
        lines.append(f"{name:<24}{s['median']:>10.2f}{s['min']:>9.2f}{s['max']:>9.2f}"
                     f"{part['questions_per_s']['median']:>9.1f}{part['tokens_per_s']['median']:>10.0f}")
    for key, value in report.ratio.items():
        lines.append(f"ratio {key}: {value:.3f}")
    for name, entry in report.variants.items():
        s = entry["service"]["seconds"]
        ratio = ", ".join(f"{key} {value:.3f}" for key, value in entry.get("ratio", {}).items())
        lines.append(f"variant {name}: median {s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f}){'; ' if ratio else ''}"
                     f"{ratio}")
    for key, value in {**report.startup, **report.memory_mb, **report.breakdown_s}.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------

def load_questions(path: Path, n: int, offset: int) -> list[str]:
    from bench.data import load_pairs

    pairs = load_pairs(path, n=n, offset=offset)
    if len(pairs) < n:
        log.warning("[bench] %s has only %d questions from offset %d", path, len(pairs), offset)
    return [q for q, _ in pairs]


def service_env(preset: str | None, overrides: list[str]) -> dict[str, str]:
    """The service's environment: the preset layered over this shell (setdefault), plus KEY=VALUE pairs."""
    from env import layer

    env = dict(os.environ)
    for item in overrides:
        key, _, value = item.partition("=")
        env[key] = value
    env.update({k: v.value for k, v in layer(env, preset).items()})
    return env


def variants(args: argparse.Namespace, env: dict[str, str]) -> list[tuple[str, dict[str, str], Path]]:
    """(name, service environment, log path) of each service configuration: the preset, then each --variant."""
    configs = [("preset", env, Path(args.log))]
    for spec in args.variant:
        name, *pairs = shlex.split(spec)
        if not pairs or not all("=" in pair for pair in pairs):
            raise SystemExit(f"[bench] --variant {spec!r}: expected 'NAME KEY=VALUE [KEY=VALUE ...]'")
        changed = {**env, **dict(pair.split("=", 1) for pair in pairs)}
        configs.append((name, changed, Path(args.log).with_name(f"{Path(args.log).stem}-{name}.log")))
    return configs


def measure(args: argparse.Namespace) -> Report:
    from service.settings import Settings

    env = service_env(args.preset, args.set)
    questions = load_questions(args.data, args.n, args.offset)
    settings = Settings.from_environ(env)
    configs = variants(args, env)
    for _, config_env, _ in configs[1:]:
        Settings.from_environ(config_env)  # a bad variant fails now, not after the first service's rounds
    if args.url and len(configs) > 1:
        raise SystemExit("[bench] --variant starts services of its own: it cannot be used with --url")
    mode = f"concurrency {args.concurrency}" if args.concurrency else "one request"
    report = Report(len(questions), args.rounds, mode, settings={
        "MODEL_DIR": str(settings.model_dir), "DISABLE_TOKEN_ROUTING": settings.disable_token_routing,
        "VLLM_MAX_NUM_SEQS": settings.vllm_max_num_seqs, "BATCH_CONCURRENCY": settings.batch_concurrency,
        "PRETOKENIZE": settings.pretokenize, "ENGINE_WORKERS": settings.engine_workers})
    ceiling: Ceiling | ShardedCeiling | None = None
    runs: dict[str, list[Run]] = {}
    ceiling_runs: dict[str, list[Run]] = {}
    batch_runs: list[Run] = []
    try:
        for name, config_env, log_path in configs:
            service_runs = runs.setdefault(name, [])
            paired = ceiling_runs.setdefault(name, [])
            with _target(args, config_env, log_path) as (url, pid, spawn_to_ready):
                status, info = request("GET", url + "/info")
                startup = report.startup if name == "preset" else report.variants.setdefault(name, {})
                startup.update({k: info.get(k) for k in ("ready_after_s", "engine_init_s") if k in info})
                if spawn_to_ready is not None:
                    startup["service_spawn_to_ready_s"] = round(spawn_to_ready, 2)
                if args.ceiling and not args.separate and ceiling is None:
                    # Built beside the first service, once it is ready: a fresh machine's first start is the service's.
                    ceiling = _build_ceiling(args, settings, env, report)
                for round_ in range(1, args.rounds + 1):
                    if args.concurrency:
                        service_runs.append(service_concurrent(url, questions, args.concurrency))
                        batch_runs.append(service_batch(url, questions))
                    else:
                        service_runs.append(service_batch(url, questions))
                    if ceiling is not None:
                        paired.append(ceiling.run(questions))
                    log.info("[bench] %s round %d/%d: service %.2f s%s", name, round_, args.rounds,
                             service_runs[-1].seconds, f", ceiling {paired[-1].seconds:.2f} s" if paired else "")
                if pid is not None and name == "preset":
                    report.memory_mb = {"api_process_rss_mb": round(rss_mb(pid), 1),
                                        "api_process_peak_rss_mb": round(rss_mb(pid, "VmHWM"), 1)}
        if args.ceiling and args.separate:  # the services have stopped: the ceiling has the device to itself
            ceiling = _build_ceiling(args, settings, env, report)
            separate = ceiling_runs["preset"]
            for round_ in range(1, args.rounds + 1):
                separate.append(ceiling.run(questions))
                log.info("[bench] ceiling round %d/%d: %.2f s", round_, args.rounds, separate[-1].seconds)
        if ceiling is not None and args.breakdown:
            for variant in Ceiling.VARIANTS:
                report.breakdown_s[variant] = round(ceiling.run(questions, variant).seconds, 3)
                log.info("[bench] ceiling variant %s: %.2f s", variant, report.breakdown_s[variant])
    finally:
        if ceiling is not None:
            ceiling.close()
    report.service = summarize(runs["preset"])
    if ceiling_runs["preset"]:
        report.ceiling = summarize(ceiling_runs["preset"])
        report.ratio = ratios(runs["preset"], ceiling_runs["preset"])
    for name, _, _ in configs[1:]:
        # With --separate every configuration is compared with the one set of ceiling rounds after them.
        against = ceiling_runs[name] or ceiling_runs["preset"]
        entry = report.variants[name]
        entry["service"] = summarize(runs[name])
        if against:
            entry["ceiling"] = summarize(against)
            entry["ratio"] = ratios(runs[name], against)
    if batch_runs:
        report.ceiling = summarize(batch_runs) if not ceiling_runs["preset"] else report.ceiling
        report.ratio["concurrent/one request (paired, median)"] = statistics.median(
            s.seconds / b.seconds for s, b in zip(runs["preset"], batch_runs, strict=True))
    return report


def ratios(service: list[Run], ceiling: list[Run]) -> dict[str, float]:
    """Service over ceiling: of the median seconds, and the median of the round-by-round ratios.

    Also without the client's own JSON encoding and decoding (the wait from sending the request to the
    last byte of the response), since the offline engines hand their answers to nobody.
    """
    out = {"service/ceiling (median seconds)": statistics.median(r.seconds for r in service)
           / statistics.median(r.seconds for r in ceiling),
           "service/ceiling (paired, median)": statistics.median(
               s.seconds / c.seconds for s, c in zip(service, ceiling, strict=True))}
    if all(r.client for r in service):
        out["service wait/ceiling (paired, median)"] = statistics.median(
            s.client["wait_s"] / c.seconds for s, c in zip(service, ceiling, strict=True))  # type: ignore[index]
    return out


def _build_ceiling(args: argparse.Namespace, settings: Any, env: dict[str, str],
                   report: Report) -> Ceiling | ShardedCeiling:
    log.info("[bench] building the ceiling engine (vLLM LLM)")
    built = offline_ceiling(settings, env, Path(args.log).with_suffix(""))
    report.startup["ceiling_import_and_init_s"] = round(built.init_seconds, 2)
    return built


@contextmanager
def _target(args: argparse.Namespace, env: dict[str, str],
            log_path: Path) -> Iterator[tuple[str, int | None, float | None]]:
    if args.url:
        wait_ready(args.url, 60)
        yield args.url.rstrip("/"), None, None
        return
    log.info("[bench] starting the service (log: %s)", log_path)
    with started_service(env, log_path) as (url, pid, spawn_to_ready):
        yield url, pid, spawn_to_ready


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inv bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running service instead of starting one")
    p.add_argument("--preset", default=None, help="preset for the service started here (e.g. demo)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="question file (jsonl, messages format)")
    p.add_argument("--n", type=int, default=2000, help="number of questions")
    p.add_argument("--offset", type=int, default=0, help="first question")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--ceiling", action="store_true", help="also time vLLM's offline LLM.generate in process")
    p.add_argument("--separate", action="store_true",
                   help="with --ceiling: time the service's rounds, stop it, then the ceiling's (for engines that "
                        "do not fit the device twice); the rounds are then not interleaved")
    p.add_argument("--breakdown", action="store_true",
                   help="with --ceiling: also time the ceiling without penalties, without detokenisation, "
                        "prefill only and with text prompts")
    p.add_argument("--startup", type=int, default=0, metavar="N",
                   help="only measure start-up: N alternating rounds of service vs engine alone")
    p.add_argument("--concurrency", type=int, default=0, help="C clients sending single questions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="variable for both engines")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                   help="also measure the service with these variables changed (the ceiling stays as it is): "
                        "another service, started after the previous one stopped, for the same rounds")
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "qa-bench-service.log"),
                   help="where the started service logs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", help="also write the report to this file (the engine may log to stdout)")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: the ceiling's engines and the services started here are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # killed with SIGTERM, a ceiling engine was left running
    if args.startup:
        result = measure_startup(args)
        text = json.dumps(result, indent=2)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(text)  # noqa: T201 - the report itself
        return 0
    report = measure(args)
    text = json.dumps(asdict(report), indent=2) if args.json else table(report)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    print(text)  # noqa: T201 - the report itself
    return 0


if __name__ == "__main__":
    sys.exit(main())

