"""The HTTP side the measurement tools share: one JSON request helper and the token counter."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

_TOKENS_SAMPLE = re.compile(r"^qa_generated_tokens_total(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


class Unreachable(ConnectionError):
    """The service could not be reached; the message names the request and the reason."""


def request(method: str, url: str, body: Any = None, timeout: float = 3600,
            timings: dict[str, float] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text); Unreachable when nothing answers.

    ``timings``, when given, receives the client's own JSON work (``encode_s``, ``decode_s``) and the wait
    for the service (``wait_s``: from sending the request to the last byte of the response).
    """
    started = time.perf_counter()
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"{method} {url}: cannot reach the service ({getattr(exc, 'reason', exc)})") from None
    received = time.perf_counter()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
    finally:
        if timings is not None:
            timings.update(encode_s=sent - started, wait_s=received - sent, decode_s=time.perf_counter() - received,
                           response_bytes=len(raw))


def generated_tokens(metrics_text: str) -> float:
    """Sum of every ``qa_generated_tokens_total`` sample (all ``route`` labels) in Prometheus text."""
    return sum(float(value) for value in _TOKENS_SAMPLE.findall(metrics_text))
