"""Operating a worker under load, for both drivers: the Prometheus endpoint (scraped while the
load runs, and its values checked against what the output topics hold once it is over),
``/healthz`` and ``/readyz``, and the JSON log lines on the worker's stderr."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from chunkfold.core.records import KIND_HEADER
from chunkfold.gateway import GatewayRecord, capture_records, interleave, load_captures
from tests.conftest import kafka_module
from tests.harness import (
    BackgroundProducer,
    Collected,
    WorkerProcess,
    collect,
    done_count,
    fresh_settings,
    recorded_records,
    wait_for,
    wait_group_stable,
)
from tests.prometheus import Samples, by_label, http_get, scrape, value
from tests.recorded import FIXTURES

pytestmark = pytest.mark.integration

PARTITIONS = 4
IDLE_TIMEOUT_S = 3.0
RATE = 500.0
"""Records per second offered; the load below lasts about 8 s."""
BAD_PER_REASON = 20
BAD_RECORDS: dict[str, tuple[str, bytes, list[tuple[str, bytes]]]] = {
    # reason: (key prefix, value, headers)
    "invalid_json": ("bad-json", b"{not json", []),
    "not_an_object": ("bad-array", b"[1, 2, 3]", []),
    "unknown_completion": ("bad-done", b"[DONE]", []),
}
HISTOGRAMS = (
    "chunkfold_processing_latency_seconds",
    "chunkfold_end_to_end_latency_seconds",
    "chunkfold_time_to_first_token_seconds",
    "chunkfold_tokens_per_second",
)


@dataclass
class Workload:
    records: list[GatewayRecord]
    good: int
    """Completions with an end marker (end ``completed`` or ``length``)."""
    abandoned: set[str]
    """Completions without an end marker (end ``expired``)."""
    bad: Counter[str]
    """Dead-letter reason -> records sent that get it."""
    chunks: int
    """Chunk records among the valid records."""


def abandoned_streams() -> list[list[GatewayRecord]]:
    """Every recorded stream once more under another id, without its ``[DONE]``."""
    streams = []
    for _, text, request in load_captures([FIXTURES]):
        for records in capture_records(text, request, key_suffix="-abandoned").values():
            streams.append([r for r in records if r.value != b"[DONE]"])
    return streams


def workload() -> Workload:
    good, good_count = recorded_records(repeat=2, concurrency=16)
    abandoned = abandoned_streams()
    lost = list(interleave(abandoned, seed=7, concurrency=8))
    # merge the two in proportion (each keeps its order), so both span the whole load
    merged: list[GatewayRecord] = []
    g = a = 0
    while g < len(good) or a < len(lost):
        if a >= len(lost) or (g < len(good) and g * len(lost) <= a * len(good)):
            merged.append(good[g])
            g += 1
        else:
            merged.append(lost[a])
            a += 1
    valid_chunks = sum(
        1 for r in merged if r.value != b"[DONE]" and dict(r.headers).get(KIND_HEADER, b"chunk") == b"chunk"
    )
    bad = [
        GatewayRecord(f"{prefix}-{n}".encode(), value, list(headers))
        for n in range(BAD_PER_REASON)
        for prefix, value, headers in BAD_RECORDS.values()
    ]
    step = len(merged) // len(bad)
    records: list[GatewayRecord] = []
    for n, record in enumerate(merged):
        if n % step == step // 2 and n // step < len(bad):
            records.append(bad[n // step])
        records.append(record)
    assert sum(r.key.startswith(b"bad-") for r in records) == len(bad)
    # no completion with an end marker may go idle for the idle timeout between two of its
    # records (in stream time: the records between them at RATE); keep a wide margin
    last: dict[bytes, int] = {}
    widest = 0
    for n, record in enumerate(records):
        widest = max(widest, n - last.get(record.key, n))
        last[record.key] = n
    assert widest / RATE < IDLE_TIMEOUT_S / 3, widest
    return Workload(
        records=records,
        good=good_count,
        abandoned={s[0].key.decode() for s in abandoned},
        bad=Counter({reason: BAD_PER_REASON for reason in BAD_RECORDS}),
        chunks=valid_chunks,
    )


def check_histogram(samples: Samples, name: str) -> int:
    """Buckets cumulative, ``+Inf`` equal to ``_count``; returns ``_count``."""
    buckets = by_label(samples, f"{name}_bucket", "le")
    ordered = [buckets[le] for le in sorted(buckets, key=lambda le: float(le.replace("+Inf", "inf")))]
    assert ordered == sorted(ordered), f"{name} buckets not cumulative: {buckets}"
    count = value(samples, f"{name}_count")
    assert buckets["+Inf"] == count
    assert f"{name}_sum" in samples
    return int(count)


# -- the test -------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["direct", "faust"])
def test_metrics_health_and_json_logs_under_load(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str
) -> None:
    port = kafka_module().free_ports(1)[0]
    settings = fresh_settings(
        kafka, driver=driver, partitions=PARTITIONS, idle_timeout_s=IDLE_TIMEOUT_S, web_port=port
    )
    load = workload()
    worker = WorkerProcess(settings, tmp_path / "worker.log", loglevel="info").start()
    workers.append(worker)
    wait_group_stable(settings, 1)
    wait_for(lambda: _ready(port), 60, "/readyz 200 once partitions are assigned")

    producer = BackgroundProducer(settings, load.records, rate=RATE)
    producer.start()
    during = _scrape_during_load(port, producer, load)
    producer.finish()
    assert worker.alive, worker.log_tail()

    completions = load.good + len(load.abandoned)
    got = collect(
        settings,
        lambda c: done_count(completions)(c) and len(c.deadletters) >= sum(load.bad.values()),
        timeout=180,
    )
    assert worker.alive, worker.log_tail()
    after = scrape(port)
    _check_outputs(got, load)
    _check_final_metrics(after, got, load)
    assert during["chunkfold_chunks_in_total"] < load.chunks  # the scrape did happen mid-load
    # stopped first, so that the log is complete (shutdown lines included) when it is read
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.log_tail()
    _check_logs(worker.log_path, got, load)


def _ready(port: int) -> bool:
    try:
        status, _, body = http_get(port, "/readyz")
    except OSError:
        return False
    if status != 200:
        assert status == 503, (status, body)
        return False
    ready = orjson.loads(body)
    assert ready == {"ready": True, "partitions": list(range(PARTITIONS)), "open": 0}, ready
    return True


def _scrape_during_load(port: int, producer: BackgroundProducer, load: Workload) -> dict[str, float]:
    """Scrape /metrics until it shows chunks folded, then /healthz and /readyz, all before the
    producer is done (asserted after each)."""
    chunks = 0.0
    while chunks == 0:
        assert producer.is_alive() and producer.error is None, "the load ended before a scrape saw it"
        samples = scrape(port)
        chunks = value(samples, "chunkfold_chunks_in_total")
        if chunks == 0:
            time.sleep(0.1)
    assert producer.is_alive(), "the /metrics scrape was not made during the load"
    assert 0 < chunks < load.chunks
    assert 0 < value(samples, "chunkfold_records_in_total") < len(load.records)

    status, content_type, body = http_get(port, "/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "alive"})
    assert content_type.startswith("application/json")
    status, content_type, body = http_get(port, "/readyz")
    assert status == 200, body
    assert content_type.startswith("application/json")
    ready = orjson.loads(body)
    assert ready["ready"] is True and ready["partitions"] == list(range(PARTITIONS)), ready
    assert isinstance(ready["open"], int) and ready["open"] >= 0
    assert producer.is_alive(), "/healthz and /readyz were not asked during the load"
    return {"chunkfold_chunks_in_total": chunks}


def _check_outputs(got: Collected, load: Workload) -> None:
    """What the topics hold is what the workload was built to give (so that the metrics below
    are compared with the intended outcome, not just with whatever came out)."""
    done = got.done_by_id()
    assert len(got.done) == len(done) == load.good + len(load.abandoned), "one done per completion"
    assert got.repeats() == (0, 0)
    expired = {k for k, d in done.items() if d["status"] == "expired"}
    assert expired == load.abandoned
    assert {d["status"] for k, d in done.items() if k not in expired} == {"completed", "length"}
    assert Counter(d["reason"] for d in got.deadletters) == load.bad


def _check_final_metrics(samples: Samples, got: Collected, load: Workload) -> None:
    done = [d for _, d, _ in got.done]
    # every record sent was read once (one worker, no fault: nothing redelivered)
    assert value(samples, "chunkfold_records_in_total") == len(load.records)
    assert value(samples, "chunkfold_replayed_skipped_total") == 0
    # the counter counts chunk records folded; the bad records fail decoding before that
    assert value(samples, "chunkfold_chunks_in_total") == load.chunks
    events_out = value(samples, "chunkfold_events_out_total")
    assert events_out > 0
    assert events_out == len(got.events)
    assert events_out == sum(d["event_count"] for d in done)
    by_status = by_label(samples, "chunkfold_completions_out_total", "status")
    assert by_status == dict(Counter(d["status"] for d in done))
    assert by_status["completed"] > 0 and by_status["expired"] == len(load.abandoned)
    assert by_label(samples, "chunkfold_deadletters_total", "reason") == dict(
        Counter(d["reason"] for d in got.deadletters)
    )
    assert value(samples, "chunkfold_open_completions") == 0
    # every finished completion is remembered as a tombstone (default TTL 600 s), so some
    # state is held
    assert value(samples, "chunkfold_closed_tombstones") == len(done)
    assert value(samples, "chunkfold_state_bytes") > 0
    assert value(samples, "chunkfold_state_writes_total") > 0
    assert value(samples, "chunkfold_assigned_partitions") == PARTITIONS
    assert by_label(samples, "chunkfold_consumer_lag", "partition") == {str(p): 0 for p in range(PARTITIONS)}
    counts = {name: check_histogram(samples, name) for name in HISTOGRAMS}
    # both drivers time the fold of every record; end to end only records with outputs
    assert counts["chunkfold_processing_latency_seconds"] == len(load.records)
    assert 0 < counts["chunkfold_end_to_end_latency_seconds"] <= len(load.records)
    # observed for each finished completion whose timing has the value
    with_ttft = sum(d["timing"]["time_to_first_token_ms"] is not None for d in done)
    with_tps = sum(d["timing"]["tokens_per_second"] is not None for d in done)
    assert with_ttft > 0 and with_tps > 0
    assert counts["chunkfold_time_to_first_token_seconds"] == with_ttft
    assert counts["chunkfold_tokens_per_second"] == with_tps


def _check_logs(path: Path, got: Collected, load: Workload) -> None:
    """Every line of the worker's output is a JSON log object; every line about a completion
    carries its id; the finished and dead-letter lines match the topics one to one."""
    lines = path.read_text().splitlines()
    assert lines
    entries: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"worker.log line {n} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= entry.keys(), line
        entries.append(entry)
    ids = {k.decode() for k, _, _ in got.done} | {d["key"] for d in got.deadletters}
    mentions = re.compile("|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True)))
    for entry in entries:
        if mentions.search(entry["msg"]) or (entry.get("exc") and mentions.search(entry["exc"])):
            assert "completion_id" in entry, f"a line about a completion without its id: {entry}"

    finished = [e for e in entries if e["msg"] == "completion finished"]
    done = got.done_by_id()
    assert all({"completion_id", "status", "chunks", "events"} <= e.keys() for e in finished), finished[:3]
    assert sorted(e["completion_id"] for e in finished) == sorted(done)
    for e in finished:
        record = done[e["completion_id"]]
        assert (e["status"], e["chunks"], e["events"]) == (
            record["status"],
            record["chunk_count"],
            record["event_count"],
        ), e
    statuses = {d["status"] for d in done.values()}
    assert statuses >= {"completed", "expired"}
    assert {e["status"] for e in finished} == statuses

    dead = [e for e in entries if e["msg"].startswith("record dead-lettered")]
    assert all({"completion_id", "reason", "partition", "offset"} <= e.keys() for e in dead), dead[:3]
    assert sorted((e["completion_id"], e["reason"]) for e in dead) == sorted(
        (d["key"], d["reason"]) for d in got.deadletters
    )
    assert sorted((e["partition"], e["offset"]) for e in dead) == sorted(
        (d["source"]["partition"], d["source"]["offset"]) for d in got.deadletters
    )
    assert Counter(e["level"] for e in dead) == {"warning": sum(load.bad.values())}
