"""``inv tune``: measure candidate engine layouts on this machine and write the fastest as a preset.

A client of the service, like ``inv bench``: for each candidate it starts the service (``python -m service``
on a free port, one at a time) with the candidate's variables over the user's environment and preset, times
its start-up, answers a sample of the questions (compared with the baseline's answers), then ``--rounds``
rounds of every question in one ``POST /predict``.  The baseline ``auto`` (no overrides) runs first; by
default the candidates are engine counts for this host (``default_candidates``), ``--candidate`` replaces them.
``--budget`` bounds the whole search: a candidate whose estimated cost (the baseline's) would not fit in what
is left is skipped, with every one after it.  The fastest eligible candidate is written as a preset
(``env/<name>.env``) with every layout variable concrete and the measured figure beside each value.
Run as ``python -m bench.tune`` (``inv tune`` does that with the project's interpreter).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.bench import DEFAULT_DATA, service_batch, service_env, started_service
from bench.client import request
from bench.data import DataError, load_pairs
from env import PRESET_DIR, SECRETS, read_preset
from env.hardware import probe_hardware
from env.layout import LAYOUT_KEYS

log = logging.getLogger("bench")
ENGINE_COUNTS = (1, 2, 4, 6, 8)
BASELINE = "auto"
MARK = "# Written by `inv tune`"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BARE = re.compile(r"^[A-Za-z0-9_.,:/+@-]*$")


@dataclass
class Candidate:
    """A named set of variables over the user's environment; ``explicit`` when given by ``--candidate``."""

    name: str
    overrides: dict[str, str]
    explicit: bool = False


@dataclass
class Result:
    """One candidate: ``status`` is measured, failed or skipped (``reason`` says why)."""

    name: str
    overrides: dict[str, str]
    status: str = "measured"
    reason: str = ""
    ready_s: float | None = None
    rounds_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    tokens_per_s: float | None = None
    errors: int = 0
    speed: float | None = None  # the baseline's median / this median: > 1 is faster than auto
    sample_differs: int | None = None
    sample_size: int = 0
    wall_s: float = 0.0  # spawn to stopped: start-up, sample, rounds and shutdown
    eligible: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # the effective layout (GET /info)
    info: dict[str, Any] = field(default_factory=dict)  # MODEL_DIR, routing and temperature (GET /info)
    derived: dict[str, str] = field(default_factory=dict)  # layout keys the service derived (auto): the reason


@dataclass
class Host:
    gpu: str | None  # "1x NVIDIA H200, 143,771 MiB"; None on a CPU host
    cores: int


def detect_host() -> Host:
    """The GPUs and the cores this process may use (``env.hardware``, the project's one probe)."""
    hw = probe_hardware()
    if not hw.gpus:
        return Host(None, hw.cpu_cores)
    return Host(f"{hw.gpus}x {hw.gpu_name}, {hw.gpu_memory_bytes // 2**20:,} MiB", hw.cpu_cores)


def parse_candidate(spec: str) -> Candidate:
    """``'NAME KEY=VALUE [KEY=VALUE ...]'`` (as ``inv bench --variant``)."""
    name, *pairs = shlex.split(spec) or [""]
    if not _NAME.match(name) or name == BASELINE or not pairs or not all("=" in pair for pair in pairs):
        raise SystemExit(f"[tune] --candidate {spec!r}: expected 'NAME KEY=VALUE [KEY=VALUE ...]' (NAME of letters, "
                         f"digits, _.-, not {BASELINE!r})")
    return Candidate(name, dict(pair.split("=", 1) for pair in pairs), explicit=True)


def default_candidates(gpu: bool, cores: int, auto_workers: int) -> list[Candidate]:
    """The bounded default set: engine counts this host can feed, and both front ends at auto's count.

    CPU host: 1 and 2 engines.  GPU host: ENGINE_WORKERS in ENGINE_COUNTS up to max(1, cores // 2) (each
    engine's scheduler needs a core, and its front end another), plus auto's own count; at auto's count (> 1)
    both ENGINE_FRONTEND values, since that is where the front end decides (docs/performance.md).
    """
    if not gpu:
        return [Candidate(f"w{n}", {"ENGINE_WORKERS": str(n)}) for n in (1, 2)]
    limit = max(1, cores // 2)
    counts = sorted({n for n in ENGINE_COUNTS if n <= limit} | ({auto_workers} if 1 < auto_workers <= limit else set()))
    out = []
    for n in counts:
        if n == auto_workers and n > 1:
            out += [Candidate(f"w{n}-{fe}", {"ENGINE_WORKERS": str(n), "ENGINE_FRONTEND": fe}) for fe in ("sync", "async")]
        else:
            out.append(Candidate(f"w{n}", {"ENGINE_WORKERS": str(n)}))
    return out


def estimate_seconds(baseline: Result) -> float:
    """What one more candidate is expected to cost: the baseline's own spawn-to-stopped time."""
    return baseline.wall_s


def over_budget(spent_s: float, estimate_s: float, budget_s: float) -> bool:
    """True when a candidate estimated at ``estimate_s`` would end past ``budget_s`` (``spent_s`` already used)."""
    return spent_s + estimate_s > budget_s


def env_value(value: Any, key: str = "") -> str:
    """A setting as a preset value: list -> comma-separated, None -> empty, whole GiB/MiB of KV bytes."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(env_value(v) for v in value)
    if isinstance(value, float):
        return format(value, ".6g")
    if key == "VLLM_KV_CACHE_MEMORY_BYTES" and isinstance(value, int) and value > 0:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return str(value)


def quoted(value: str) -> str:
    """A value python-dotenv reads back exactly (single quotes: no ``${}`` interpolation)."""
    return value if _BARE.match(value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def measure(cand: Candidate, env: dict[str, str], questions: list[str], args: argparse.Namespace,
            where: str, baseline: Result | None, baseline_answers: list[str]) -> tuple[Result, list[str]]:
    """Start the service with the candidate's variables, time start-up, the sample and the rounds; stop it."""
    result = Result(cand.name, cand.overrides)
    log_path = Path(tempfile.gettempdir()) / "qa-tune" / f"{cand.name}.log"
    log.info("[tune] %s %s: starting (%s; log: %s)", where, cand.name, layout_line(cand.overrides) or "no overrides", log_path)
    spawned = time.perf_counter()
    answers: list[str] = []
    tokens_per_s: list[float] = []
    try:
        with started_service({**env, **cand.overrides}, log_path) as (url, _, ready_s):
            result.ready_s = round(ready_s, 2)
            info = request("GET", url + "/info", timeout=60)[1]
            settings = info.get("settings", {}) if isinstance(info, dict) else {}
            result.settings = {key: settings.get(key, env.get(key)) for key in LAYOUT_KEYS}
            result.info = {"model_dir": settings.get("MODEL_DIR"), "DISABLE_TOKEN_ROUTING":
                           settings.get("DISABLE_TOKEN_ROUTING"), "TEMPERATURE": settings.get("TEMPERATURE")}
            result.derived = {k: str(v.get("reason", "")) for k, v in (info.get("layout") or {}).items()}
            sample = questions[:args.sample]
            if sample:
                status, body = request("POST", url + "/predict", {"prompt": sample})
                if status != 200:
                    raise SystemExit(f"the sample's /predict answered {status}: {str(body)[:300]}")
                answers = body["response"]
            for round_ in range(1, args.rounds + 1):
                run = service_batch(url, questions)
                result.rounds_s.append(round(run.seconds, 3))
                tokens_per_s.append(run.tokens_per_s)
                result.errors = max(result.errors, run.errors)
                log.info("[tune] %s %s: round %d/%d %.2f s", where, cand.name, round_, args.rounds, run.seconds)
    except (SystemExit, Exception) as exc:  # a candidate that fails is reported, and the search goes on
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        last = [line.strip() for line in text.splitlines()[-3:] if line.strip()]
        result.status = "failed"
        result.reason = f"{str(exc).removeprefix('[bench] ')}: {' / '.join(last)[-300:]} (log: {log_path})"
        result.wall_s = round(time.perf_counter() - spawned, 2)
        log.warning("[tune] %s %s: failed: %s", where, cand.name, result.reason)
        return result, []
    result.wall_s = round(time.perf_counter() - spawned, 2)
    result.median_s = statistics.median(result.rounds_s)
    result.tokens_per_s = round(statistics.median(tokens_per_s), 1)
    result.speed = round(baseline.median_s / result.median_s, 3) if baseline and baseline.median_s else 1.0
    result.sample_size = len(answers)
    if baseline is not None:
        result.sample_differs = sum(a != b for a, b in zip(answers, baseline_answers, strict=False))
    differs = ("kept as the reference" if baseline is None
               else f"{result.sample_differs} of {result.sample_size} differ")
    log.info("[tune] %s %s: ready in %.1f s; rounds %s s; median %.2f s (%.0f tok/s), %.2fx %s; sample: %s", where,
             cand.name, result.ready_s, " ".join(f"{s:.2f}" for s in result.rounds_s), result.median_s,
             result.tokens_per_s or 0.0, result.speed, BASELINE, differs)
    return result, answers


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the baseline and the candidates within the budget; pick and write the winner; the report."""
    env = service_env(args.preset, args.set)
    questions = [q for q, _ in load_pairs(args.data, n=args.n or None, offset=args.offset)]
    explicit = [parse_candidate(spec) for spec in args.candidate]
    if not questions or len({c.name for c in explicit}) != len(explicit):
        raise SystemExit(f"[tune] no questions in {args.data} from offset {args.offset}, or two --candidate alike")
    output, host, started = preset_path(args), detect_host(), time.monotonic()
    log.info("[tune] %s, %d cores; %s questions, %d rounds each, budget %d s", host.gpu or "CPU", host.cores,
             f"{len(questions):,}", args.rounds, args.budget)
    where = f"1/{1 + len(explicit)}" if explicit else "1"
    baseline, answers = measure(Candidate(BASELINE, {}), env, questions, args, where, None, [])
    if baseline.status != "measured":
        raise SystemExit(f"[tune] the baseline ({BASELINE}) failed, nothing to compare with: {baseline.reason}")
    baseline.eligible = True
    candidates = explicit or default_candidates(host.gpu is not None, host.cores,
                                                int(baseline.settings.get("ENGINE_WORKERS") or 1))
    results = [baseline]
    for cand in candidates:  # a default candidate that pins only what auto chose anyway would measure auto again
        if not cand.explicit and all(env_value(baseline.settings.get(k), k) == v for k, v in cand.overrides.items()):
            results.append(Result(cand.name, cand.overrides, "skipped", f"the same values as {BASELINE}"))
    measurable = [c for c in candidates if c.name not in {r.name for r in results}]
    estimate = estimate_seconds(baseline)
    log.info("[tune] %s layout: %s; %d candidates to measure: %s", BASELINE, layout_line(baseline.settings),
             len(measurable), ", ".join(c.name for c in measurable) or "none")
    for index, cand in enumerate(measurable, 2):
        where, spent = f"{index}/{len(measurable) + 1}", time.monotonic() - started
        if over_budget(spent, estimate, args.budget):
            why = f"budget: {spent:.0f} s of the {args.budget} s spent, about {estimate:.0f} s a candidate"
            results += [Result(c.name, c.overrides, "skipped", why) for c in measurable[index - 2:]]
            log.info("[tune] %s %s and after: skipped (%s)", where, cand.name, why)
            break
        result, _ = measure(cand, env, questions, args, where, baseline, answers)
        if result.status == "measured":
            result.reason = (f"{result.errors} unanswered questions" if result.errors > baseline.errors else
                             "answers differ (--strict)" if args.strict and result.sample_differs else "")
            result.eligible = not result.reason
        results.append(result)
    order = {c.name: i for i, c in enumerate(candidates, 1)}  # the table in the candidates' order
    results.sort(key=lambda r: order.get(r.name, 0))
    winner = min((r for r in results if r.eligible), key=lambda r: r.median_s or float("inf"))
    in_env = output.parent == PRESET_DIR
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": asdict(host),
        "model_dir": baseline.info.get("model_dir") or env.get("MODEL_DIR", ""), "data": str(args.data),
        "offset": args.offset, "questions": len(questions), "rounds": args.rounds,
        "routing": not baseline.info.get("DISABLE_TOKEN_ROUTING"), "temperature": baseline.info.get("TEMPERATURE"),
        "preset": args.preset, "set": args.set, "strict": args.strict, "budget_s": args.budget,
        "spent_s": round(time.monotonic() - started, 1), "winner": winner.name,
        "candidates": [asdict(r) for r in results], "output": str(output),
        "command": (f"inv run --preset {output.stem}" if in_env
                    else f"cp {output} env/{output.stem}.env && inv run --preset {output.stem}")}
    write_preset(output, *render_preset(report, results, winner, extras(args, env)))
    return report


def layout_line(settings: dict[str, Any]) -> str:
    """``KEY=value`` pairs as a preset would write them."""
    return " ".join(f"{k}={env_value(v, k)}" for k, v in settings.items())


def extras(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """Other variables the run was measured with (--preset's and --set's), so that the preset reproduces it."""
    keys = list(read_preset(args.preset)) if args.preset and args.preset != "defaults" else []
    keys += [item.partition("=")[0] for item in args.set]
    return {k: env[k] for k in dict.fromkeys(keys) if k in env and k not in LAYOUT_KEYS and k not in SECRETS}


def table(report: dict[str, Any]) -> list[str]:
    """One line per candidate: median, tokens/s, speed against auto, sample differences, start-up."""
    lines = [f"{'candidate':<14}{'median s':>9}{'tok/s':>9}{'speed':>7}{'sample':>9}{'ready s':>9}  values"]
    for r in report["candidates"]:
        if r["status"] != "measured":
            lines.append(f"{r['name']:<14}{r['status']}: {r['reason']}")
            continue
        sample = "-" if r["sample_differs"] is None else f"{r['sample_differs']}/{r['sample_size']}"
        mark = "  <- winner" if r["name"] == report["winner"] else ("" if r["eligible"] else f"  ({r['reason']})")
        lines.append(f"{r['name']:<14}{r['median_s']:>9.2f}{r['tokens_per_s'] or 0:>9.0f}{r['speed']:>6.2f}x"
                     f"{sample:>9}{r['ready_s']:>9.1f}  {' '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '-'}"
                     f"{mark}")
    return lines


def render_preset(report: dict[str, Any], results: list[Result], winner: Result,
                  extra: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The preset's text (header: host, workload, every candidate; then each value after its figure) and values."""
    base = results[0]
    routing = "on" if report["routing"] else "off (DISABLE_TOKEN_ROUTING=1)"
    sampled = f" (TEMPERATURE={report['temperature']}: sampled, they differ anyway)" if report["temperature"] else ""
    lines = [
        f"{MARK} on {report['date']} (bench/tune.py): the fastest engine layout measured on this machine.",
        f"# Host: {report['host']['gpu'] or 'CPU'}; {report['host']['cores']} cores. MODEL_DIR={report['model_dir']}",
        f"# Questions: {report['data']}, {report['questions']:,} from offset {report['offset']}, all in one "
        f"POST /predict; token routing {routing}; {report['rounds']} round(s) each{'; --strict' if report['strict'] else ''}.",
        f"# Over: --preset {report['preset'] or 'defaults'}{''.join(' --set ' + s for s in report['set'])}. "
        f"Speed = {BASELINE}'s median / the candidate's (> 1: faster);",
        f"# sample = answers to the first questions that differ from {BASELINE}'s{sampled}.",
        *("#   " + line for line in table(report)),
        f"# Winner: {winner.name}. Use it with: {report['command']}", ""]
    rounds = f"{len(winner.rounds_s)} round{'s' if len(winner.rounds_s) > 1 else ''}"
    figure = f"{winner.median_s:.2f} s median of {rounds}, {report['questions']:,} questions ({BASELINE} {base.median_s:.2f} s)"
    values: dict[str, str] = {}
    for key, value in winner.settings.items():
        text, auto = env_value(value, key), env_value(base.settings.get(key), key)
        values[key] = text
        how = (f"set by {winner.name}" if key in winner.overrides else f"derived: {winner.derived[key]}"
               if key in winner.derived else "given (preset, --set or the environment)")
        same = "" if winner is base else f"; {BASELINE}: {'the same' if text == auto else auto or 'empty'}"
        lines += [f"# tune: {figure}; the winner's value, {how}{same}", f"{key}={quoted(text)}"]
    if extra:
        lines += ["", "# Also measured with these values (from --preset and --set), so that the preset reproduces the run."]
        for key, value in extra.items():
            lines += ["# tune: every candidate ran with this value", f"{key}={quoted(value)}"]
            values[key] = value
    return "\n".join(lines) + "\n", values


def preset_path(args: argparse.Namespace) -> Path:
    """``--output``, else ``env/<--name>.env``; never a preset that ``inv tune`` did not write."""
    if args.output:
        path = Path(args.output).resolve()
    elif not _NAME.match(args.name) or args.name == "defaults":
        raise SystemExit(f"[tune] --name {args.name!r}: expected letters, digits, _.- and not 'defaults'")
    else:
        path = PRESET_DIR / f"{args.name}.env"
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").startswith(MARK):
        raise SystemExit(f"[tune] {path} exists and was not written by inv tune: choose another --name or --output")
    return path


def write_preset(path: Path, text: str, values: dict[str, str]) -> None:
    """Write the preset, then check that python-dotenv reads ``values`` back (``read_preset`` in env/)."""
    from dotenv import dotenv_values

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if path.parent == PRESET_DIR:
        read_preset(path.stem)
    if dotenv_values(path, interpolate=False) != values:
        raise SystemExit(f"[tune] {path} does not read back as written: {dotenv_values(path, interpolate=False)}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inv tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="preset under the candidates (e.g. demo); default: defaults only")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="question file (jsonl, json or docx)")
    p.add_argument("-n", "--n", type=int, default=0, help="number of questions (default 0: all)")
    p.add_argument("--offset", type=int, default=0, help="first question")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every question per candidate (median reported)")
    p.add_argument("--sample", type=int, default=32, help="first N questions answered alone, compared with auto's")
    p.add_argument("--budget", type=int, default=600, help="seconds for the whole search; later candidates skipped")
    p.add_argument("--candidate", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                   help="a candidate layout (repeatable); replaces the default set; auto always runs first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="variable for every candidate")
    p.add_argument("--name", default="tuned", help="preset name: writes env/NAME.env (default tuned)")
    p.add_argument("--output", help="write the preset to this path instead of env/NAME.env")
    p.add_argument("--strict", action="store_true", help="a candidate whose sample answers differ cannot win")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.sample < 0 or args.budget < 1 or args.n < 0:
        p.error("--rounds and --budget must be >= 1, --sample and -n >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    try:
        report = search(args)
    except DataError as exc:
        raise SystemExit(f"[tune] {exc}") from None
    text = json.dumps(report, indent=2) if args.json else "\n".join([
        *table(report), f"[tune] winner: {report['winner']}; preset written to {report['output']}",
        f"[tune] use it: {report['command']}"])
    print(text)  # noqa: T201 - the report itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
