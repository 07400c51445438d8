"""The uvicorn entry point: ``uvicorn service.asgi:create_app_from_env --factory``.

Settings are read from the environment here, once; an invalid value or a backend that cannot be
imported stops start-up with a clear message (exit code 2 or 3) instead of a traceback.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from service.contract.errors import EngineUnavailable
from service.logs import configure_logging
from service.pool.sharded import engine_client
from service.procs import become_subreaper
from service.settings import Settings, SettingsError

if TYPE_CHECKING:
    from litestar import Litestar

log = logging.getLogger("service")


def create_app_from_env() -> Litestar:
    """Build settings from ``os.environ`` and the app around the chosen engine."""
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        configure_logging("info")
        log.error("%s", exc)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    # Orphans of the workers' processes come back to this process, not to init (service.procs).
    become_subreaper()
    # The workers get these settings, layout included, in their first frame: none parses or derives its own.
    engine = engine_client(settings, os.environ)
    engine.spawn()  # the worker imports the engine while this process imports the web stack
    from service.http.app import create_app

    try:
        engine.check()  # the worker imports the backend: a broken one is a clear error, not a crash later
    except EngineUnavailable as exc:
        log.error("%s", exc)
        raise SystemExit(3) from None
    log.info("backend %s, model %s", engine.name, settings.model_dir)
    return create_app(settings, engine)
