"""Step 2 of ``inv run``: pick and describe the interpreter that installs and serves.

The project's ``.venv`` when it exists and no other environment is active, else the running interpreter.
Every later step runs with it (``interpreter_environ`` gives child processes its PATH and VIRTUAL_ENV).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_PROBE = """
import json, os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print(json.dumps({"executable": sys.executable, "version": sys.version.split()[0], "prefix": sys.prefix,
                  "base_prefix": sys.base_prefix, "conda": os.path.isdir(os.path.join(sys.prefix, "conda-meta")),
                  "marker": os.path.isfile(marker)}))
"""


@dataclass(frozen=True)
class Interpreter:
    """A Python interpreter as it describes itself."""

    executable: str
    version: str
    prefix: str
    base_prefix: str
    conda: bool
    marker: bool  # the PEP 668 EXTERNALLY-MANAGED file is in its stdlib directory

    @property
    def venv(self) -> bool:
        return self.prefix != self.base_prefix

    @property
    def externally_managed(self) -> bool:
        """pip's rule: the marker counts only outside a virtual environment."""
        return self.marker and not self.venv

    def kind(self) -> str:
        if self.venv:
            return f"venv at {self.prefix}"
        if self.conda:
            return f"conda env at {self.prefix}"
        managed = ", externally managed (PEP 668)" if self.externally_managed else ""
        return f"system interpreter, no venv or conda env{managed}"

    def describe(self) -> str:
        return f"{self.executable} (Python {self.version}, {self.kind()})"

    def same_as_running(self) -> bool:
        return (os.path.realpath(self.executable) == os.path.realpath(sys.executable)
                and os.path.realpath(self.prefix) == os.path.realpath(sys.prefix))


def probe(python: str | Path) -> Interpreter:
    """Ask ``python`` to describe itself (raises OSError or CalledProcessError when it cannot run)."""
    out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True).stdout
    return Interpreter(**json.loads(out))


def choose_interpreter(root: Path, current: Interpreter) -> tuple[Interpreter, str]:
    """The interpreter that installs and serves, and why: the project's ``.venv`` unless another env is active."""
    venv = root / ".venv"
    python = venv / "bin" / "python"
    if os.path.realpath(current.prefix) == os.path.realpath(venv):
        return current, "the project's .venv is the running interpreter"
    if not python.exists():
        return current, f"no project .venv at {venv}; using the running interpreter"
    if current.venv or current.conda:
        return current, (f"not switching to the project's .venv ({venv}): another environment is active "
                         f"({current.prefix}) and an explicitly activated environment wins; deactivate it to use .venv")
    try:
        chosen = probe(python)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return current, f"the project's .venv ({venv}) is broken ({exc}); using the running interpreter instead"
    return chosen, f"using the project's .venv instead of the running system interpreter {current.executable}"


def interpreter_environ(environ: Mapping[str, str], python: Interpreter) -> dict[str, str]:
    """``environ`` as if ``python``'s venv were activated (PATH, VIRTUAL_ENV), so child tools match it."""
    env = dict(environ)
    if python.venv and not python.same_as_running():
        env["VIRTUAL_ENV"] = python.prefix
        env["PATH"] = os.pathsep.join([str(Path(python.prefix) / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
    return env


__all__ = ["Interpreter", "choose_interpreter", "interpreter_environ", "probe"]
