"""A small ModelScope hub client: file listing and resumable, verified file downloads.

Why not ``modelscope.snapshot_download``: the installed client (modelscope 1.40 delegating to
``modelscope_hub``) probes site and cloud region before it downloads, retries 5 times with 60-90 s
socket timeouts, and persists credentials under ``~/.modelscope``.  Its worst case against a dead hub
is minutes, and it is hard to point at a loopback test server.  This module speaks the same REST
paths that client uses (tests/test_downloader.py runs ``modelscope.snapshot_download`` against the same fake
hub and compares the trees), with ``requests`` and hard bounds; like that client, it sends the token with
every request and makes no login request:

* ``GET {endpoint}/api/v1/models/{model_id}/repo/files?Revision=R&Recursive=True``
  -> ``{"Data": {"Files": [{"Path", "Type", "Size", "Sha256"}, ...]}}``;
* ``GET {endpoint}/api/v1/models/{model_id}/repo?Revision=R&FilePath=P`` -> the bytes (maybe via a
  redirect to object storage; ``Range`` is used to resume a partial file).

The endpoint is ``MODELSCOPE_ENDPOINT`` (default ``https://www.modelscope.cn``); a bare host such as
``127.0.0.1:8080`` gets ``https://``.  A token is sent as ``Authorization: Bearer`` and the
``m_session_id`` cookie (what modelscope sends), to the endpoint's host only: redirects are followed
by hand and credentials are dropped when the host changes.

Failure bounds: connect timeout 5 s, read timeout 20 s, at most 4 attempts per request (counted
from the last attempt that moved bytes; 12 in all), backoff 0.5, 1, 2 s, and no new attempt once
failures without progress could pass 60 s.  Connection refused fails in about 4 s.  Only connection
errors, timeouts, broken or short transfers, HTTP 5xx and 429 are retried.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import quote, urljoin, urlsplit

import requests

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 20.0
ATTEMPTS = 4  # per request, counted from the last attempt that moved bytes
MAX_ATTEMPTS = 12  # per request in all, however much progress each attempt made
BACKOFF = 0.5  # seconds before the second attempt; doubles after each failure
FAILURE_BUDGET = 60.0
CHUNK = 1 << 18
MAX_REDIRECTS = 5

log = logging.getLogger("download")


class HubError(Exception):
    """A hub request that failed for good; ``reason`` is one short human sentence fragment."""

    def __init__(self, reason: str, *, url: str = "", status: int | None = None, retryable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.url = url
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class RemoteFile:
    """One file of a snapshot as the hub lists it."""

    path: str
    size: int | None
    sha256: str | None


def normalize_endpoint(value: str | None) -> str:
    """``value`` as a base URL without trailing slash (``https://`` added to a bare host)."""
    value = (value or "").strip().rstrip("/")
    if not value:
        return DEFAULT_ENDPOINT
    if not value.startswith(("http://", "https://")):
        value = "https://" + value
    return value


def safe_relpath(path: str) -> PurePosixPath:
    """A listed path as a relative path that cannot leave the snapshot directory."""
    rel = PurePosixPath(path.lstrip("/"))
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise HubError(f"the hub listed an unsafe file path {path!r}")
    return rel


class Hub:
    """A session against one endpoint, optionally with a token."""

    def __init__(self, endpoint: str, token: str = ""):
        self.endpoint = normalize_endpoint(endpoint)
        self._host = urlsplit(self.endpoint).netloc
        self._token = token
        self._timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": "qa-service-downloader/1", "Accept-Encoding": "identity"})
        self._progressed = False
        if token:
            # What modelscope sends to its legacy /api/v1 endpoints; the jar scopes it to this host.
            self._session.cookies.set("m_session_id", token, domain=urlsplit(self.endpoint).hostname or "", path="/")

    def close(self) -> None:
        self._session.close()

    # --- requests ------------------------------------------------------------------------------
    def _auth(self, url: str) -> dict[str, str]:
        if not self._token or urlsplit(url).netloc != self._host:
            return {}
        return {"Authorization": f"Bearer {self._token}"}

    def _send(self, method: str, url: str, *, headers: dict[str, str] | None = None,
              json: object = None, stream: bool = False) -> requests.Response:
        """One request, following redirects by hand (credentials stay with the endpoint's host)."""
        for _ in range(MAX_REDIRECTS + 1):
            all_headers = {**(headers or {}), **self._auth(url)}
            try:
                resp = self._session.request(method, url, headers=all_headers, json=json, stream=stream,
                                             timeout=self._timeout, allow_redirects=False)
            except requests.exceptions.ConnectionError as exc:
                raise HubError(_connection_reason(exc), url=url, retryable=True) from exc
            except requests.exceptions.Timeout as exc:
                raise HubError(f"no answer within {self._timeout[1]:.0f} s (timeout)", url=url, retryable=True) from exc
            except requests.exceptions.RequestException as exc:
                raise HubError(f"request failed: {exc.__class__.__name__}", url=url) from exc
            if resp.is_redirect and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                resp.close()
                if resp.status_code == 303:
                    method, json = "GET", None
                continue
            if resp.status_code >= 400:
                status = resp.status_code
                resp.close()
                raise HubError(f"HTTP {status} {resp.reason or ''}".strip(), url=url, status=status,
                               retryable=status >= 500 or status == 429)
            return resp
        raise HubError(f"more than {MAX_REDIRECTS} redirects", url=url)

    def _retrying(self, what: str, op: Callable[[], T]) -> T:
        """Run ``op`` with bounded retries of retryable HubErrors.

        An attempt that moved bytes (``self._progressed``) restarts the count, so a long download
        survives several drops, while failures without progress stop within ``FAILURE_BUDGET``.
        """
        attempt = total = 0
        window_start = time.monotonic()
        while True:
            attempt += 1
            total += 1
            self._progressed = False
            try:
                return op()
            except HubError as exc:
                if self._progressed:
                    attempt, window_start = 1, time.monotonic()
                delay = BACKOFF * 2 ** (attempt - 1)
                worst_next = time.monotonic() - window_start + delay + sum(self._timeout)
                if not exc.retryable or attempt >= ATTEMPTS or total >= MAX_ATTEMPTS or worst_next > FAILURE_BUDGET:
                    raise
                log.debug("[download] %s: %s; retrying in %.1f s", what, exc.reason, delay)
                time.sleep(delay)

    # --- API -----------------------------------------------------------------------------------
    def list_files(self, model_id: str, revision: str) -> list[RemoteFile]:
        """The files (not directories) of ``model_id`` at ``revision``."""
        url = (f"{self.endpoint}/api/v1/models/{quote(model_id, safe='/')}/repo/files"
               f"?Revision={quote(revision, safe='')}&Recursive=True")

        def op() -> list[RemoteFile]:
            resp = self._send("GET", url)
            try:
                body = resp.json()
            except ValueError as exc:
                raise HubError("the file list is not JSON", url=url) from exc
            finally:
                resp.close()
            return _parse_listing(body, url)

        return self._retrying("file list", op)

    def file_url(self, model_id: str, revision: str, path: str) -> str:
        return (f"{self.endpoint}/api/v1/models/{quote(model_id, safe='/')}/repo"
                f"?Revision={quote(revision, safe='')}&FilePath={quote(path, safe='')}")

    def fetch(self, model_id: str, revision: str, remote: RemoteFile, dest: Path,
              on_position: Callable[[int], None]) -> None:
        """Download ``remote`` to ``dest`` (through ``dest.part``, resumed with Range), verified by
        size and sha256 when the listing gives them.  ``on_position`` gets the bytes held so far."""
        url = self.file_url(model_id, revision, remote.path)
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)

        def op() -> None:
            have = part.stat().st_size if part.exists() else 0
            if have and remote.size is not None and have >= remote.size:
                if have == remote.size and _matches(part, remote):
                    part.replace(dest)  # a finished file whose rename was interrupted
                    on_position(have)
                    return
                part.unlink()
                have = 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                resp = self._send("GET", url, headers=headers, stream=True)
            except HubError as exc:
                if have and exc.status == 416:  # the partial file is not a prefix of this one
                    part.unlink()
                    exc.retryable = True
                raise
            with _closing(resp):
                if have and (resp.status_code != 206 or _range_start(resp) != have):
                    have = 0  # the server ignored the Range: start over
                on_position(have)
                with part.open("ab" if have else "wb") as out:
                    try:
                        for chunk in resp.iter_content(CHUNK):
                            out.write(chunk)
                            have += len(chunk)
                            self._progressed = True
                            on_position(have)
                    except requests.exceptions.RequestException as exc:
                        raise HubError(f"the connection broke while reading {remote.path}", url=url,
                                       retryable=True) from exc
            try:
                _verify(part, remote, url)
            except HubError:
                self._progressed = part.exists()  # bytes thrown away are no progress
                raise
            part.replace(dest)

        self._retrying(remote.path, op)


@contextmanager
def _closing(resp: requests.Response) -> Iterator[requests.Response]:
    try:
        yield resp
    finally:
        resp.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, remote: RemoteFile) -> bool:
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    return not remote.sha256 or _sha256(path) == remote.sha256.lower()


def _range_start(resp: requests.Response) -> int | None:
    """The first byte of a 206 answer (``Content-Range: bytes START-END/TOTAL``)."""
    value = resp.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _verify(part: Path, remote: RemoteFile, url: str) -> None:
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        if size > remote.size:
            part.unlink()
        raise HubError(f"{remote.path} ended after {size} of {remote.size} bytes", url=url, retryable=True)
    if remote.sha256 and _sha256(part) != remote.sha256.lower():
        part.unlink()
        raise HubError(f"{remote.path} does not match its sha256", url=url, retryable=True)


def _parse_listing(body: object, url: str) -> list[RemoteFile]:
    if not isinstance(body, dict):
        raise HubError("unexpected file list format", url=url)
    if body.get("Success") is False or (isinstance(body.get("Code"), int) and body["Code"] not in (0, 200)):
        message = str(body.get("Message") or body.get("message") or "request refused")
        raise HubError(f"the hub answered: {message}", url=url)
    data = body.get("Data", body)
    entries = (data.get("Files") or data.get("files") or []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise HubError("unexpected file list format", url=url)
    files = []
    for entry in entries:
        if not isinstance(entry, dict) or (entry.get("Type") or entry.get("type") or "blob") == "tree":
            continue
        path = entry.get("Path") or entry.get("path") or entry.get("Name") or ""
        if not path:
            continue
        size = entry.get("Size", entry.get("size"))
        sha = entry.get("Sha256") or entry.get("sha256") or None
        files.append(RemoteFile(str(safe_relpath(str(path))), int(size) if size is not None else None,
                                str(sha) if sha else None))
    if not files:
        raise HubError("the hub lists no files for this revision", url=url)
    return files


def _connection_reason(exc: requests.exceptions.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "Temporary failure in name resolution" in text \
            or "nodename nor servname" in text or "NameResolutionError" in text:
        return "host name not resolved (no DNS / offline)"
    if "Network is unreachable" in text:
        return "network unreachable"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if "SSL" in text:
        return "TLS handshake failed"
    return "connection failed"
