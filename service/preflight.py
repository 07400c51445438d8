"""``python -m service.preflight``: what the launcher checks before it execs uvicorn.

Exit 0 when the settings are valid and the engine imports; 2 with the invalid variables; 3 when the
backend cannot be imported (the message says why and what to do).
"""

from __future__ import annotations

import logging
import os
import sys

from service.contract.errors import EngineUnavailable
from service.settings import Settings, SettingsError
from service.worker.backends import build_engine

log = logging.getLogger("run")


def main() -> int:
    logging.basicConfig(level="INFO", format="[run] %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    try:
        settings.load_system_prompt()
        engine = build_engine(settings)
        engine.check()
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    except EngineUnavailable as exc:
        log.error("%s", exc)
        return 3
    log.info("preflight ok: backend %s imports, settings valid", engine.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
