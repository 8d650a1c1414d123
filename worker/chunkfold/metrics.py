"""A worker's Prometheus metrics: its histograms, and the exposition on prometheus-client.

Counting stays on the hot path's own terms: counters are plain integers the processor keeps
(``Stats``) and a histogram observation is one ``bisect`` into fixed buckets. prometheus-client
reads them only when ``/metrics`` is scraped, through a collector that turns them into metric
families (so no per-record lock or label lookup is added). Each ``Processor`` has its own
registry (``worker_registry``), with the standard ``process_*`` and ``python_gc_*`` series.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPS_BUCKETS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The Prometheus text exposition format, version 0.0.4."""


@dataclass
class Histogram:
    """Observations counted into fixed upper bounds (the last bucket is ``+Inf``)."""

    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class Metrics:
    processing_latency_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    end_to_end_latency_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    time_to_first_token_s: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    tokens_per_second: Histogram = field(default_factory=lambda: Histogram(TPS_BUCKETS))


def counter(name: str, help_text: str, value: float | dict[str, int], label: str = "") -> Metric:
    """A counter family ``name`` (which ends in ``_total``); a dict ``value`` is one series per
    key under ``label``."""
    return _family(CounterMetricFamily, name, help_text, value, label)


def gauge(name: str, help_text: str, value: float | dict[str, int], label: str = "") -> Metric:
    """A gauge family; a dict ``value`` is one series per key under ``label``."""
    return _family(GaugeMetricFamily, name, help_text, value, label)


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    help_text: str,
    value: float | dict[str, int],
    label: str,
) -> Metric:
    if not isinstance(value, dict):
        return kind(name, help_text, value=value)
    family = kind(name, help_text, labels=[label])
    for key, v in sorted(value.items()):
        family.add_metric([key], v)
    return family


def histogram(name: str, help_text: str, hist: Histogram) -> Metric:
    """A histogram family of ``hist``'s cumulative bucket counts."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=hist.total)


class Families:
    """A collector whose families are built by ``collect`` at each scrape."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self.build = build

    def collect(self) -> Iterable[Metric]:
        return self.build()


def worker_registry() -> CollectorRegistry:
    """A registry of one worker's series, with the process and garbage-collector series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's series in the text format of ``METRICS_CONTENT_TYPE``."""
    return generate_latest(registry)
