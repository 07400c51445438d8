"""``python -m downloader [--preset NAME] [--force]``: the download step alone (the Dockerfile runs it).

Variables come from ``env.layer`` over the process environment, like the launcher.  Exit codes: 0 ready
(or ``SKIP_MODEL_DOWNLOAD=1``), 1 main model failed, 2 required draft model failed (or a bad preset).
Errors are one ``[download]`` paragraph on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Hub settings that are not preset variables (yet) still reach the downloader from the shell.
PASSTHROUGH = ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m downloader", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a preset name from env/ (default: defaults only)")
    parser.add_argument("--force", action="store_true", help="the preset overrides the environment")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="per-file progress lines (default: every second on a terminal, every 15 s elsewhere)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("download")

    from env import PresetError, is_on, layer

    try:
        values = {k: v.value for k, v in layer(os.environ, args.preset, force=args.force).items()}
    except PresetError as exc:
        log.error("[download] %s", exc)
        return 2
    for key in PASSTHROUGH:
        if key not in values and os.environ.get(key):
            values[key] = os.environ[key]
    if is_on(values.get("SKIP_MODEL_DOWNLOAD", "0")):
        log.info("[download] SKIP_MODEL_DOWNLOAD=1: skipped")
        return 0

    from downloader import DownloadError, download

    try:
        paths = download(values, progress=args.progress)
    except DownloadError as exc:
        log.error("[download] %s", exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("[download] interrupted; a rerun resumes where this one stopped")
        return 130
    log.info("[download] ready: %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
