"""Step 3 of ``inv run``: check that the port is free, naming the process that holds it.

It runs before any slow step, and again just before the exec (the slow steps may have taken minutes).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from env.steps.errors import EXIT_INVALID, EXIT_PORT, LaunchError


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
    """``text`` as a port number (1-65535), or LaunchError (exit 2) naming ``source`` (PORT or --port)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise LaunchError(f"{source}={text!r} is not a port number: use an integer from 1 to 65535", EXIT_INVALID)
    return port


__all__ = ["check_port", "listening_pids", "parse_port"]
