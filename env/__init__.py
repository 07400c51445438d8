"""Presets (``env/*.env``) and the code that layers them over the process environment.

``defaults.env`` is the single source of every default; other presets list only what differs.
Nothing here touches ``os.environ``: callers get a mapping and decide what to do with it.
"""

from env.layering import (
    DEFAULTS,
    PRESET_DIR,
    PROJECT_ROOT,
    SECRETS,
    PresetError,
    Value,
    layer,
    preset_names,
    read_preset,
    render_explain,
    render_export,
    resolve_path,
)

__all__ = [
    "DEFAULTS",
    "PRESET_DIR",
    "PROJECT_ROOT",
    "SECRETS",
    "PresetError",
    "Value",
    "layer",
    "preset_names",
    "read_preset",
    "render_explain",
    "render_export",
    "resolve_path",
]
