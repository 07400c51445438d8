"""The launcher behind ``inv run``, ``inv env`` and ``inv download`` (``tasks.py`` is a thin CLI over it).

``inv run`` does, in this order (each step is one module of ``env/steps/``):

1. layer the presets over the environment (``steps.presets``: ``env.layering.layer``, setdefault or ``--force``);
2. pick and report the interpreter (``steps.interpreter``: the project's ``.venv`` when it exists and nothing
   else is active);
3. check that the port is free, naming the process that holds it (``steps.port``, before any slow step);
4. install the target's lock, ``requirements/cpu-lock.txt`` or ``gpu-lock.txt`` (``env/locks.py``), with that
   interpreter (``steps.install``; skippable);
5. download the model (``steps.download``; skippable), then derive the ``auto`` engine layout (``env.layout``)
   and print it;
6. run ``python -m service.preflight`` with that interpreter (``steps.preflight``: settings valid, engine imports);
7. ``os.execvpe`` uvicorn with that same interpreter, the layered environment and cwd = project root,
   so the server keeps the launcher's PID and receives its signals directly.

Exit codes (also in the README; defined in ``env.steps.errors``):

====  ==========================================================================================
 1    the main model could not be downloaded (``DownloadError.exit_code``)
 2    invalid preset, flag or setting (preflight), or a required draft model failed to download
 3    the engine or the service cannot be imported (preflight)
 4    the port is in use (or cannot be bound)
 5    the interpreter cannot take the install: externally managed Python, or ``pip`` failed
====  ==========================================================================================

When the target interpreter is not the one running the launcher, the download runs there as
``python -m downloader`` (with the layered environment).  ``python -m env.launcher healthcheck`` is Docker's
``HEALTHCHECK``: it reads ``PORT`` through the presets, so no port is copied into the Dockerfile.
Every public name of the steps is importable from here as well (``from env.launcher import probe``).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from env.layering import (
    DEFAULTS,
    PROJECT_ROOT,
    SECRETS,
    Value,
    layout_lines,
    render_explain,
    render_export,
    resolve_layout,
)
from env.provenance import SOURCES_VAR
from env.provenance import encode as encode_sources
from env.steps.download import download_here, download_with
from env.steps.errors import EXIT_DOWNLOAD, EXIT_ENGINE, EXIT_INSTALL, EXIT_INVALID, EXIT_PORT, LaunchError
from env.steps.install import (
    CPU_UNWANTED,
    INSTALL_TARGETS,
    install,
    install_target,
    read_requirements,
    requirements_state,
)
from env.steps.interpreter import Interpreter, choose_interpreter, interpreter_environ, probe
from env.steps.port import check_port, listening_pids, parse_port
from env.steps.preflight import preflight
from env.steps.presets import describe_layers, layered, merged_environ
from env.values import is_on

SERVICE_MODULE = "service"  # `python -m service`: uvicorn serving service.asgi:create_app_from_env
LOGGERS = ("run", "env", "download")

log = logging.getLogger("run")


# --- logging ----------------------------------------------------------------------------------


class PrefixFormatter(logging.Formatter):
    """Prefixes every line with ``[<logger>]`` unless the message already carries a ``[...]`` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[{record.name.split('.')[0]}]"
        text = super().format(record)
        return "\n".join(line if line.startswith("[") else f"{prefix} {line}" for line in text.splitlines())


def setup_logging(stream: TextIO | None = None) -> None:
    """Send the ``run``/``env``/``download`` loggers to ``stream`` (stderr by default), one handler each."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, "_launcher", False):
                logger.removeHandler(handler)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(PrefixFormatter("%(message)s"))
        handler._launcher = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _flush_logs() -> None:
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.flush()


# --- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """The flags of ``inv run`` (empty host / zero port: HOST / PORT from the presets)."""

    preset: str = DEFAULTS
    force: bool = False
    skip_install: bool = False
    skip_download: bool = False
    host: str = ""
    port: int = 0


def _skip_reason(flag: bool, flag_name: str, key: str, values: Mapping[str, Value]) -> str | None:
    if flag:
        return flag_name
    item = values.get(key)
    if item is not None and is_on(item.value):
        return f"{key}={item.value} from {item.source}"
    return None


def run(options: RunOptions, environ: Mapping[str, str] | None = None) -> None:
    """``inv run``: every step, then exec uvicorn (returns only by raising LaunchError)."""
    environ = dict(os.environ if environ is None else environ)
    values = layered(environ, options.preset, options.force)
    log.info("%s", describe_layers(options.preset, options.force))
    if options.force:
        overridden = sorted(k for k, v in values.items() if k in environ and v.source != "shell"
                            and environ[k] != v.value)
        if overridden:
            log.info("--force replaced the shell's value of %s", ", ".join(overridden))
    host = options.host or values["HOST"].value
    port = parse_port(str(options.port), "--port") if options.port else parse_port(values["PORT"].value, "PORT")

    current = probe(sys.executable)
    python, why = choose_interpreter(PROJECT_ROOT, current)
    log.info("interpreter: %s", python.describe())
    log.info("%s", why)

    check_port(host, port)
    log.info("port %d on %s is free", port, host)

    env = interpreter_environ(merged_environ(environ, values), python)
    env["HOST"], env["PORT"] = host, str(port)

    skip = _skip_reason(options.skip_install, "--skip-install", "SKIP_PIP_INSTALL", values)
    if skip:
        log.info("pip install skipped (%s)", skip)
    else:
        target, reason = install_target(values["INSTALL_TARGET"].value)
        log.info("install target %s (%s)", target, reason)
        install(python, target, is_on(values["ALLOW_SYSTEM_PIP"].value), env)

    skip = _skip_reason(options.skip_download, "--skip-download", "SKIP_MODEL_DOWNLOAD", values)
    if skip:
        log.info("model download skipped (%s)", skip)
    else:
        download_with(python, env)

    values = resolve_layout(values)  # after the download: the layout reads the model's config.json
    for line in layout_lines(values):
        log.info("layout: %s", line)
    env.update({key: item.value for key, item in values.items() if item.source == "auto"})
    env[SOURCES_VAR] = encode_sources(values)  # where each value came from, for the service's console
    preflight(python, env)
    check_port(host, port)  # the slow steps may have taken minutes
    argv = [python.executable, "-m", SERVICE_MODULE, "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", env["SHUTDOWN_TIMEOUT"]]
    log.info("exec %s (cwd %s, PID %d)", shlex.join(argv), PROJECT_ROOT, os.getpid())
    _flush_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(PROJECT_ROOT)
    os.execvpe(python.executable, argv, env)


def run_tool(module: str, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``<python> -m module argv`` with the interpreter ``inv run`` would use (bench, eval); its exit code."""
    environ = os.environ if environ is None else environ
    python, why = choose_interpreter(PROJECT_ROOT, probe(sys.executable))
    log.debug("%s: %s", module, why)
    env = interpreter_environ(environ, python)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.call([python.executable, "-m", module, *argv], env=env, cwd=PROJECT_ROOT)


def prefixed(text: str, name: str) -> str:
    """Each line of ``text`` with the ``[name]`` prefix (for listings that go to stdout)."""
    return "".join(f"[{name}] {line}\n" for line in text.splitlines())


def show_env(preset: str, force: bool, export: bool, explain: bool, show_secrets: bool,
             environ: Mapping[str, str] | None = None) -> str:
    """``inv env``: the text for stdout (export lines, the explanation, or ``KEY=value`` lines)."""
    environ = dict(os.environ if environ is None else environ)
    values = resolve_layout(layered(environ, preset, force))
    env_log = logging.getLogger("env")
    hidden = [k for k in sorted(SECRETS) if k in values and values[k].value and not show_secrets]
    if export:
        if hidden:
            env_log.info("%s set but not exported (secrets; --show-secrets includes them)", ", ".join(hidden))
        return render_export(values, show_secrets)
    env_log.info("%s", describe_layers(preset, force))
    if explain:
        return prefixed(render_explain(values, show_secrets), "env")
    return prefixed("".join(
        f"{key}={'***' if key in SECRETS and item.value and not show_secrets else shlex.quote(item.value)}\n"
        for key, item in values.items()), "env")


def download_only(preset: str, force: bool, environ: Mapping[str, str] | None = None) -> list[Path]:
    """``inv download``: layer, pick the interpreter, download."""
    environ = dict(os.environ if environ is None else environ)
    values = layered(environ, preset, force)
    dl_log = logging.getLogger("download")
    dl_log.info("%s", describe_layers(preset, force))
    python, why = choose_interpreter(PROJECT_ROOT, probe(sys.executable))
    dl_log.info("interpreter: %s; %s", python.describe(), why)
    env = interpreter_environ(merged_environ(environ, values), python)
    if python.same_as_running():
        return download_here(env)
    download_with(python, env)
    return []


def healthcheck(environ: Mapping[str, str], timeout: float = 5.0) -> int:
    """0 when ``GET /health/ready`` on this host's PORT answers 2xx, else 1 (Docker's HEALTHCHECK)."""
    port = layered(environ, DEFAULTS, False)["PORT"].value
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=timeout) as response:
            return 0 if 200 <= response.status < 300 else 1
    except (OSError, urllib.error.URLError):
        return 1


def _main(argv: Sequence[str]) -> int:
    args = list(argv)
    setup_logging()
    if args == ["healthcheck"]:
        try:
            return healthcheck(os.environ)
        except LaunchError as exc:
            log.error("%s", exc)
            return exc.code
    log.error("usage: python -m env.launcher healthcheck")
    return EXIT_INVALID


__all__ = [
    "CPU_UNWANTED", "EXIT_DOWNLOAD", "EXIT_ENGINE", "EXIT_INSTALL", "EXIT_INVALID", "EXIT_PORT", "INSTALL_TARGETS",
    "LOGGERS", "SERVICE_MODULE", "Interpreter", "LaunchError", "PrefixFormatter", "RunOptions", "check_port",
    "choose_interpreter", "describe_layers", "download_here", "download_only", "download_with", "healthcheck",
    "install", "install_target", "interpreter_environ", "is_on", "layered", "listening_pids", "merged_environ",
    "parse_port", "prefixed", "preflight", "probe", "read_requirements", "requirements_state", "run", "run_tool",
    "setup_logging", "show_env",
]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
