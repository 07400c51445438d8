"""Command line of the project (invoke): ``inv run``, ``inv env``, ``inv download``.

Thin on purpose: every step lives in ``env/launcher.py``; this file maps flags to it and turns a
``LaunchError`` into invoke's ``Exit`` with the launcher's exit code (listed in the README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from env.launcher import LaunchError, RunOptions, download_only, setup_logging, show_env
from env.launcher import run as run_launcher

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
    "show_secrets": "include secrets (MODELSCOPE_API_TOKEN, ADMIN_TOKEN) instead of omitting/masking them",
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


ns = Collection(run, env, download)
