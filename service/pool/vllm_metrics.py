"""vLLM's own Prometheus metrics (``vllm:*``) from the engine workers, in the API process's ``/metrics``.

Each engine worker computes vLLM's metrics in its own process (its ``PrometheusStatLogger``, with
``ENGINE_STATS=1``; ``ENGINE_STATS=0`` keeps them off).  ``prepare`` gives every worker a directory of its own
as ``PROMETHEUS_MULTIPROC_DIR`` (Prometheus's multiprocess mode, as vLLM's own API server uses it), so its
values go to memory-mapped files there; ``VllmCollector`` reads each worker's directory with
``prometheus_client``'s ``MultiProcessCollector`` and adds a ``worker`` label (1, 2, ...), so that several
workers do not collapse into one series.  The API process itself stays out of multiprocess mode (its own
metrics live in memory).  The directories are removed when the API process exits; a restarted worker keeps
its slot's directory, so its counters carry on from its predecessor's.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("service")
VAR = "PROMETHEUS_MULTIPROC_DIR"


def prepare(workers: list[Any], enabled: bool) -> None:
    """Give each worker (a ``ProcessEngineClient``, before it is spawned) a metrics directory of its own."""
    if not enabled:
        return
    base = Path(tempfile.mkdtemp(prefix="qa-vllm-metrics-"))
    atexit.register(shutil.rmtree, base, True)
    for index, worker in enumerate(workers, 1):
        path = base / str(index)
        path.mkdir()
        worker.environ[VAR] = str(path)


class VllmCollector(Collector):
    """Every worker's ``vllm:*`` metrics, labelled ``worker="N"``."""

    def __init__(self, workers: list[Any]):
        self.dirs = [(str(i), Path(w.environ[VAR])) for i, w in enumerate(workers, 1) if VAR in w.environ]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        merged: dict[str, Metric] = {}
        for label, path in self.dirs:
            if not path.is_dir():
                continue
            try:
                families = list(MultiProcessCollector(None, path=str(path)).collect())
            except Exception as exc:  # a file being written or removed: skip this scrape, never fail /metrics
                log.debug("vLLM metrics of worker %s unreadable this time: %s", label, exc)
                continue
            for family in families:
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.samples.append(Sample(s.name, {**s.labels, "worker": label}, s.value, s.timestamp,
                                              s.exemplar))
        yield from merged.values()
