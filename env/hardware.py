"""The one hardware probe: the NVIDIA GPUs ``nvidia-smi`` lists and the CPU cores this process may use.

Used by the layout (``env.layout``), the launcher's install target (``env.steps.install``), ``noxfile.py`` and
``inv tune``.  Imports nothing of the project (the noxfile loads it by path, before any dependency is installed).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    """What the layout depends on: the GPUs (all alike), the memory of one, and this process's CPU cores."""

    gpus: int
    gpu_name: str
    gpu_memory_bytes: int  # of one GPU; 0 when none
    cpu_cores: int


@functools.cache
def probe_hardware() -> Hardware:
    """The NVIDIA GPUs from ``nvidia-smi`` (absent or failing: none) and the usable CPU cores; once per process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    none = Hardware(0, "", 0, cores)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return none
    try:
        done = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
        rows = [line.rsplit(",", 1) for line in done.stdout.splitlines() if line.strip()]
        gpus = [(name.strip(), int(float(mib)) * 2**20) for name, mib in rows]
    except (OSError, subprocess.SubprocessError, ValueError):
        return none
    if done.returncode != 0 or not gpus:
        return none
    return Hardware(len(gpus), gpus[0][0], gpus[0][1], cores)


def nvidia_gpu() -> str | None:
    """Why this host has an NVIDIA GPU (``/dev/nvidia0`` exists, or ``nvidia-smi`` lists one); None: it has none."""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0 exists"
    hardware = probe_hardware()
    return f"nvidia-smi lists {hardware.gpus} GPU(s)" if hardware.gpus else None
