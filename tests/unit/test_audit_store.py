"""The audit sink's store without Kafka, on SQLite and on a real PostgreSQL server: repeats,
conflicts, rejections, stored offsets, schema migrations (a first-release database brought up to
date), the drivers' own parameter markers; and its database URLs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chunkfold.audit.database import Database, DatabaseUrlError, SqliteDatabase, connect, redact
from chunkfold.audit.store import MIGRATIONS, AuditStore, Migration, SchemaTooNew, SourceRecord
from chunkfold.config import Settings
from chunkfold.core import codec
from chunkfold.replay import replay_kafka
from tests.database_fixtures import database as database
from tests.database_fixtures import postgres_server as postgres_server
from tests.recorded import recordings

pytestmark = pytest.mark.unit

TOPIC = "done"


@pytest.fixture
def db(database: str) -> Iterator[Database]:
    """A connection to a new, empty database (SQLite file, or PostgreSQL)."""
    conn = connect(database)
    yield conn
    conn.rollback()
    conn.close()


@pytest.fixture
def store(db: Database) -> AuditStore:
    s = AuditStore(db)
    assert s.migrate() == [m.version for m in MIGRATIONS]
    assert s.migrate() == []  # idempotent
    return s


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
    found = store.db.query(sql)
    store.db.commit()
    return found


def as_json(value: Any) -> Any:
    """A JSON column: text from SQLite, decoded already by psycopg."""
    return json.loads(value) if isinstance(value, str) else value


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
    assert as_json(usage) == value["usage"]
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


# ------------------------------------------------------------------------------------------
# Schema migrations
# ------------------------------------------------------------------------------------------

# The tables as the first release of the audit sink created them (commit 9fb5fd9), written out
# here rather than taken from the code: they are what a deployed database holds.
FIRST_RELEASE_TABLES = """
CREATE TABLE completions (
    completion_id TEXT PRIMARY KEY, status TEXT NOT NULL, model TEXT, created BIGINT,
    error {j}, usage {j}, usage_reported {b} NOT NULL, request {j}, completion {j},
    timing {j} NOT NULL, anomalies {j} NOT NULL, chunk_count BIGINT NOT NULL,
    event_count BIGINT NOT NULL, first_chunk_at_ms BIGINT, last_chunk_at_ms BIGINT,
    source_topic TEXT NOT NULL, source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL,
    record_sha256 TEXT NOT NULL, stored_at_ms BIGINT NOT NULL
);
CREATE TABLE conflicts (
    source_topic TEXT NOT NULL, source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL,
    completion_id TEXT NOT NULL, record_sha256 TEXT NOT NULL, stored_sha256 TEXT NOT NULL,
    value {blob} NOT NULL, detected_at_ms BIGINT NOT NULL,
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE TABLE rejected (
    source_topic TEXT NOT NULL, source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, record_key {blob}, value {blob},
    record_sha256 TEXT NOT NULL, rejected_at_ms BIGINT NOT NULL,
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE TABLE sink_offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL, PRIMARY KEY (topic, partition)
);
CREATE INDEX conflicts_by_completion ON conflicts (completion_id)
"""
FIRST_RELEASE_TYPES = {
    "sqlite": {"j": "TEXT", "b": "INTEGER", "blob": "BLOB"},
    "postgresql": {"j": "JSON", "b": "BOOLEAN", "blob": "BYTEA"},
}


def first_release_database(db: Database) -> None:
    """What the first release left: its tables, one stored completion and its offset."""
    db.begin()
    for sql in FIRST_RELEASE_TABLES.format(**FIRST_RELEASE_TYPES[db.dialect]).split(";"):
        db.execute(sql)
    m = db.mark
    db.execute(
        "INSERT INTO completions (completion_id, status, usage_reported, timing, anomalies, "
        "chunk_count, event_count, source_topic, source_partition, source_offset, record_sha256, "
        f"stored_at_ms) VALUES ('old-id', 'completed', {m}, '{{}}', '{{}}', 3, 5, '{TOPIC}', 0, 0, "
        "'sha', 1)",
        (True,),
    )
    db.execute(f"INSERT INTO sink_offsets VALUES ('{TOPIC}', 0, 1, 1)")
    db.commit()


def columns(db: Database, table: str) -> list[str]:
    if db.dialect == "sqlite":
        names = [row[1] for row in db.query(f"PRAGMA table_info({table})")]
    else:
        names = [
            row[0]
            for row in db.query(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                "ORDER BY ordinal_position",
                (table,),
            )
        ]
    db.commit()
    return names


ALL = [m.version for m in MIGRATIONS]
"""Every migration this release has, 1, 2, ... in order."""
NEXT = len(MIGRATIONS) + 1
"""The version a newer release's next migration would have."""


def applied_versions(db: Database) -> list[int]:
    found = [int(v) for (v,) in db.query("SELECT version FROM schema_migrations ORDER BY version")]
    db.commit()
    return found


def test_a_first_release_database_is_brought_up_to_date(db: Database) -> None:
    first_release_database(db)
    store = AuditStore(db)
    assert store.migrate() == ALL
    assert applied_versions(db) == ALL
    assert columns(db, "completions")[-2:] == ["record_version", "truncated"]
    assert store.stored_offsets(TOPIC) == {0: 1}, "the first release's offsets are kept"
    value = done_value()
    result = store.write_batch([record(0, 1, value)])
    assert (result.stored, result.rejected) == (1, 0)
    stored = rows(store, "SELECT completion_id, record_version FROM completions ORDER BY completion_id")
    assert sorted(stored) == sorted([("old-id", 1), (value["completion_id"], 1)])
    assert store.migrate() == []


def test_each_migration_lands_whole_or_not_at_all(db: Database) -> None:
    store = AuditStore(db)
    store.migrate()
    broken = Migration(
        NEXT,
        "a note, then a mistake",
        lambda _db: [
            "ALTER TABLE completions ADD COLUMN note TEXT",
            "ALTER TABLE no_such_table ADD COLUMN x TEXT",
        ],
    )
    with pytest.raises(Exception, match="no_such_table"):
        store.migrate([*MIGRATIONS, broken])
    assert "note" not in columns(db, "completions"), "the failed migration's first statement stays undone"
    assert applied_versions(db) == ALL
    fixed = Migration(
        NEXT,
        "a note and a tag",
        lambda _db: [
            "ALTER TABLE completions ADD COLUMN note TEXT",
            "ALTER TABLE completions ADD COLUMN tag TEXT NOT NULL DEFAULT 'why?'",
        ],
    )
    assert store.migrate([*MIGRATIONS, fixed]) == [NEXT]
    assert columns(db, "completions")[-2:] == ["note", "tag"]
    assert applied_versions(db) == [*ALL, NEXT]
    store.write_batch([record(0, 0, done_value())])
    assert rows(store, "SELECT note, tag FROM completions") == [(None, "why?")]


def test_sinks_starting_together_apply_each_migration_once(database: str) -> None:
    connections = [connect(database) for _ in range(3)]
    start = threading.Barrier(len(connections))

    def migrate(db: Database) -> list[int]:
        start.wait()
        return AuditStore(db).migrate()

    try:
        with ThreadPoolExecutor(len(connections)) as pool:
            applied = list(pool.map(migrate, connections))
        assert sorted(v for versions in applied for v in versions) == ALL
        assert applied_versions(connections[0]) == ALL
    finally:
        for db in connections:
            db.close()


def test_a_schema_newer_than_the_sink_is_refused(db: Database) -> None:
    store = AuditStore(db)
    newer = Migration(NEXT, "from a newer release", lambda _db: ["CREATE TABLE newer (x INTEGER)"])
    store.migrate([*MIGRATIONS, newer])
    with pytest.raises(
        SchemaTooNew, match=f"version {NEXT}; this audit sink knows versions up to {NEXT - 1}"
    ):
        store.migrate()
    assert applied_versions(db) == [*ALL, NEXT]


def test_the_command_refuses_a_newer_schema_before_reaching_kafka(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    db = connect(url)
    AuditStore(db).migrate([*MIGRATIONS, Migration(NEXT, "from a newer release", lambda _db: [])])
    db.close()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chunkfold.cli",
            "audit-sink",
            "--database",
            url,
            "--bootstrap-servers",
            "127.0.0.1:1",
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"schema is at version {NEXT}; this audit sink knows versions up to {NEXT - 1}".encode()
        in proc.stderr
    )


def test_migrations_are_numbered_from_one_in_order(db: Database) -> None:
    store = AuditStore(db)
    with pytest.raises(ValueError, match="numbered 1, 2, 3"):
        store.migrate([MIGRATIONS[1], MIGRATIONS[0]])
    with pytest.raises(ValueError, match="numbered 1, 2, 3"):
        store.migrate([MIGRATIONS[0], Migration(3, "a gap", lambda _db: [])])


# ------------------------------------------------------------------------------------------
# Parameter markers
# ------------------------------------------------------------------------------------------


def test_sql_is_passed_to_the_driver_as_written(db: Database) -> None:
    """A ``?`` or ``%s`` that is not a parameter keeps its meaning: nothing rewrites the SQL."""
    assert db.query(f"SELECT '?' || {db.mark}", ("x",)) == [("?x",)]
    assert db.query("SELECT 'a?b', '%s'") == [("a?b", "%s")]
    if db.dialect == "postgresql":  # jsonb's key-exists operator is a bare ?
        assert db.query("SELECT CAST(%s AS jsonb) ? 'model'", ('{"model": "m"}',)) == [(True,)]
    db.commit()


def test_values_with_markers_in_them_are_stored_as_they_are(store: AuditStore) -> None:
    value = done_value()
    odd_id = "chatcmpl-?%s%%?"
    value = {**value, "completion_id": odd_id, "request": {"model": "gpt-?-%s", "note": "%(x)s ? $1"}}
    if value["completion"] is not None:
        value["completion"] = {**value["completion"], "id": odd_id}
    result = store.write_batch([record(0, 0, value), record(0, 1, value)])
    assert (result.stored, result.repeats, result.rejected) == (1, 1, 0)
    [(completion_id, request)] = rows(store, "SELECT completion_id, request FROM completions")
    assert completion_id == odd_id
    assert as_json(request) == value["request"]


def test_a_cut_done_record_is_stored_with_what_was_cut(store: AuditStore) -> None:
    value = done_value()
    value["truncated"] = [
        {
            "path": "/completion/choices/0/message/content",
            "original_bytes": 9,
            "kept_bytes": 3,
            "sha256": "ab",
        }
    ]
    whole = {**done_value(), "completion_id": "whole"}
    result = store.write_batch([record(0, 0, value), record(0, 1, whole)])
    assert (result.stored, result.rejected) == (2, 0)
    stored = dict(rows(store, "SELECT completion_id, truncated FROM completions"))
    cut = stored[value["completion_id"]]  # text on SQLite, decoded by psycopg on PostgreSQL
    assert (json.loads(cut) if isinstance(cut, str) else cut) == value["truncated"]
    assert stored["whole"] is None
