"""``LaunchError`` and the launcher's exit codes (the table is in ``env.launcher`` and the README)."""

from __future__ import annotations

EXIT_DOWNLOAD = 1  # the main model could not be downloaded (``DownloadError.exit_code``)
EXIT_INVALID = 2  # invalid preset, flag or setting, or a required draft model failed to download
EXIT_ENGINE = 3  # the engine or the service cannot be imported (preflight)
EXIT_PORT = 4  # the port is in use (or cannot be bound)
EXIT_INSTALL = 5  # externally managed Python, or ``pip`` failed


class LaunchError(Exception):
    """A step that stops the launcher: ``str(self)`` is the one-paragraph message, ``code`` the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


__all__ = ["EXIT_DOWNLOAD", "EXIT_ENGINE", "EXIT_INSTALL", "EXIT_INVALID", "EXIT_PORT", "LaunchError"]
