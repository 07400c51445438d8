"""Presets (``env/*.env``) and the code that layers them over the process environment.

``defaults.env`` is the single source of every default; other presets list only what differs.
Nothing here touches ``os.environ``: callers get a mapping and decide what to do with it.
``env.layout`` derives the engine layout's ``auto`` values from the hardware and the model.
"""

from env.layering import (
    DEFAULTS,
    PRESET_DIR,
    PROJECT_ROOT,
    SECRETS,
    PresetError,
    Value,
    layer,
    layout_lines,
    preset_names,
    read_preset,
    render_explain,
    render_export,
    resolve_layout,
    resolve_path,
    with_layout,
)
from env.layout import LAYOUT_KEYS, Hardware, ModelShape, derive, probe_hardware, read_model_shape

__all__ = [
    "DEFAULTS",
    "LAYOUT_KEYS",
    "PRESET_DIR",
    "PROJECT_ROOT",
    "SECRETS",
    "Hardware",
    "ModelShape",
    "PresetError",
    "Value",
    "derive",
    "layer",
    "layout_lines",
    "preset_names",
    "probe_hardware",
    "read_model_shape",
    "read_preset",
    "render_explain",
    "render_export",
    "resolve_layout",
    "resolve_path",
    "with_layout",
]
