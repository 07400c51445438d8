"""Where each setting's value came from, for the service's console (``Settings.sources``).

``env.layer`` knows it when it layers the presets (``shell``, ``defaults.env``, ``<preset>.env``, ``auto``).
The service started by ``inv run`` gets every value through its environment, where all would look like
``shell``: the launcher passes what it knew in ``QA_SETTINGS_SOURCES`` (``KEY=source;...``), which wins over
``shell`` here.  Values only; no secret is involved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SOURCES_VAR = "QA_SETTINGS_SOURCES"


def encode(values: Mapping[str, Any]) -> str:
    """``KEY=source;...`` of layered ``env.Value``s, for ``QA_SETTINGS_SOURCES``."""
    return ";".join(f"{key}={item.source}" for key, item in values.items())


def describe(source: str) -> str:
    """``shell``, ``default (defaults.env)``, ``preset (demo.env)`` or ``auto``."""
    if source in ("shell", "auto"):
        return source
    if source == "defaults.env":
        return "default (defaults.env)"
    return f"preset ({source})" if source.endswith(".env") else source


def sources(environ: Mapping[str, str], layered: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(KEY, where its value came from) for every layered variable."""
    told: dict[str, str] = {}
    for part in environ.get(SOURCES_VAR, "").split(";"):
        key, sep, source = part.partition("=")
        if sep and key.strip():
            told[key.strip()] = source.strip()
    out = []
    for key, item in layered.items():
        source = item.source
        if source == "shell":
            source = told.get(key, source)
        out.append((key, describe(source)))
    return tuple(out)
