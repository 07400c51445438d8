"""Step 5 of ``inv run`` (and ``inv download``): make the model ready with the chosen interpreter.

In this process when the chosen interpreter is the running one, else as ``python -m downloader`` in it
(with the layered environment).  The engine layout is derived after this step (it reads config.json).
"""

from __future__ import annotations

import importlib
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path

from env.layering import PROJECT_ROOT
from env.steps.errors import LaunchError
from env.steps.interpreter import Interpreter

log = logging.getLogger("run")


def download_here(values: Mapping[str, str]) -> list[Path]:
    """The download step in this interpreter (raises LaunchError with DownloadError's exit code)."""
    importlib.invalidate_caches()  # packages installed a moment ago by the install step
    from downloader import DownloadError, download

    try:
        return download(values)
    except DownloadError as exc:
        message = str(exc)
        raise LaunchError(message if message.startswith("[") else f"[download] {message}", exc.exit_code) from exc


def download_with(python: Interpreter, env: Mapping[str, str]) -> None:
    """The download step in ``python``: in this process when it is the running one, else a child process."""
    if python.same_as_running():
        download_here(env)
        return
    log.info("downloading with %s (python -m downloader)", python.executable)
    code = subprocess.call([python.executable, "-m", "downloader"], env=dict(env), cwd=PROJECT_ROOT)
    if code != 0:
        raise LaunchError(f"[download] the download failed with exit code {code} (see the lines above)", code)


__all__ = ["download_here", "download_with"]
