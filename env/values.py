"""The project's one true/false parser, for every variable that is a switch.

Both the launcher (``env``, ``downloader``) and the service (``service.settings``) import it; it imports
nothing.  The spellings are case-insensitive and surrounding spaces are ignored:

=====  =========================
true   ``1``, ``true``, ``yes``, ``on``
false  ``0``, ``false``, ``no``, ``off``
=====  =========================

``parse_bool`` is strict (anything else raises ValueError naming what is allowed): the settings and the
downloader use it, so a typo stops start-up instead of being read as "off".  ``is_on`` is lenient: only a
true spelling counts, anything else (empty, a typo) is off; the launcher's own switches
(``SKIP_PIP_INSTALL``, ``SKIP_MODEL_DOWNLOAD``, ``ALLOW_SYSTEM_PIP``) use it, where "off" is the safe side.
"""

from __future__ import annotations

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
ALLOWED = "allowed: 1/0, true/false, yes/no, on/off"


def parse_bool(text: str) -> bool:
    """``True`` or ``False`` for one of the spellings above; ValueError(ALLOWED) for anything else (empty too)."""
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError(ALLOWED)


def is_on(text: str) -> bool:
    """``True`` only for a true spelling; every other text, empty or unknown, is off (never raises)."""
    return text.strip().lower() in TRUE


__all__ = ["ALLOWED", "FALSE", "TRUE", "is_on", "parse_bool"]
