"""``python -m service [uvicorn options]``: uvicorn serving ``service.asgi:create_app_from_env``.

This is what ``inv run`` execs.  It is uvicorn's own command line with the app filled in, plus one
thing: after uvicorn's graceful shutdown on SIGTERM/SIGINT (stop accepting, let in-flight requests
finish up to --timeout-graceful-shutdown, stop the engine and its processes), the process exits 0
instead of re-raising the signal, so supervisors see a clean stop.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

APP = "service.asgi:create_app_from_env"


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    # uvicorn restores these handlers after its shutdown and re-raises the signal it caught.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    uvicorn.main([APP, "--factory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
