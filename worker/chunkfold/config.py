"""Settings shared by every command: topic names, partitions, timeouts, limits.

Each setting reads ``CHUNKFOLD_<NAME>`` from the environment; CLI flags override it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any


def _env(name: str, default: Any) -> Any:
    raw = os.environ.get(f"CHUNKFOLD_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    bootstrap_servers: str = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    app_id: str = "chunkfold"
    driver: str = "direct"
    processing_guarantee: str = "at_least_once"
    """``at_least_once`` (idempotent, de-duplicable outputs) or ``exactly_once`` (direct driver:
    Kafka transactions; consumers read with ``isolation.level=read_committed``)."""
    input_topic: str = "completion-chunks"
    events_topic: str = "completion-events"
    done_topic: str = "completion-done"
    deadletter_topic: str = "completion-deadletter"
    partitions: int = 8
    replication_factor: int = 1
    idle_timeout_s: float = 600.0
    tombstone_s: float = 600.0
    commit_interval_s: float = 1.0
    max_record_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 20
    """The largest output record: topics chunkfold creates get this ``max.message.bytes``; an
    existing output topic with a lower limit lowers it for that topic. Larger values are cut to
    fit (the size policy, ``chunkfold.core.fit``)."""
    max_clock_skew_s: float = 10.0
    """How far ahead of this worker's clock a record timestamp may move stream time."""
    store: str = "memory://"
    data_dir: str = ".cache/chunkfold-data"
    snapshots: bool = False
    partial_parse: bool = False
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    """The address the metrics and health server listens on (both drivers). Loopback by
    default, so a worker run on a host shares nothing; the container image sets ``0.0.0.0``,
    where probes and Prometheus reach it through the pod's or container's own address."""

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values = {
            f.name: _env(f.name, getattr(cls(), f.name)) for f in fields(cls) if f.name != "bootstrap_servers"
        }
        values["bootstrap_servers"] = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
