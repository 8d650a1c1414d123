"""The audit sink's store without Kafka (SQLite in memory): repeats, conflicts, rejections,
stored offsets; and its database URLs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.recorded import recordings
from worker.audit_sink import AuditStore, DatabaseUrlError, SourceRecord, SqliteDatabase, connect, redact
from worker.config import Settings
from worker.core import codec
from worker.replay import replay_kafka

pytestmark = pytest.mark.unit

TOPIC = "done"


@pytest.fixture
def store() -> Iterator[AuditStore]:
    db = connect("sqlite://")
    s = AuditStore(db)
    s.create_schema()
    s.create_schema()  # idempotent
    yield s
    db.close()


def done_value() -> dict[str, Any]:
    rec = recordings()[0]
    settings = Settings()
    return next(
        o["value"]
        for o in replay_kafka(rec.sse.read_text(), rec.request, settings)
        if o["topic"] == settings.done_topic
    )


def record(
    partition: int, offset: int, value: dict[str, Any] | bytes | None, key: str | None = None
) -> SourceRecord:
    raw = codec.dumps(value) if isinstance(value, dict) else value
    if key is None and isinstance(value, dict):
        key = value["completion_id"]
    return SourceRecord(TOPIC, partition, offset, key.encode() if key is not None else None, raw)


def rows(store: AuditStore, sql: str) -> list[tuple[Any, ...]]:
    return store.db.query(sql)


def test_insert_repeat_and_conflict(store: AuditStore) -> None:
    value = done_value()
    changed = {**value, "status": "failed"}
    result = store.write_batch([record(0, 0, value), record(0, 1, value), record(0, 2, changed)])
    assert (result.stored, result.repeats, result.conflicts, result.rejected) == (1, 1, 1, 0)
    assert result.next_offsets == {0: 3}
    [(completion_id, status, usage, sha)] = rows(
        store, "SELECT completion_id, status, usage, record_sha256 FROM completions"
    )
    assert (completion_id, status) == (value["completion_id"], value["status"])
    assert json.loads(usage) == value["usage"]
    assert sha == hashlib.sha256(codec.dumps(value)).hexdigest()
    [(conflict_id, offset, stored_sha)] = rows(
        store, "SELECT completion_id, source_offset, stored_sha256 FROM conflicts"
    )
    assert (conflict_id, offset, stored_sha) == (value["completion_id"], 2, sha)


def test_invalid_records_are_rejected_with_the_reason(store: AuditStore) -> None:
    value = done_value()
    huge = json.dumps({**value, "completion_id": "huge", "chunk_count": 2**70}).encode()
    batch = [
        record(1, 0, None, key="k"),
        record(1, 1, b"{not json", key="k"),
        record(1, 2, b'{"version": 1}', key="k"),
        record(1, 3, value, key="another-id"),
        record(1, 4, huge, key="huge"),
        record(1, 5, value),
    ]
    result = store.write_batch(batch)
    assert (result.stored, result.rejected) == (1, 5)
    reasons = rows(store, "SELECT source_offset, reason FROM rejected ORDER BY source_offset")
    assert reasons == [
        (0, "no_value"),
        (1, "invalid_json"),
        (2, "invalid_record"),
        (3, "key_mismatch"),
        (4, "unstorable"),
    ]


def test_stored_offsets_move_forward_and_records_below_them_are_skipped(store: AuditStore) -> None:
    value = done_value()
    assert store.stored_offsets(TOPIC) == {}
    store.write_batch([record(0, 5, value), record(2, 0, b"x", key="x")])
    assert store.stored_offsets(TOPIC) == {0: 6, 2: 1}
    again = store.write_batch([record(0, 5, value), record(0, 6, b"y", key="y")])
    assert (again.skipped, again.rejected, again.stored, again.repeats) == (1, 1, 0, 0)
    assert store.stored_offsets(TOPIC) == {0: 7, 2: 1}
    assert store.stored_offsets(TOPIC, [2]) == {2: 1}


def test_database_urls(tmp_path: Any) -> None:
    db = connect(f"sqlite:///{tmp_path}/sub/audit.sqlite3")
    assert isinstance(db, SqliteDatabase)
    db.close()
    assert (tmp_path / "sub" / "audit.sqlite3").is_file()
    for bad in ("mysql://x/y", "sqlite:/x", "sqlite:///", "nothing"):
        with pytest.raises(DatabaseUrlError):
            connect(bad)
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
