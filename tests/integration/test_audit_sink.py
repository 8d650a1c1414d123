"""``chunkfold audit-sink`` against a real broker and a real database (SQLite and a PostgreSQL
server from Debian's packages): every completion stored exactly once, identical repeats and
conflicts told apart, invalid records rejected, and a crash between the database commit and
the Kafka offset commit that neither duplicates nor loses."""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from chunkfold.audit.database import connect
from chunkfold.config import Settings
from chunkfold.core import codec
from chunkfold.gateway import GatewayRecord
from chunkfold.produce import publish
from chunkfold.replay import replay_kafka
from tests.database_fixtures import database as database
from tests.database_fixtures import postgres_server as postgres_server
from tests.harness import ROOT, fresh_settings, settings_env, wait_for
from tests.recorded import recordings

pytestmark = pytest.mark.integration

COPIES = 3  # every recorded stream's completion-done, under three distinct completion ids
REPEAT_EVERY = 7  # then every 7th record again, byte-identical


# ------------------------------------------------------------------------------------------
# Databases
# ------------------------------------------------------------------------------------------


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    db = connect(url)
    try:
        rows = db.query(sql)
        db.commit()
        return rows
    finally:
        db.close()


def as_json(value: Any) -> Any:
    """A JSON column: text from SQLite, decoded already by psycopg."""
    return json.loads(value) if isinstance(value, str) else value


def db_offsets(url: str, topic: str) -> dict[int, int]:
    try:
        rows = query(url, f"SELECT partition, next_offset FROM sink_offsets WHERE topic = '{topic}'")
    except Exception:  # tables not created yet
        return {}
    return {int(p): int(o) for p, o in rows}


# ------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------


@functools.cache
def recorded_done_values() -> tuple[dict[str, Any], ...]:
    """The completion-done value of every recorded stream, from the engine (replay_kafka)."""
    settings = Settings()
    values = [
        out["value"]
        for rec in recordings()
        for out in replay_kafka(rec.sse.read_text(), rec.request, settings)
        if out["topic"] == settings.done_topic
    ]
    assert len(values) == len({v["completion_id"] for v in values}) == 49
    return tuple(values)


@dataclass
class Workload:
    records: list[GatewayRecord] = field(default_factory=list)
    expected: dict[str, tuple[bytes, dict[str, Any]]] = field(default_factory=dict)
    repeats: int = 0
    conflict_id: str = ""
    invalid_key: bytes = b"not-a-completion"


def workload() -> Workload:
    """Distinct completions, then identical repeats, one conflicting record for a stored id and
    one invalid record."""
    w = Workload()
    for n in range(COPIES):
        for base in recorded_done_values():
            value = copy.deepcopy(base)
            completion_id = f"{value['completion_id']}-{n}"
            value["completion_id"] = completion_id
            if value["completion"] is not None:
                value["completion"]["id"] = completion_id
            raw = codec.dumps(value)
            w.expected[completion_id] = (raw, value)
            w.records.append(GatewayRecord(completion_id.encode(), raw, []))
    originals = list(w.records)
    for r in originals[::REPEAT_EVERY]:
        w.records.append(GatewayRecord(r.key, r.value, []))
        w.repeats += 1
    w.conflict_id = originals[1].key.decode()
    changed = {**w.expected[w.conflict_id][1], "status": "failed"}
    w.records.append(GatewayRecord(originals[1].key, codec.dumps(changed), []))
    w.records.append(GatewayRecord(w.invalid_key, b'{"version": 1, "completion_id": "not-a-completion"}', []))
    return w


def produce_done(settings: Settings, records: list[GatewayRecord]) -> dict[int, int]:
    """Publish ``records`` to the done topic; the end offset of every partition."""
    asyncio.run(publish(settings, records, topic=settings.done_topic))
    return asyncio.run(end_offsets(settings))


async def end_offsets(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.done_topic, p) for p in range(settings.partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: int(o) for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def _kafka_committed(settings: Settings, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {
            tp.partition: int(meta.offset)
            for tp, meta in offsets.items()
            if tp.topic == settings.done_topic and meta.offset >= 0
        }
    finally:
        await admin.close()


def kafka_committed(settings: Settings, group: str) -> dict[int, int]:
    return asyncio.run(_kafka_committed(settings, group))


# ------------------------------------------------------------------------------------------
# The sink process
# ------------------------------------------------------------------------------------------

BATCH_LINE = re.compile(
    r"batch=(?P<batch>\d+) records=(?P<records>\d+) stored=(?P<stored>\d+) repeats=(?P<repeats>\d+) "
    r"conflicts=(?P<conflicts>\d+) rejected=(?P<rejected>\d+) skipped=(?P<skipped>\d+) "
)
RESUME_LINE = re.compile(
    r"resume (?P<topic>\S+)\[(?P<partition>\d+)\] at offset (?P<offset>\d+) from the database "
    r"\(Kafka committed (?P<committed>\w+)\)"
)


@dataclass
class Sink:
    settings: Settings
    database: str
    group: str
    log_path: Path
    batch: int = 40
    crash_after_db_commit: int = 0
    """Run ``tests.integration.crashing_audit_sink`` instead: it exits 137 after that database commit."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        log = self.log_path.open("ab")
        if self.crash_after_db_commit:
            command = ["tests.integration.crashing_audit_sink", str(self.crash_after_db_commit)]
        else:
            command = ["chunkfold.cli", "audit-sink"]
        cmd = [sys.executable, "-m", *command, "--database", self.database]
        cmd += ["--group", self.group, "--batch", str(self.batch)]
        self.proc = subprocess.Popen(
            cmd,
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful); SIGKILL if it does not end in time. The exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def batches(self) -> list[dict[str, int]]:
        return [{k: int(v) for k, v in m.groupdict().items()} for m in BATCH_LINE.finditer(self.log())]

    def totals(self) -> dict[str, int]:
        keys = ("records", "stored", "repeats", "conflicts", "rejected", "skipped")
        return {k: sum(b[k] for b in self.batches()) for k in keys}


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


def wait_until_consumed(sink: Sink, ends: dict[int, int], timeout: float = 120.0) -> None:
    def done() -> bool:
        if sink.proc is not None and sink.proc.poll() is not None:
            raise AssertionError(f"the sink exited {sink.proc.returncode}:\n{sink.log()[-3000:]}")
        return db_offsets(sink.database, sink.settings.done_topic) == ends

    try:
        wait_for(done, timeout, "the sink to store every record")
    except AssertionError:
        print(sink.log()[-3000:])
        raise


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------


def assert_stored_exactly_once(url: str, w: Workload, ends: dict[int, int], topic: str) -> None:
    rows = query(
        url,
        "SELECT completion_id, status, model, created, usage, usage_reported, request, completion, "
        "timing, anomalies, error, chunk_count, event_count, record_sha256, source_topic FROM completions",
    )
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) == len(w.expected), "every completion stored exactly once"
    assert set(ids) == set(w.expected)
    statuses: set[str] = set()
    for (
        completion_id,
        status,
        model,
        created,
        usage,
        usage_reported,
        request,
        completion,
        timing,
        anomalies,
        error,
        chunk_count,
        event_count,
        sha,
        source_topic,
    ) in rows:
        raw, want = w.expected[completion_id]
        statuses.add(status)
        assert status == want["status"], completion_id
        assert as_json(usage) == want["usage"], completion_id
        assert bool(usage_reported) == want["usage_reported"]
        assert as_json(request) == want["request"]
        assert as_json(completion) == want["completion"]
        assert as_json(timing) == want["timing"]
        assert as_json(anomalies) == want["anomalies"]
        assert as_json(error) == want["error"]
        assert (chunk_count, event_count) == (want["chunk_count"], want["event_count"])
        assert model == (want["completion"] or want["request"] or {}).get("model")
        assert created == (want["completion"] or {}).get("created")
        assert sha == hashlib.sha256(raw).hexdigest()
        assert source_topic == topic
    assert statuses == {"completed", "length"}
    usage_rows = [as_json(r[4]) for r in rows if r[4] is not None]
    assert usage_rows and all(u["total_tokens"] > 0 for u in usage_rows)

    conflicts = query(url, "SELECT completion_id, record_sha256, stored_sha256 FROM conflicts")
    assert [c[0] for c in conflicts] == [w.conflict_id]
    assert conflicts[0][2] == hashlib.sha256(w.expected[w.conflict_id][0]).hexdigest() != conflicts[0][1]
    rejected = query(url, "SELECT reason, detail, record_key FROM rejected")
    assert len(rejected) == 1
    reason, detail, key = rejected[0]
    assert reason == "invalid_record" and "status" in detail
    assert bytes(key) == w.invalid_key
    assert db_offsets(url, topic) == ends


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_every_completion_is_stored_exactly_once(
    kafka: str, database: str, tmp_path: Path, sinks: list[Sink]
) -> None:
    settings = fresh_settings(kafka)
    w = workload()
    ends = produce_done(settings, w.records)
    assert sum(ends.values()) == len(w.records)
    group = f"{settings.app_id}-audit"
    sink = Sink(settings, database, group, tmp_path / "sink.log")
    sinks.append(sink.start())
    wait_until_consumed(sink, ends)
    assert sink.stop() == 0, sink.log()[-3000:]  # SIGTERM: a clean stop

    assert_stored_exactly_once(database, w, ends, settings.done_topic)
    assert kafka_committed(settings, group) == ends, "Kafka offsets committed after the database"
    totals = sink.totals()
    assert totals == {
        "records": len(w.records),
        "stored": len(w.expected),
        "repeats": w.repeats,
        "conflicts": 1,
        "rejected": 1,
        "skipped": 0,
    }
    assert all(b["records"] <= 40 for b in sink.batches())
    assert "audit-sink stopped after" in sink.log()
    lines = [json.loads(line) for line in sink.log().splitlines()]  # one JSON object per line
    (conflict,) = [line for line in lines if line["msg"].startswith("conflict:")]
    assert conflict["completion_id"] in conflict["msg"]


def test_crash_between_database_commit_and_offset_commit(
    kafka: str, database: str, tmp_path: Path, sinks: list[Sink]
) -> None:
    settings = fresh_settings(kafka)
    w = workload()
    ends = produce_done(settings, w.records)
    group = f"{settings.app_id}-audit"

    crashing = Sink(settings, database, group, tmp_path / "sink-1.log", batch=25, crash_after_db_commit=3)
    sinks.append(crashing.start())
    assert crashing.wait(120) == 137, crashing.log()[-3000:]
    assert "exiting after database commit 3, before the Kafka offset commit" in crashing.log()
    assert len(crashing.batches()) == 2  # the third batch's line comes after its Kafka commit

    in_db = db_offsets(database, settings.done_topic)
    in_kafka = kafka_committed(settings, group)
    ahead = {p: o for p, o in in_db.items() if o > in_kafka.get(p, -1)}
    assert ahead, f"the database should be ahead of Kafka after the crash: {in_db} vs {in_kafka}"
    stored_at_crash = query(database, "SELECT COUNT(*) FROM completions")[0][0]
    assert stored_at_crash > 0

    restarted = Sink(settings, database, group, tmp_path / "sink-2.log", batch=25)
    sinks.append(restarted.start())
    wait_until_consumed(restarted, ends)
    assert restarted.stop() == 0, restarted.log()[-3000:]

    # The restarted sink resumed every partition where the database was ahead at the database's
    # offset, and nowhere else ...
    resumed = {
        int(m["partition"]): (int(m["offset"]), m["committed"]) for m in RESUME_LINE.finditer(restarted.log())
    }
    assert resumed == {p: (o, str(in_kafka[p]) if p in in_kafka else "None") for p, o in ahead.items()}
    # ... so it read each record after the crash exactly once: nothing again, nothing skipped.
    totals = restarted.totals()
    assert totals["records"] == sum(ends.values()) - sum(in_db.values())
    assert totals["skipped"] == 0
    assert_stored_exactly_once(database, w, ends, settings.done_topic)
    assert kafka_committed(settings, group) == ends
