"""A model directory on disk: is it complete, whose is it (the marker), and replacing it safely."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("download")

MARKER = ".download-complete"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def looks_complete(path: Path) -> str | None:
    """None when ``path`` holds config.json, tokenizer files and weights; else what is missing."""
    if not path.is_dir():
        return "the directory"
    if not (path / "config.json").is_file():
        return "config.json"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return "tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"a readable {index}"
            missing = sorted(s for s in shards if not (path / s).is_file())
            return f"weight shards {', '.join(missing)}" if missing else None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return "weights (*.safetensors or *.bin)"
    return None


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def snapshot_state(path: Path, model_id: str, revision: str) -> str:
    """``complete``, ``local``, ``missing``, or ``incomplete`` (partial, or another id/revision)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "missing"
    marker = _read_marker(path)
    if marker is None:
        return "local" if looks_complete(path) is None else "incomplete"
    if marker.get("model_id") != model_id or marker.get("revision") != revision:
        return "incomplete"
    files = marker.get("files")
    if not isinstance(files, dict):
        return "incomplete"
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return "incomplete"
    return "complete"


def _write_marker(path: Path, model_id: str, revision: str, source: str) -> None:
    files = {
        p.relative_to(path).as_posix(): p.stat().st_size
        for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER
    }
    data = {"model_id": model_id, "revision": revision, "source": source, "files": files}
    (path / MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replaceable(path: Path, allowed: set[str]) -> str | None:
    """None when ``path`` may be replaced: ours (marker), or only files named in ``allowed``."""
    if not path.exists() or _read_marker(path) is not None:
        return None
    if not path.is_dir():
        return f"{path} is not a directory"
    strangers = sorted(p.name for p in path.iterdir() if p.name not in allowed and not p.name.endswith(".part"))
    return f"{path} holds files that are not part of this model (e.g. {strangers[0]!r})" if strangers else None


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` in place of ``target`` (renames on one filesystem; the old one is deleted)."""
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    if target.exists() or target.is_symlink():
        target.rename(old)
    staging.rename(target)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    """One download per target at a time (another launcher waits, then finds it complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("[download] waiting for another download into %s", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
