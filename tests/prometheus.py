"""A worker's HTTP pages in tests: GET, and the Prometheus text format parsed strictly."""

from __future__ import annotations

import re
from urllib.error import HTTPError
from urllib.request import urlopen

from chunkfold.metrics import METRICS_CONTENT_TYPE


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of ``GET http://127.0.0.1:port/path``."""
    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
"""Metric name -> label set (sorted pairs) -> value."""

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[Samples, dict[str, str]]:
    """The samples and the ``# TYPE`` of each family; every line must parse."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = tuple(sorted(LABEL.findall(labels or "")))
        samples.setdefault(name, {})[pairs] = float(value)
    return samples, types


def scrape(port: int) -> Samples:
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200, body
    assert content_type == METRICS_CONTENT_TYPE
    samples, _ = parse_metrics(body)
    return samples


def value(samples: Samples, name: str) -> float:
    series = samples.get(name, {})
    assert () in series, f"{name} not served: {sorted(samples)}"
    return series[()]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(pairs)[label]: v for pairs, v in samples.get(name, {}).items()}
