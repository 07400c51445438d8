"""``inv eval`` / ``python -m bench.evaluate``: answer quality and speed of a RUNNING service.

All questions of a question/reference file (``bench.data``) go to ``POST /predict`` in one request, as the
evaluation harness sends them.  The report: ROUGE-L F1 on jieba tokens (``bench.rouge``) overall and per
route (short, code, long; hard counts as code), mean answer length in characters, questions/s and
generated tokens/s (``qa_generated_tokens_total`` from ``GET /metrics`` before and after, all routes,
divided by the request's wall time), the items the service could not answer, and the worst K items.

Scoring rules: every item that has a reference is scored on the text the service returned (a failed
item's answer, normally empty, scores 0, as the harness would see it); items without a reference are
answered but not scored.  Answer length is averaged over the items that did not fail.  ``index`` is a
question's position in the file (0-based, counting questions, offset included).

Exit codes: 0 report, no failed items; 1 report, some items failed; 2 unreadable input or bad
arguments; 3 the service is unreachable, not ready, or the request failed.  The report goes to stdout
(a table, or JSON with ``--json``); log lines go to the ``eval`` logger (``[eval] ...`` on stderr).
Only the standard library talks HTTP; nothing here imports the web framework or the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from bench.client import Unreachable, generated_tokens, request
from bench.data import DataError, load_pairs
from bench.rouge import rouge_l
from service.pipeline.routing import Route, Router
from service.settings import Settings, SettingsError

log = logging.getLogger("eval")

ROUTE_GROUPS = ("short", "code", "long")
# The settings that decide a question's route; taken from the service's GET /info when it answers.
ROUTING_VARS = ("HARD_CODE_MIN_HITS", "LONG_ANSWER_ENABLE_DEFAULT", "LONG_ANSWER_MIN_HITS",
                "HARD_CODE_QUESTION_KEYWORDS", "LONG_ANSWER_KEYWORDS", "CODE_QUESTION_KEYWORDS")
DEFAULT_TIMEOUT = 3600.0


class EvalError(RuntimeError):
    """The service could not be asked (unreachable, not ready, an HTTP error or a malformed reply)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One evaluated question."""

    index: int
    route: str
    question: str
    reference: str | None
    answer: str
    score: float | None
    error: str | None


# --- pure parts --------------------------------------------------------------------------------------

def route_group(route: Route | str) -> str:
    """The report's route group: ``short``, ``code`` (hard included) or ``long``."""
    value = Route(route)
    return "code" if value is Route.HARD else value.value


def score_items(pairs: Sequence[tuple[str, str | None]], answers: Sequence[str], routes: Sequence[str],
                errors: Mapping[int, str], offset: int = 0) -> list[Item]:
    """Score each answer against its reference (``errors`` maps positions in ``pairs`` to messages)."""
    items = []
    for i, ((question, reference), answer, route) in enumerate(zip(pairs, answers, routes, strict=True)):
        score = None if reference is None else rouge_l(reference, answer).f1
        items.append(Item(offset + i, route_group(route), question, reference, answer, score, errors.get(i)))
    return items


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def _group(items: Sequence[Item]) -> dict[str, Any]:
    scores = [it.score for it in items if it.score is not None]
    return {
        "questions": len(items),
        "scored": len(scores),
        "rouge_l_f1": _mean(scores),
        "answer_chars": _mean([len(it.answer) for it in items if it.error is None]),
    }


def summarize(items: Sequence[Item], wall_s: float, tokens: float | None, worst: int = 5) -> dict[str, Any]:
    """The report (a JSON-ready dict) of evaluated items, the request's wall time and generated tokens."""
    overall = _group(items)
    scored = sorted((it for it in items if it.score is not None), key=lambda it: (it.score, it.index))
    return {
        "questions": overall["questions"],
        "scored": overall["scored"],
        "rouge_l_f1": overall["rouge_l_f1"],
        "answer_chars": overall["answer_chars"],
        "routes": {g: _group([it for it in items if it.route == g]) for g in ROUTE_GROUPS},
        "wall_s": wall_s,
        "questions_per_s": len(items) / wall_s if wall_s > 0 else None,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall_s if tokens is not None and wall_s > 0 else None,
        "failed": [{"index": it.index, "question": it.question, "message": it.error} for it in items if it.error],
        "worst": [{k: v for k, v in asdict(it).items() if k != "error"} for it in scored[:max(0, worst)]],
    }


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _clip(text: str | None, width: int = 100) -> str:
    if text is None:
        return "(none)"
    flat = " ↵ ".join(line.strip() for line in text.strip().splitlines())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as readable text for a terminal."""
    lines = [f"eval {report.get('url', '')}  {report.get('data', '')}  "
             f"({report['questions']} questions from offset {report.get('offset', 0)}, {report['scored']} scored)",
             "",
             f"{'route':<8}{'questions':>10}{'scored':>8}{'ROUGE-L F1':>12}{'answer chars':>14}"]
    rows = [*report["routes"].items(), ("all", report)]
    for name, g in rows:
        lines.append(f"{name:<8}{g['questions']:>10}{g['scored']:>8}{_num(g['rouge_l_f1']):>12}"
                     f"{_num(g['answer_chars'], 1):>14}")
    lines += ["",
              f"wall {report['wall_s']:.2f} s   {_num(report['questions_per_s'], 2)} questions/s   "
              f"generated {_num(report['generated_tokens'], 0)} tokens   {_num(report['tokens_per_s'], 1)} tokens/s"]
    failed = report["failed"]
    lines.append(f"failed: {len(failed) or 'none'}")
    lines += [f"  #{f['index']}  {_clip(f['question'], 60)}  ->  {f['message']}" for f in failed]
    if report["worst"]:
        lines += ["", f"worst {len(report['worst'])}:"]
        for w in report["worst"]:
            lines += [f"  #{w['index']} [{w['route']}] ROUGE-L F1 {w['score']:.4f}",
                      f"    Q: {_clip(w['question'])}", f"    R: {_clip(w['reference'])}", f"    A: {_clip(w['answer'])}"]
    return "\n".join(lines)


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def router_for(service_settings: Mapping[str, Any] | None, environ: Mapping[str, str]) -> Router:
    """The service's router: ``environ`` with the routing variables of GET /info's settings laid over."""
    env = dict(environ)
    for key in ROUTING_VARS:
        if service_settings and key in service_settings:
            env[key] = _env_value(service_settings[key])
    try:
        return Router.from_settings(Settings.from_environ(env))
    except SettingsError as exc:
        log.warning("the environment's settings are invalid (%s); routing with the defaults", exc)
        return Router.from_settings(Settings.from_environ({k: env[k] for k in ROUTING_VARS if k in env}))


# --- HTTP ---------------------------------------------------------------------------------------------

def _request(method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """(status, parsed JSON or text); EvalError when the service cannot be reached."""
    try:
        return request(method, url, body, timeout)
    except Unreachable as exc:
        raise EvalError(str(exc)) from None


def _tokens_now(url: str) -> float | None:
    try:
        status, body = _request("GET", url + "/metrics")
    except EvalError as exc:
        log.warning("%s: no tokens/s", exc)
        return None
    if status != 200 or not isinstance(body, str):
        log.warning("GET /metrics answered %s: no tokens/s", status)
        return None
    return generated_tokens(body)


def _answers(url: str, questions: list[str], timeout: float) -> tuple[list[str], dict[int, str], float]:
    """One POST /predict with every question: (answers, errors by position, wall seconds)."""
    started = time.perf_counter()
    status, body = _request("POST", url + "/predict", {"prompt": questions}, timeout)
    wall = time.perf_counter() - started
    if status != 200:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        raise EvalError(f"POST /predict answered {status}: {detail}")
    answers = body.get("response") if isinstance(body, dict) else None
    if not isinstance(answers, list) or len(answers) != len(questions) or not all(isinstance(a, str) for a in answers):
        raise EvalError(f"POST /predict: expected {len(questions)} answers in `response`, got {str(body)[:200]}")
    errors = {int(e["index"]): str(e.get("message", "")) for e in body.get("errors") or []}
    return answers, errors, wall


def evaluate(url: str, pairs: list[tuple[str, str | None]], worst: int = 5, offset: int = 0,
             timeout: float = DEFAULT_TIMEOUT, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ask the service at ``url`` every question of ``pairs`` and build the report."""
    url = url.rstrip("/")
    status, health = _request("GET", url + "/")
    state = health.get("status") if isinstance(health, dict) else health
    if status != 200 or state not in ("ok", "batch"):
        raise EvalError(f"{url} is not ready (GET / answered {status}: {state}); retry when it says ok or batch")
    info_status, info = _request("GET", url + "/info")
    settings = info.get("settings") if info_status == 200 and isinstance(info, dict) else None
    if settings is None:
        log.warning("GET /info answered %s: routing questions with this shell's settings", info_status)
    router = router_for(settings, os.environ if environ is None else environ)
    questions = [q for q, _ in pairs]
    before = _tokens_now(url)
    log.info("asking %d questions in one POST /predict", len(questions))
    answers, errors, wall = _answers(url, questions, timeout)
    after = _tokens_now(url)
    tokens = after - before if before is not None and after is not None else None
    log.info("answered in %.2f s (%d failed); scoring", wall, len(errors))
    items = score_items(pairs, answers, [router.route(q) for q in questions], errors, offset)
    return {"url": url, **summarize(items, wall, tokens, worst)}


# --- entry points -------------------------------------------------------------------------------------

def _ensure_logging() -> None:
    """An ``[eval]`` stderr handler on the ``eval`` logger, unless someone configured one already."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[eval] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(url: str, path: Path, n: int | None, offset: int, worst: int, json_out: bool,
         timeout: float = DEFAULT_TIMEOUT) -> int:
    """Evaluate the service at ``url`` on ``path``; print the report; return the exit code (module docstring)."""
    _ensure_logging()
    try:
        pairs = load_pairs(path, n=n, offset=offset)
    except DataError as exc:
        log.error("%s", exc)
        return 2
    if not pairs:
        log.error("%s: no questions from offset %d", path, offset)
        return 2
    log.info("%s: %d questions from offset %d (%d with references)", path, len(pairs), offset,
             sum(r is not None for _, r in pairs))
    try:
        report = evaluate(url, pairs, worst, offset, timeout)
    except EvalError as exc:
        log.error("%s", exc)
        return 3
    report = {"url": report["url"], "data": str(path), "offset": offset, **report}
    sys.stdout.write((json.dumps(report, ensure_ascii=False, indent=2) if json_out else format_table(report)) + "\n")
    sys.stdout.flush()
    return 1 if report["failed"] else 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m bench.evaluate PATH [--url URL] [-n N] [--offset K] [--worst K] [--json] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="question/reference file (.jsonl, .json or .docx)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service (default: %(default)s)")
    parser.add_argument("-n", type=int, default=None, help="questions to ask (default: all)")
    parser.add_argument("--offset", type=int, default=0, help="questions to skip first (default: 0)")
    parser.add_argument("--worst", type=int, default=5, help="worst items to show (default: 5)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the answers")
    args = parser.parse_args(argv)
    return main(args.url, args.path, args.n, args.offset, args.worst, args.json, args.timeout)


if __name__ == "__main__":
    sys.exit(cli())
