"""Prometheus text exposition of a worker's counters, gauges and histograms (no client library)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPS_BUCKETS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


@dataclass
class Histogram:
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

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the ``q`` quantile (None without observations)."""
        if not self.n:
            return None
        rank, seen = q * self.n, 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            yield f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}'
        yield f"{name}_sum{{{labels}}} {self.total}" if labels else f"{name}_sum {self.total}"
        yield f"{name}_count{{{labels}}} {self.n}" if labels else f"{name}_count {self.n}"


@dataclass
class Metrics:
    processing_latency_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    end_to_end_latency_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    time_to_first_token_s: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    tokens_per_second: Histogram = field(default_factory=lambda: Histogram(TPS_BUCKETS))


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""

Series = tuple[str, float | int | dict[str, int] | dict[str, float], str]
"""``(help, value, label name)``; a dict value is one series per key under that label."""


def render(
    *, counters: dict[str, Series], gauges: dict[str, Series], histograms: dict[str, tuple[str, Histogram]]
) -> str:
    """The Prometheus text format of the given series."""
    out: list[str] = []
    for kind, series in (("counter", counters), ("gauge", gauges)):
        for name, (help_text, value, label) in series.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if isinstance(value, dict):
                out += [f'{name}{{{label}="{key}"}} {v}' for key, v in sorted(value.items())]
            else:
                out.append(f"{name} {value}")
    for name, (help_text, hist) in histograms.items():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
    return "\n".join(out) + "\n"
