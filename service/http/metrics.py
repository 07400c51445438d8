"""Prometheus metrics for ``/metrics``, in a registry owned by one app (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.contract.wire import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        s = self.stats()
        gauges = [
            ("qa_in_flight_questions", "Questions submitted to the engine and not finished.", s.in_flight),
            ("qa_in_flight_questions_peak", "Most questions in flight at once since start.", s.peak_in_flight),
        ]
        if s.has_scheduler:  # the engine's own counts: vLLM with ENGINE_STATS=1
            gauges += [
                ("qa_engine_running_sequences", "Sequences the engine's scheduler is running.", s.running),
                ("qa_engine_running_sequences_peak", "Most sequences the scheduler ran at once.", s.peak_running),
                ("qa_engine_waiting_sequences", "Sequences waiting in the engine's scheduler.", s.waiting),
            ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        if s.has_scheduler:
            yield CounterMetricFamily("qa_engine_generated_tokens", "Tokens the engine generated, step by step "
                                      "(aborted questions included).", value=s.generated)


class Metrics:
    """Counters and histograms of one app."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("qa_requests", "HTTP requests by path and status.", ["path", "status"], registry=r)
        self.questions = Counter("qa_questions", "Questions answered (errors included).", registry=r)
        self.item_errors = Counter("qa_item_errors", "Questions that could not be answered.", registry=r)
        self.tokens = Counter("qa_generated_tokens", "Tokens generated, by route.", ["route"], registry=r)
        self.batch = Histogram("qa_batch_size", "Questions per /predict request.", registry=r,
                               buckets=(1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384, 65536))
        self.latency = Histogram("qa_predict_seconds", "Time to answer a /predict request.", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.ready = Gauge("qa_ready", "1 when the service can answer.", registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
