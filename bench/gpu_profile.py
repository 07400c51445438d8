"""Where an engine step's time goes: vLLM's offline path timed by phase, for ``docs/performance.md``.

Run under py-spy on the device (``bash bench/gpu.sh`` sets the environment; see docs/performance.md)::

    py-spy record --subprocesses --format raw -r 50 -o $OUT/profile.txt -- python3 -m bench.gpu_profile ...

It builds vLLM's ``LLM`` with the service's engine arguments (``--preset``), generates the workload once to
warm up, then ``--repeat`` more times with the service's prompts and sampling parameters, printing the
seconds of each.  ``summarize`` turns py-spy's raw (collapsed) output into self and inclusive time by
function for the engine-core and front-end processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path


def run(args: argparse.Namespace) -> dict[str, object]:
    from bench.bench import load_questions, service_env
    from bench.ceiling import Ceiling
    from service.settings import Settings

    settings = Settings.from_environ(service_env(args.preset, args.set))
    questions = load_questions(args.data, args.n, 0)
    ceiling = Ceiling(settings)
    out: dict[str, object] = {"init_s": round(ceiling.init_seconds, 2), "runs_s": []}
    for _ in range(args.repeat + 1):
        out["runs_s"].append(round(ceiling.run(questions).seconds, 3))  # type: ignore[union-attr]
        print(f"[profile] generate: {out['runs_s'][-1]} s", file=sys.stderr, flush=True)  # type: ignore[index]
    ceiling.close()
    return out


_ENTRY = re.compile(r"(.*?) (\d+)\n", re.S)
_PROCESS = re.compile(r'process (\d+):"(.*?)";', re.S)


def summarize(raw: Path, top: int = 25, processes: int = 4) -> str:
    """Self and inclusive sample counts per function, per process (per thread with ``--threads``)."""
    self_t: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: collections.Counter[str] = collections.Counter()
    for entry in _ENTRY.finditer(raw.read_text(errors="replace")):
        stack, n = entry.group(1), int(entry.group(2))
        found = list(_PROCESS.finditer(stack))
        if not found:
            continue
        last = found[-1]
        process = f"{last.group(1)} {' '.join(last.group(2).split())[:50]}"
        frames = [f for f in stack[last.end():].split(";") if f]
        if frames and frames[0].startswith("thread ("):  # py-spy --threads: one entry per thread
            process, frames = f"{process} {frames[0]}", frames[1:]
        names = [f.split(" (")[0] for f in frames]
        total[process] += n
        if names:
            self_t[process][names[-1]] += n
        for name in set(names):
            incl[process][name] += n
    lines = []
    for process, n in total.most_common(processes):
        lines.append(f"== {process}: {n} samples")
        lines.append("  self:")
        lines += [f"    {c:7d} {c / n:6.1%} {name}" for name, c in self_t[process].most_common(top)]
        lines.append("  inclusive:")
        lines += [f"    {c:7d} {c / n:6.1%} {name}" for name, c in incl[process].most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_profile")
    p.add_argument("--preset", default=None)
    p.add_argument("--data", type=Path, help="questions (jsonl); needed unless --summarize")
    p.add_argument("--n", type=int, default=7370)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--summarize", type=Path, help="only summarise this py-spy raw file")
    p.add_argument("--top", type=int, default=25, help="functions listed per process or thread")
    p.add_argument("--processes", type=int, default=4, help="processes (or threads) listed, most samples first")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.top, args.processes))  # noqa: T201 - the report
        return 0
    if args.data is None:
        p.error("--data is needed to run the workload")
    started = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))  # noqa: T201 - the report
    return 0


if __name__ == "__main__":
    sys.exit(main())
