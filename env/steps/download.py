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
from env.steps.errors import EXIT_ENGINE, LaunchError
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


# ``python -m downloader`` in another interpreter; one that lacks the packages the downloader imports
# (``inv run --skip-install`` into a bare Python) gets one line and exit 3, as the preflight gives, not a traceback.
_RUN_DOWNLOADER = """
import sys
try:
    from downloader.__main__ import main
except ModuleNotFoundError as exc:
    print(f"[download] {exc.name} is not installed in {sys.executable}: install the project's requirements "
          "into it (`inv run` without --skip-install does)", file=sys.stderr)
    sys.exit(3)
sys.argv[0] = "python -m downloader"
sys.exit(main())
"""


def download_with(python: Interpreter, env: Mapping[str, str]) -> None:
    """The download step in ``python``: in this process when it is the running one, else a child process."""
    if python.same_as_running():
        download_here(env)
        return
    log.info("downloading with %s (python -m downloader)", python.executable)
    code = subprocess.call([python.executable, "-c", _RUN_DOWNLOADER], env=dict(env), cwd=PROJECT_ROOT)
    if code == EXIT_ENGINE:
        raise LaunchError(f"[download] {python.executable} lacks the project's packages (see the line above)", code)
    if code != 0:
        raise LaunchError(f"[download] the download failed with exit code {code} (see the lines above)", code)


__all__ = ["download_here", "download_with"]
