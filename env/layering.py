"""Layering of ``.env`` presets over an environment, with the provenance of every value.

Order (lowest first): ``defaults.env`` < the named preset < the shell.  With ``force=True`` the shell
drops below the presets, except for secrets that the shell already sets (they are kept).
``${VAR}`` references in preset values resolve against the final layered values, so an exported
``MODEL_ID`` moves ``MODEL_DIR=./model/${MODEL_ID}`` with it.  Single-quoted preset values are literal.
``layer()`` is pure; ``resolve_layout()`` then replaces the engine layout's ``auto`` values with the ones
derived for this host and model (``env.layout``), with source ``auto`` and a reason.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv.parser import parse_stream

from env.hardware import Hardware, probe_hardware
from env.layout import AUTO, LAYOUT_KEYS, ModelShape, derive, read_model_shape

PRESET_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PRESET_DIR.parent
DEFAULTS = "defaults"
SECRETS = frozenset({"MODELSCOPE_API_TOKEN", "ADMIN_TOKEN", "API_KEY"})

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class PresetError(Exception):
    """A preset that does not exist or cannot be parsed (the launcher exits with code 2)."""


@dataclass(frozen=True)
class Value:
    """One effective variable: its value, where it came from, and the preset value it shadows."""

    key: str
    value: str
    source: str  # "shell", "defaults.env", "<name>.env" or "auto" (derived by env.layout)
    shadowed: str | None = None  # the preset's value when the shell's differs from it
    reason: str | None = None  # why an ``auto`` value was derived as it was


def preset_names() -> list[str]:
    """Names of the presets shipped in ``env/`` (``defaults`` first)."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.env") if p.stem != DEFAULTS)
    return [DEFAULTS, *names]


def read_preset(name: str) -> dict[str, tuple[str, bool]]:
    """Parse ``env/<name>.env`` into ``{key: (value, literal)}``; ``literal`` marks single quotes.

    Raises PresetError naming the file and line for an unknown preset or an unparsable line.
    """
    path = PRESET_DIR / f"{name}.env"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())} (files in {PRESET_DIR})")
    values: dict[str, tuple[str, bool]] = {}
    with path.open(encoding="utf-8") as stream:
        for binding in parse_stream(stream):
            if binding.error:
                line = binding.original.line
                text = binding.original.string.strip()
                raise PresetError(f"{path}:{line}: cannot parse {text!r}; expected KEY=value")
            if binding.key is None:
                continue  # comment or blank line
            raw = binding.original.string.split("=", 1)[1].strip() if "=" in binding.original.string else ""
            values[binding.key] = (binding.value or "", raw.startswith("'"))
    return values


def _interpolate(key: str, final: dict[str, str], raw: dict[str, str], literal: set[str], seen: frozenset[str]) -> str:
    text = raw[key]
    if key in literal or "${" not in text:
        return text

    def sub(match: re.Match[str]) -> str:
        name, fallback = match.group(1), match.group(2)
        if name in seen:
            raise PresetError(f"{key}: circular reference through ${{{name}}}")
        if name in raw:
            value = _interpolate(name, final, raw, literal, seen | {name})
        else:
            value = final.get(name, "")
        return value if value or fallback is None else fallback

    return _REF.sub(sub, text)


def layer(environ: Mapping[str, str], preset: str | None = None, force: bool = False) -> dict[str, Value]:
    """The effective value of every preset variable, in preset order, with provenance.

    ``environ`` is the shell environment (never modified).  Only variables that a preset names are
    returned; other shell variables are the caller's business.
    """
    layers = [(f"{DEFAULTS}.env", read_preset(DEFAULTS))]
    if preset and preset != DEFAULTS:
        layers.append((f"{preset}.env", read_preset(preset)))

    preset_value: dict[str, str] = {}
    preset_source: dict[str, str] = {}
    literal: set[str] = set()
    for source, values in layers:
        for key, (value, is_literal) in values.items():
            preset_value[key] = value
            preset_source[key] = source
            literal.discard(key)
            if is_literal:
                literal.add(key)

    raw: dict[str, str] = {}
    source: dict[str, str] = {}
    for key, value in preset_value.items():
        in_shell = key in environ
        shell_wins = in_shell and (not force or (key in SECRETS and environ[key] != ""))
        if shell_wins:
            raw[key], source[key] = environ[key], "shell"
        else:
            raw[key], source[key] = value, preset_source[key]

    # Shell values are final as given; preset values may refer to any final value.
    shell_keys = {k for k, s in source.items() if s == "shell"}
    final: dict[str, str] = {k: raw[k] for k in shell_keys}
    final.update({k: v for k, v in environ.items() if k not in raw})
    preset_raw = {k: v for k, v in raw.items() if k not in shell_keys}
    for key in preset_raw:
        final[key] = _interpolate(key, final, preset_raw, literal, frozenset({key}))

    result: dict[str, Value] = {}
    for key in preset_value:
        shadowed = None
        if source[key] == "shell":
            expected = _interpolate(key, final, {**preset_raw, key: preset_value[key]}, literal, frozenset({key}))
            if expected != final[key]:
                shadowed = expected
        result[key] = Value(key, final[key], source[key], shadowed)
    return result


def render_export(values: Mapping[str, Value], show_secrets: bool = False) -> str:
    """``export KEY='value'`` lines that bash and direnv read back exactly (secrets omitted unless asked)."""
    lines = []
    for key, item in values.items():
        if key in SECRETS and not show_secrets:
            continue
        lines.append(f"export {key}={shlex.quote(item.value) if item.value else chr(39) * 2}")
    return "\n".join(lines) + "\n"


def render_explain(values: Mapping[str, Value], show_secrets: bool = False) -> str:
    """One line per variable: value, source, and a warning where a shell value shadows a preset.

    Secrets that are set show as ``***`` unless ``show_secrets``.
    """
    width = max((len(k) for k in values), default=0)
    lines = []
    for key, item in values.items():
        masked = key in SECRETS and not show_secrets
        shown = "***" if masked and item.value else item.value
        line = f"{key:<{width}}  {shown!r:<40}  from {item.source}"
        if item.reason is not None:
            line += f" ({item.reason})"
        if item.shadowed is not None:
            hidden = "***" if masked and item.shadowed else repr(item.shadowed)
            line += f"  (shadows preset value {hidden}: the shell overrides it; `--force` restores it)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def with_layout(values: Mapping[str, Value], hardware: Hardware, shape: ModelShape | None) -> dict[str, Value]:
    """``values`` with every ``auto`` layout value replaced by its derived value (source ``auto``, a reason)."""
    derived = derive({key: item.value for key, item in values.items()}, hardware, shape)
    return {key: dataclasses.replace(item, value=derived[key][0], source="auto", reason=derived[key][1])
            if key in derived else item for key, item in values.items()}


def resolve_layout(values: Mapping[str, Value]) -> dict[str, Value]:
    """``with_layout`` for this host and the model in the layered MODEL_DIR (probes only when a value is auto)."""
    if not any(values[key].value.strip() == AUTO for key in LAYOUT_KEYS if key in values):
        return dict(values)
    model_dir = values["MODEL_DIR"].value.strip() if "MODEL_DIR" in values else ""
    shape = read_model_shape(resolve_path(model_dir)) if model_dir else None
    return with_layout(values, probe_hardware(), shape)


def layout_lines(values: Mapping[str, Value]) -> list[str]:
    """``KEY=value (auto: reason)`` for each derived value, or one line when every layout key was set."""
    return [f"{key}={item.value} (auto: {item.reason})" for key, item in values.items()
            if item.source == "auto"] or ["no auto values"]


def resolve_path(value: str) -> Path:
    """A path from a variable: relative paths are relative to the project root, not the cwd."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()
