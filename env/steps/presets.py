"""Step 1 of ``inv run``: layer the presets over the environment (``env.layering.layer``)."""

from __future__ import annotations

from collections.abc import Mapping

from env.layering import DEFAULTS, PresetError, Value, layer
from env.steps.errors import EXIT_INVALID, LaunchError


def layered(environ: Mapping[str, str], preset: str, force: bool) -> dict[str, Value]:
    """``layer()`` with preset errors turned into exit code 2."""
    try:
        return layer(environ, preset or DEFAULTS, force)
    except PresetError as exc:
        raise LaunchError(str(exc), EXIT_INVALID) from exc


def describe_layers(preset: str, force: bool) -> str:
    """One line: which preset files are layered, and which rule decides between them and the shell."""
    files = f"{DEFAULTS}.env" if not preset or preset == DEFAULTS else f"{DEFAULTS}.env + {preset}.env"
    rule = ("--force: the preset overrides the shell (secrets already set are kept)" if force
            else "setdefault: a variable already in the shell wins")
    return f"preset {files}; {rule}"


def merged_environ(environ: Mapping[str, str], values: Mapping[str, Value]) -> dict[str, str]:
    """The process environment with the layered values applied (what every later step sees)."""
    merged = dict(environ)
    merged.update({key: item.value for key, item in values.items()})
    return merged


__all__ = ["describe_layers", "layered", "merged_environ"]
