"""Presets (``env/*.env``) and the code that layers them over the process environment.

``defaults.env`` is the single source of every default; other presets list only what differs.
Nothing here touches ``os.environ``: callers get a mapping and decide what to do with it.
``env.layout`` derives the engine layout's ``auto`` values from the hardware and the model.
``env.values`` is the project's one true/false parser (``parse_bool``, ``is_on``); ``env.launcher`` runs the
steps of ``inv run`` (``env/steps/``, one module per step) and is never imported by the service.
"""

from env.hardware import Hardware, probe_hardware
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
from env.layout import LAYOUT_KEYS, ModelShape, derive, read_model_shape
from env.values import is_on, parse_bool

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
    "is_on",
    "layer",
    "layout_lines",
    "parse_bool",
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
