"""The audit store: schema migrations and batch writes of ``completion-done`` records, with the
offsets they came from. No Kafka here: :mod:`chunkfold.audit.sink` hands it records.

Invariant: one batch is one database transaction. Its rows (``completions``, ``conflicts``,
``rejected``) and the ``sink_offsets`` that move past them commit together or not at all, so the
stored offsets always say exactly which records the database holds; records below a stored
offset are skipped, never written twice.

Each record is parsed with :func:`chunkfold_schemas.done.parse_done`; a record that does not parse
or validate (or whose key is not its ``completion_id``, or that the database cannot hold) goes to
``rejected`` with the reason. A new id is inserted with ``INSERT ... ON CONFLICT (completion_id)
DO NOTHING``; a repeat with the same SHA-256 is an identical redelivery (counted, nothing
written), a different record for a stored id goes to ``conflicts`` (logged, the stored row is
kept). The schema is versioned: :meth:`AuditStore.migrate` applies the :data:`MIGRATIONS` the
database lacks (``schema_migrations`` records them), so tables of an earlier release are brought
up to date instead of failing the first insert.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from chunkfold.audit.database import Database
from chunkfold_schemas.done import DoneRecord, parse_done

log = logging.getLogger("chunkfold.audit")


class SchemaTooNew(RuntimeError):
    """The database's schema is at a version this sink does not know (a newer release made it)."""


# --------------------------------------------------------------------------------------------
# Records and what a batch did with them.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One record of the done topic, as the store sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class BatchResult:
    records: int = 0
    stored: int = 0
    repeats: int = 0
    conflicts: int = 0
    rejected: int = 0
    skipped: int = 0
    next_offsets: dict[int, int] = field(default_factory=dict)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


COMPLETION_COLUMNS = (
    "completion_id",
    "status",
    "model",
    "created",
    "error",
    "usage",
    "usage_reported",
    "request",
    "completion",
    "timing",
    "anomalies",
    "chunk_count",
    "event_count",
    "first_chunk_at_ms",
    "last_chunk_at_ms",
    "source_topic",
    "source_partition",
    "source_offset",
    "record_sha256",
    "stored_at_ms",
    "record_version",
    "truncated",
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clean(text: str, limit: int = 2000) -> str:
    """Text any database column takes (no NUL), bounded."""
    text = text.replace("\x00", "\\u0000")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def classify(record: SourceRecord) -> tuple[DoneRecord, dict[str, Any]]:
    """The parsed record and its raw JSON object, or :class:`Rejected` with the reason."""
    if record.value is None:
        raise Rejected("no_value", "the record has no value (tombstone)")
    try:
        done = parse_done(record.value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        reason = "invalid_json" if errors and errors[0]["type"] == "json_invalid" else "invalid_record"
        shown = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<record>'}: {e['msg']}" for e in errors[:5]
        )
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise Rejected(reason, shown + more) from None
    try:
        raw = orjson.loads(record.value)
    except orjson.JSONDecodeError as exc:  # pydantic accepted what strict JSON does not (NaN, ...)
        raise Rejected("invalid_json", str(exc)) from None
    if not isinstance(raw, dict):
        raise Rejected("invalid_record", "not a JSON object")
    if record.key is not None and record.key != done.completion_id.encode():
        raise Rejected(
            "key_mismatch", f"record key {record.key[:200]!r} is not completion_id {done.completion_id!r}"
        )
    return done, raw


# --------------------------------------------------------------------------------------------
# Schema migrations. A released migration never changes: a new shape is a new migration at the
# end, written so that it works on both databases (each runs in one transaction; SQLite and
# PostgreSQL both roll DDL back with it).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """Schema version ``version``: the statements that take the previous version to it."""

    version: int
    name: str
    statements: Callable[[Database], Sequence[str]]


def _first_release_tables(db: Database) -> list[str]:
    """The tables exactly as the first release created them (it had no ``schema_migrations``).
    ``IF NOT EXISTS``: a database that release made is adopted as version 1 as it is."""
    j, b, blob = db.json_type, db.bool_type, db.blob_type
    return [
        f"""CREATE TABLE IF NOT EXISTS completions (
            completion_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            model TEXT,
            created BIGINT,
            error {j},
            usage {j},
            usage_reported {b} NOT NULL,
            request {j},
            completion {j},
            timing {j} NOT NULL,
            anomalies {j} NOT NULL,
            chunk_count BIGINT NOT NULL,
            event_count BIGINT NOT NULL,
            first_chunk_at_ms BIGINT,
            last_chunk_at_ms BIGINT,
            source_topic TEXT NOT NULL,
            source_partition INTEGER NOT NULL,
            source_offset BIGINT NOT NULL,
            record_sha256 TEXT NOT NULL,
            stored_at_ms BIGINT NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS conflicts (
            source_topic TEXT NOT NULL,
            source_partition INTEGER NOT NULL,
            source_offset BIGINT NOT NULL,
            completion_id TEXT NOT NULL,
            record_sha256 TEXT NOT NULL,
            stored_sha256 TEXT NOT NULL,
            value {blob} NOT NULL,
            detected_at_ms BIGINT NOT NULL,
            PRIMARY KEY (source_topic, source_partition, source_offset)
        )""",
        f"""CREATE TABLE IF NOT EXISTS rejected (
            source_topic TEXT NOT NULL,
            source_partition INTEGER NOT NULL,
            source_offset BIGINT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            record_key {blob},
            value {blob},
            record_sha256 TEXT NOT NULL,
            rejected_at_ms BIGINT NOT NULL,
            PRIMARY KEY (source_topic, source_partition, source_offset)
        )""",
        """CREATE TABLE IF NOT EXISTS sink_offsets (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            next_offset BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            PRIMARY KEY (topic, partition)
        )""",
        "CREATE INDEX IF NOT EXISTS conflicts_by_completion ON conflicts (completion_id)",
    ]


def _record_version_column(db: Database) -> list[str]:
    """The done record's ``version``, so that rows stay told apart once a version 2 exists;
    every row stored before it came from a version 1 record (the only one that parses)."""
    return ["ALTER TABLE completions ADD COLUMN record_version INTEGER NOT NULL DEFAULT 1"]


def _truncated_column(db: Database) -> list[str]:
    """The done record's ``truncated`` (what the size policy cut to fit the topic, or null), so
    that an audit row of a cut record is never taken for the whole completion."""
    return [f"ALTER TABLE completions ADD COLUMN truncated {db.json_type}"]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tables of the first release", _first_release_tables),
    Migration(2, "completions.record_version", _record_version_column),
    Migration(3, "completions.truncated", _truncated_column),
)


def _check_numbering(migrations: Sequence[Migration]) -> None:
    """Versions 1, 2, 3, ... in order: the applied version alone then says what is missing."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3, ... in order, not {versions}")


class AuditStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[int]:
        """Apply the migrations the database lacks, in order, each in its own transaction with
        its ``schema_migrations`` row (all of it or none of it lands), under the schema lock so
        that sinks starting together apply each once; the versions applied. A schema ahead of
        the last one known raises :class:`SchemaTooNew`: this release cannot know its columns."""
        steps = MIGRATIONS if migrations is None else tuple(migrations)
        _check_numbering(steps)
        return [m.version for m in steps if self._apply(m, latest=steps[-1].version)]

    def _apply(self, migration: Migration, latest: int) -> bool:
        """Apply ``migration`` unless the database has it; whether it was applied."""
        self.db.begin()
        try:
            self.db.lock_schema()
            self._create_migrations_table()
            current = self._applied_version()
            if current > latest:
                raise SchemaTooNew(
                    f"the audit database's schema is at version {current}; this audit sink knows "
                    f"versions up to {latest}: run the release that migrated it (or a newer one)"
                )
            if current >= migration.version:
                self.db.commit()
                return False
            for sql in migration.statements(self.db):
                self.db.execute(sql)
            self.db.execute(
                f"INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ({self.db.marks(3)})",
                (migration.version, migration.name, _now_ms()),
            )
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        log.info("schema: applied migration %d (%s)", migration.version, migration.name)
        return True

    def _create_migrations_table(self) -> None:
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at_ms BIGINT NOT NULL
            )"""
        )

    def _applied_version(self) -> int:
        [(version,)] = self.db.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(version)

    def stored_offsets(self, topic: str, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """``next_offset`` per partition of ``topic`` as committed in the database."""
        rows = self.db.query(
            f"SELECT partition, next_offset FROM sink_offsets WHERE topic = {self.db.mark}", (topic,)
        )
        wanted = None if partitions is None else set(partitions)
        offsets = {int(p): int(o) for p, o in rows if wanted is None or int(p) in wanted}
        # A read outside write_batch still opens a transaction on PostgreSQL: end it.
        self.db.commit()
        return offsets

    def write_batch(self, records: Sequence[SourceRecord]) -> BatchResult:
        """Store ``records`` (one topic, each partition in offset order) and move the stored
        offsets past them, all in one transaction."""
        result = BatchResult(records=len(records))
        if not records:
            return result
        topic = records[0].topic
        self.db.begin()
        try:
            floor = {
                int(p): int(o)
                for p, o in self.db.query(
                    f"SELECT partition, next_offset FROM sink_offsets WHERE topic = {self.db.mark}",
                    (topic,),
                )
            }
            now = _now_ms()
            for record in records:
                if record.topic != topic:
                    raise ValueError("write_batch takes records of one topic")
                if record.offset < floor.get(record.partition, -1):
                    result.skipped += 1
                    continue
                self._store_one(record, now, result)
                result.next_offsets[record.partition] = max(
                    record.offset + 1, result.next_offsets.get(record.partition, 0)
                )
            for partition, next_offset in sorted(result.next_offsets.items()):
                self.db.execute(
                    "INSERT INTO sink_offsets (topic, partition, next_offset, updated_at_ms) "
                    f"VALUES ({self.db.marks(4)}) ON CONFLICT (topic, partition) DO UPDATE SET "
                    "next_offset = excluded.next_offset, updated_at_ms = excluded.updated_at_ms "
                    "WHERE sink_offsets.next_offset < excluded.next_offset",
                    (topic, partition, next_offset, now),
                )
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        return result

    def _store_one(self, record: SourceRecord, now: int, result: BatchResult) -> None:
        sha = hashlib.sha256(record.value or b"").hexdigest()
        where = (record.topic, record.partition, record.offset)
        try:
            done, raw = classify(record)
        except Rejected as exc:
            self._reject(record, sha, exc, now, result)
            return
        # A savepoint per record: a value the database refuses (DataError) rejects this record
        # only, and the rest of the batch goes on in the same transaction.
        self.db.execute("SAVEPOINT audit_record")
        try:
            inserted = self.db.execute(
                f"INSERT INTO completions ({', '.join(COMPLETION_COLUMNS)}) "
                f"VALUES ({self.db.marks(len(COMPLETION_COLUMNS))}) "
                "ON CONFLICT (completion_id) DO NOTHING",
                self._row(done, raw, record, sha, now),
            )
        except self.db.data_errors as exc:
            self.db.execute("ROLLBACK TO SAVEPOINT audit_record")
            self.db.execute("RELEASE SAVEPOINT audit_record")
            self._reject(record, sha, Rejected("unstorable", f"{type(exc).__name__}: {exc}"), now, result)
            return
        self.db.execute("RELEASE SAVEPOINT audit_record")
        if inserted:
            result.stored += 1
            return
        stored = self.db.query(
            f"SELECT record_sha256 FROM completions WHERE completion_id = {self.db.mark}",
            (done.completion_id,),
        )[0][0]
        if stored == sha:
            result.repeats += 1
            return
        changed = self.db.execute(
            "INSERT INTO conflicts (source_topic, source_partition, source_offset, completion_id, "
            f"record_sha256, stored_sha256, value, detected_at_ms) VALUES ({self.db.marks(8)}) "
            "ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING",
            (*where, done.completion_id, sha, stored, record.value, now),
        )
        result.conflicts += changed
        log.warning(
            "conflict: %s at %s[%d]@%d has sha256 %s, the stored record has %s; kept the stored one",
            done.completion_id,
            *where,
            sha[:16],
            str(stored)[:16],
            extra={"completion_id": done.completion_id, "partition": where[1], "offset": where[2]},
        )

    def _reject(self, record: SourceRecord, sha: str, exc: Rejected, now: int, result: BatchResult) -> None:
        changed = self.db.execute(
            "INSERT INTO rejected (source_topic, source_partition, source_offset, reason, detail, "
            f"record_key, value, record_sha256, rejected_at_ms) VALUES ({self.db.marks(9)}) "
            "ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING",
            (
                record.topic,
                record.partition,
                record.offset,
                exc.reason,
                _clean(exc.detail),
                record.key,
                record.value,
                sha,
                now,
            ),
        )
        result.rejected += changed
        log.warning(
            "rejected %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            exc.reason,
            _clean(exc.detail, 300),
            extra={"reason": exc.reason, "partition": record.partition, "offset": record.offset},
        )

    @staticmethod
    def _row(
        done: DoneRecord, raw: dict[str, Any], record: SourceRecord, sha: str, now: int
    ) -> tuple[Any, ...]:
        completion = done.completion
        request = done.request or {}
        model = completion.model if completion is not None else request.get("model")
        return (
            done.completion_id,
            done.status,
            model if isinstance(model, str) else None,
            completion.created if completion is not None else None,
            _json(raw.get("error")),
            _json(raw.get("usage")),
            done.usage_reported,
            _json(raw.get("request")),
            _json(raw.get("completion")),
            _json(raw["timing"]),
            _json(raw["anomalies"]),
            done.chunk_count,
            done.event_count,
            done.timing.first_chunk_at_ms,
            done.timing.last_chunk_at_ms,
            record.topic,
            record.partition,
            record.offset,
            sha,
            now,
            done.version,
            _json(raw.get("truncated")),
        )
