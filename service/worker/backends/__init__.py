"""Backends (vLLM, transformers) behind one protocol (``base``), and the choice between them.

``USE_VLLM=true`` means vLLM or a start-up error that says why; ``false`` means the transformers
backend; ``auto`` tries vLLM and, when it cannot be imported, uses transformers and says so in the log,
``GET /info`` and health (explicit, never a silent fallback).  The backends import ``base``; only
``build_engine`` here imports them, so there is no import circle.
"""

from __future__ import annotations

import logging

from service.contract.errors import EngineUnavailable
from service.settings import Settings
from service.worker.backends.base import Engine

log = logging.getLogger("service")


def build_engine(settings: Settings) -> Engine:
    """The backend USE_VLLM asks for (not started yet); see ``Engine.check``."""
    backend = settings.backend
    if backend in ("vllm", "auto"):
        from service.worker.backends.vllm_engine import VllmEngine

        engine: Engine = VllmEngine(settings)
        if backend == "vllm":
            return engine
        try:
            engine.check()
        except EngineUnavailable as exc:
            from service.worker.backends.hf_engine import TransformersEngine

            fallback = TransformersEngine(settings)
            fallback.notice = f"USE_VLLM=auto: vLLM unavailable ({exc}); serving with transformers (slow)"
            log.warning("%s", fallback.notice)
            return fallback
        return engine
    from service.worker.backends.hf_engine import TransformersEngine

    return TransformersEngine(settings)
