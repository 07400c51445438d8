"""Fetch what the service serves: the main model and, for speculative decoding, a draft model.

Public API (the launcher, ``tasks.py``, calls it with the effective variables; nothing here reads
``os.environ``)::

    from downloader import download, DownloadError
    paths = download(values)   # [MODEL_DIR] or [MODEL_DIR, SPEC_DRAFT_MODEL_DIR], ready to serve

``DownloadError(message, exit_code)``: exit code 1 when the main model failed, 2 when a required
draft model failed.  ``message`` is one paragraph (model id, revision, what was tried, what to do).

A model lands in ``MODEL_DIR`` (relative paths resolve against the project root).  A directory is:

* complete: it holds the ``.download-complete`` marker written for this id and revision, and every
  file the marker lists is present with its size: nothing is fetched, no hub contact;
* local: no marker, but config.json, tokenizer files and weights are there (a model the user put in
  place): served as it is, no hub contact;
* anything else (missing, partial, another revision): fetched from the hub (``downloader.hub``) into
  ``.<name>.partial`` beside it (kept between runs so a rerun resumes), verified, marked, then
  renamed into place.  A directory is only replaced when it is ours (marker) or holds nothing but
  files of this snapshot, so a mistyped ``MODEL_DIR`` never deletes unrelated data.

``MODEL_ID=demo`` builds the offline demo model (``downloader.demo``) instead of downloading.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from downloader.hub import Hub, HubError, RemoteFile, normalize_endpoint
from downloader.snapshot import (
    MARKER,
    _lock,
    _replaceable,
    _swap,
    _write_marker,
    looks_complete,
    snapshot_state,
)
from downloader.tokenizers import check_draft_tokenizer

__all__ = ["MARKER", "DownloadError", "check_draft_tokenizer", "download", "looks_complete", "snapshot_state"]

STAMP = ".download-target"  # in the staging directory: which id@revision it holds
PROGRESS_INTERVAL = 1.0  # seconds between progress lines on a terminal
LOG_INTERVAL = 15.0  # seconds between progress lines off a terminal (docker build, CI, nohup: a log, not a screen)
log = logging.getLogger("download")


class DownloadError(Exception):
    """A model that could not be made ready; ``exit_code`` 1 for the main model, 2 for a required draft."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class _Request:
    """One model to make ready, with the variable names used in messages."""

    role: str  # "model" or "draft model"
    model_id: str
    revision: str
    target: Path
    id_var: str
    dir_var: str
    exit_code: int


# --- the public entry point ---------------------------------------------------------------------

def download(values: Mapping[str, str], *, progress: bool | None = None) -> list[Path]:
    """Make the main model (and a wanted draft model) ready; return the directories to serve.

    ``values`` are the effective variables (``env.layer``).  ``progress``: per-file progress lines, every
    PROGRESS_INTERVAL s (True), none (False), or by default every PROGRESS_INTERVAL s on a terminal and every
    LOG_INTERVAL s elsewhere (a log file, docker build, CI).  Raises DownloadError.
    """
    if progress is None:
        live: float | None = PROGRESS_INTERVAL if sys.stderr.isatty() else LOG_INTERVAL
    else:
        live = PROGRESS_INTERVAL if progress else None
    main = _request(values, "model", "MODEL_ID", "MODEL_REVISION", "MODEL_DIR", exit_code=1)
    fetcher = _Fetcher(values, live)
    try:
        paths = [fetcher.ensure(main)]
        draft = _draft_request(values, main)
        if draft is not None:
            optional = _flag(values, "SPEC_DRAFT_OPTIONAL", "1", exit_code=2)
            try:
                draft_path = fetcher.ensure(draft)
                problem = check_draft_tokenizer(paths[0], draft_path)
                if problem:
                    raise DownloadError(problem, 2)
                paths.append(draft_path)
            except DownloadError as exc:
                if not optional:
                    raise DownloadError(exc.message, 2) from exc
                log.warning("[download] %s SPEC_DRAFT_OPTIONAL=1: continuing without the draft model.", exc.message)
        return paths
    finally:
        fetcher.close()


def _flag(values: Mapping[str, str], key: str, default: str, exit_code: int) -> bool:
    """The switch ``key`` (env.values.parse_bool; empty is off), or DownloadError with ``exit_code``."""
    from env.values import parse_bool

    raw = (values.get(key, default) or "").strip().lower()
    if not raw:
        return False
    try:
        return parse_bool(raw)
    except ValueError:
        raise DownloadError(f"{key}={raw!r} is not a boolean: use 1 or 0 (true/false, yes/no, on/off).",
                            exit_code) from None


def _request(values: Mapping[str, str], role: str, id_var: str, rev_var: str, dir_var: str,
             exit_code: int) -> _Request:
    from env import resolve_path

    model_id = (values.get(id_var) or "").strip()
    if not model_id:
        raise DownloadError(f"{id_var} is empty: set it to a ModelScope model id (owner/name) or to demo "
                            "for the offline demo model.", exit_code)
    revision = (values.get(rev_var) or "").strip() or "master"
    target = resolve_path((values.get(dir_var) or "").strip() or f"./model/{model_id}")
    return _Request(role, model_id, revision, target, id_var, dir_var, exit_code)


def _draft_request(values: Mapping[str, str], main: _Request) -> _Request | None:
    if not _flag(values, "ENABLE_SPECULATIVE_DECODING", "0", exit_code=1):
        return None
    if not (values.get("SPEC_DRAFT_MODEL_ID") or "").strip():
        return None
    draft = _request(values, "draft model", "SPEC_DRAFT_MODEL_ID", "SPEC_DRAFT_MODEL_REVISION",
                     "SPEC_DRAFT_MODEL_DIR", exit_code=2)
    a, b = draft.target, main.target
    if a == b or a in b.parents or b in a.parents:
        raise DownloadError(f"SPEC_DRAFT_MODEL_DIR ({a}) overlaps MODEL_DIR ({b}): give the draft model its "
                            "own directory (default ./model/${SPEC_DRAFT_MODEL_ID}).", 2)
    return draft


# --- progress -----------------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class _Progress:
    """Bytes and files done; a line at most every ``live`` seconds (None: silent)."""

    def __init__(self, label: str, files: int, total: int, live: float | None):
        self.label, self.files, self.total, self.live = label, files, total, live
        self.done_files = 0
        self.finished_bytes = 0
        self.current = 0
        self.start = self.last = time.monotonic()

    def file(self, name: str) -> Callable[[int], None]:
        def position(n: int) -> None:
            self.current = n
            now = time.monotonic()
            if self.live is not None and now - self.last >= self.live:
                self.last = now
                self._line(name)
        return position

    def file_done(self, size: int) -> None:
        self.done_files += 1
        self.finished_bytes += size
        self.current = 0

    def _line(self, name: str) -> None:
        done = self.finished_bytes + self.current
        rate = done / max(time.monotonic() - self.start, 1e-6)
        log.info("[download] %s: %d/%d files, %s of %s (%s/s), %s", self.label, self.done_files, self.files,
                 _size(done), _size(self.total), _size(rate), name)


# --- fetching -----------------------------------------------------------------------------------

class _Fetcher:
    """Makes requests ready; one hub session (logged in once) shared by the main and draft model."""

    def __init__(self, values: Mapping[str, str], live: float | None):
        self.endpoint = normalize_endpoint(values.get("MODELSCOPE_ENDPOINT") or values.get("MODELSCOPE_DOMAIN"))
        self._token = (values.get("MODELSCOPE_API_TOKEN") or "").strip()
        self._live = live
        self._hub: Hub | None = None

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()

    def hub(self) -> Hub:
        if self._hub is None:
            # No login round trip: like modelscope's own client, the token goes with every request.
            self._hub = Hub(self.endpoint, self._token)
        return self._hub

    def ensure(self, req: _Request) -> Path:
        from downloader.demo import DEMO_MODEL_ID

        label = f"{req.model_id}@{req.revision}"
        is_demo = req.model_id == DEMO_MODEL_ID
        revision = _demo_fingerprint() if is_demo else req.revision
        state = snapshot_state(req.target, req.model_id, revision)
        if state == "complete":
            log.info("[download] %s %s is complete in %s (skipped)", req.role, label, req.target)
            return req.target
        if state == "local" and not is_demo:
            log.info("[download] %s: using the local model in %s (%s; not fetched from the hub)",
                     req.role, req.target, req.dir_var)
            return req.target
        started = time.monotonic()
        try:
            with _lock(req.target):
                if snapshot_state(req.target, req.model_id, revision) == "complete":
                    return req.target  # another process finished it while we waited
                if is_demo:
                    return self._build_demo(req, revision)
                return self._fetch(req, label)
        except HubError as exc:
            raise DownloadError(self._hub_message(req, exc, time.monotonic() - started), req.exit_code) from exc
        except OSError as exc:
            where = exc.filename or req.target
            raise DownloadError(f"Cannot write the {req.role} {label} into {req.target}: {exc.strerror or exc} "
                                f"({where}). Check free space and permissions, or set {req.dir_var} to a "
                                "writable directory.", req.exit_code) from exc

    def _build_demo(self, req: _Request, fingerprint: str) -> Path:
        from downloader.demo import DEMO_FILES, build_demo_model

        problem = _replaceable(req.target, {*DEMO_FILES, MARKER})
        if problem:
            raise DownloadError(f"Cannot build the demo model into {req.target}: {problem}. Point {req.dir_var} "
                                "at a new or empty directory (default ./model/demo).", req.exit_code)
        staging = req.target.with_name(f".{req.target.name}.partial")
        if staging.exists():
            shutil.rmtree(staging)
        build_demo_model(staging)
        _write_marker(staging, req.model_id, fingerprint, "downloader.demo")
        _swap(staging, req.target)
        log.info("[download] demo model ready in %s", req.target)
        return req.target

    def _fetch(self, req: _Request, label: str) -> Path:
        hub = self.hub()
        files = hub.list_files(req.model_id, req.revision)
        problem = _replaceable(req.target, {f.path.split("/")[0] for f in files} | {MARKER})
        if problem:
            raise DownloadError(
                f"Cannot download the {req.role} {label} into {req.target}: {problem}, and it is not a complete "
                f"model (missing {looks_complete(req.target)}). Point {req.dir_var} at a new or empty directory, "
                "or at a complete local model.", req.exit_code)
        if req.target.exists():
            log.warning("[download] %s holds an incomplete or different snapshot; replacing it with %s",
                        req.target, label)
        staging = _staging(req)
        total = sum(f.size or 0 for f in files)
        _check_space(staging, files, req)
        log.info("[download] fetching %s %s from %s into %s (%d files, %s)", req.role, label, self.endpoint,
                 req.target, len(files), _size(total))
        progress = _Progress(label, len(files), total, self._live)
        started = time.monotonic()
        for remote in files:
            dest = staging.joinpath(*remote.path.split("/"))
            _adopt(req.target.joinpath(*remote.path.split("/")), dest, remote)
            if not (dest.is_file() and _same(dest, remote)):
                hub.fetch(req.model_id, req.revision, remote, dest, progress.file(remote.path))
            progress.file_done(dest.stat().st_size)
        (staging / STAMP).unlink()
        _write_marker(staging, req.model_id, req.revision, self.endpoint)
        _swap(staging, req.target)
        seconds = time.monotonic() - started
        log.info("[download] %s %s ready in %s (%s in %.1f s)", req.role, label, req.target, _size(total), seconds)
        return req.target

    def _hub_message(self, req: _Request, exc: HubError, seconds: float) -> str:
        label = f"{req.role} {req.model_id!r} (revision {req.revision!r})"
        tried = f"{exc.url} " if exc.url else ""
        if exc.status in (401, 403):
            hint = ("The hub refused access: check that MODELSCOPE_API_TOKEN is valid and may read this model."
                    if self._token else
                    "The hub refused access: the model may be private; set MODELSCOPE_API_TOKEN to a token that "
                    "may read it.")
        elif exc.status == 404:
            hint = f"Check {req.id_var} and the revision: the hub does not know this model or revision."
        elif exc.status is None and exc.retryable:
            hint = "The hub is unreachable from here: check the network, proxy (HTTPS_PROXY) and MODELSCOPE_ENDPOINT."
        else:
            hint = f"Check {req.id_var} and the revision, and MODELSCOPE_ENDPOINT; or retry later."
        remedy = (f"To run without the hub, set {req.dir_var} to a directory holding a complete local model "
                  "(config.json, tokenizer files, *.safetensors or *.bin weights), or SKIP_MODEL_DOWNLOAD=1 if the "
                  "model is already in place, or MODEL_ID=demo for the offline demo model.")
        if req.exit_code == 2:
            remedy += (" For the draft model, SPEC_DRAFT_OPTIONAL=1 continues without it and "
                       "ENABLE_SPECULATIVE_DECODING=0 turns speculation off.")
        message = (f"Cannot download the {label} from the ModelScope hub at {self.endpoint}: {exc.reason} "
                   f"(tried {tried}for {seconds:.1f} s). {hint} {remedy}")
        return message.replace(self._token, "***") if self._token else message


def _staging(req: _Request) -> Path:
    """``.<name>.partial`` beside the target, kept across runs of the same id and revision."""
    staging = req.target.with_name(f".{req.target.name}.partial")
    stamp = staging / STAMP
    wanted = f"{req.model_id}@{req.revision}\n"
    if staging.exists() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != wanted):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted, encoding="utf-8")
    return staging


def _adopt(old: Path, dest: Path, remote: RemoteFile) -> None:
    """Move a verified file of the partial snapshot being replaced into staging (no refetch)."""
    if not dest.exists() and old.is_file() and not old.is_symlink() and _same(old, remote):
        dest.parent.mkdir(parents=True, exist_ok=True)
        old.replace(dest)


def _check_space(staging: Path, files: list[RemoteFile], req: _Request) -> None:
    needed = sum((f.size or 0) for f in files if not (staging / f.path).is_file())
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise DownloadError(f"Not enough disk space for the {req.role} {req.model_id!r}: {_size(needed)} needed, "
                            f"{_size(free)} free under {staging.parent}. Free space or set {req.dir_var} "
                            "to another disk.", req.exit_code)


def _same(path: Path, remote: RemoteFile) -> bool:
    """A file already in the staging directory that matches the listing (size, then sha256)."""
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    if not remote.sha256:
        return remote.size is not None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == remote.sha256.lower()


def _demo_fingerprint() -> str:
    """The demo model's "revision": a hash of the builder's source, so a changed builder rebuilds."""
    source = Path(__file__).with_name("demo.py").read_bytes()
    return "demo-" + hashlib.sha256(source).hexdigest()[:16]
