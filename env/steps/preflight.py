"""Step 6 of ``inv run``: ``python -m service.preflight`` with the chosen interpreter.

It checks the settings (exit 2) and that the engine imports (exit 3) before anything is exec'd.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping

from env.layering import PROJECT_ROOT
from env.steps.errors import EXIT_ENGINE, EXIT_INVALID, LaunchError
from env.steps.interpreter import Interpreter

log = logging.getLogger("run")


def preflight(python: Interpreter, env: Mapping[str, str]) -> None:
    """``python -m service.preflight``: exit 2 (settings) and 3 (engine) pass through; other failures are 3."""
    log.info("preflight: checking the settings and that the engine imports")
    code = subprocess.call([python.executable, "-m", "service.preflight"], env=dict(env), cwd=PROJECT_ROOT)
    if code == 0:
        return
    if code == EXIT_INVALID:
        raise LaunchError("[run] preflight: invalid settings (see the message above); nothing was started", code)
    what = "the engine cannot be imported" if code == EXIT_ENGINE else f"the preflight check failed (exit {code})"
    raise LaunchError(f"[run] preflight: {what} with {python.executable} (see above); check the install, "
                      f"e.g. run without --skip-install", EXIT_ENGINE)


__all__ = ["preflight"]
