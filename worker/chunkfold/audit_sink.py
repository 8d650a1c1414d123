"""``chunkfold audit-sink``: store every ``completion-done`` record in a database, exactly once.

The sink consumes the done topic as a consumer group (``enable_auto_commit=False``,
``isolation_level=read_committed``) and, for each batch, in ONE database transaction:

* parses each record with :func:`chunkfold_schemas.done.parse_done`; a record that does not parse or
  validate (or whose key is not its ``completion_id``, or that the database cannot hold) goes
  to ``rejected`` with the reason, and the sink carries on;
* inserts it into ``completions`` with ``INSERT ... ON CONFLICT (completion_id) DO NOTHING``;
  a repeat with the same SHA-256 is an identical redelivery (counted, nothing written), a
  different record for a stored id goes to ``conflicts`` (logged, the stored row is kept);
* moves ``sink_offsets`` (topic, partition, next_offset) forward;

then commits the database transaction, and only then commits the offsets to Kafka. On every
assignment each partition is sought to the offset stored in the database when that is ahead of
Kafka's committed offset, so a crash between the two commits neither duplicates nor loses;
records below the stored offset are skipped in any case (``skipped`` in the batch line).

SQLite (stdlib ``sqlite3``) by default, PostgreSQL (``psycopg`` 3) by URL; a small adapter
(:class:`Database`) lets the same SQL serve both, each statement written with the driver's own
parameter marker. The schema is versioned: on start the sink applies the :data:`MIGRATIONS` the
database lacks (``schema_migrations`` records them), so tables of an earlier release are
brought up to date instead of failing the first insert.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import logging.config
import os
import signal
import sqlite3
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import ValidationError

from chunkfold.config import Settings
from chunkfold_schemas.done import DoneRecord, parse_done

DEFAULT_DATABASE = "sqlite:///.cache/audit.sqlite3"
DEFAULT_GROUP = "chunkfold-audit"
DEFAULT_BATCH = 500
# Test hook: exit (status 137, as after SIGKILL) right after the N-th database commit, before
# the Kafka offsets of that batch are committed.
CRASH_ENV = "CHUNKFOLD_AUDIT_CRASH_AFTER_DB_COMMIT"

log = logging.getLogger("chunkfold.audit")


class DatabaseUrlError(ValueError):
    """A ``--database`` URL the sink cannot use."""


class SchemaTooNew(RuntimeError):
    """The database's schema is at a version this sink does not know (a newer release made it)."""


# --------------------------------------------------------------------------------------------
# Database adapter: the SQL is written once with the adapter's parameter marker and column types.
# --------------------------------------------------------------------------------------------


class Database(ABC):
    """One connection; transactions are explicit (``begin`` / ``commit`` / ``rollback``).

    Statements carry the driver's own parameter marker (:attr:`mark`) where a value goes and
    are passed to the driver unchanged: no statement text is ever rewritten, so a ``?`` or
    ``%s`` elsewhere in SQL (a string literal, an operator) keeps its meaning."""

    dialect: str
    #: the driver's parameter marker: sqlite3's ``?`` (qmark), psycopg's ``%s`` (format)
    mark: str
    json_type: str
    bool_type: str
    blob_type: str
    #: errors meaning "this value cannot be stored" (not "the database is unwell")
    data_errors: tuple[type[Exception], ...]

    def marks(self, count: int) -> str:
        """``count`` parameter markers, comma-separated (for a ``VALUES`` list)."""
        return ", ".join([self.mark] * count)

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query; all its rows."""

    @abstractmethod
    def begin(self) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def rollback(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def lock_schema(self) -> None:
        """Serialise concurrent schema creation (inside the current transaction)."""


class SqliteDatabase(Database):
    dialect = "sqlite"
    mark = "?"
    json_type = "TEXT"
    bool_type = "INTEGER"
    blob_type = "BLOB"
    data_errors = (OverflowError, sqlite3.DataError)

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
        # check_same_thread=False: statements run in a worker thread, one at a time.
        self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.conn.execute(sql, tuple(params)).fetchall()]

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def lock_schema(self) -> None:
        """BEGIN IMMEDIATE already holds the database's write lock."""


class PostgresDatabase(Database):
    dialect = "postgresql"
    mark = "%s"
    # json, not jsonb: kept as sent (key order, numbers) and any valid JSON fits (jsonb refuses
    # "\u0000"); cast to jsonb in queries or indexes where needed.
    json_type = "JSON"
    bool_type = "BOOLEAN"
    blob_type = "BYTEA"

    def __init__(self, url: str) -> None:
        import psycopg

        self.data_errors = (psycopg.DataError,)
        self.conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(url, autocommit=False)

    @staticmethod
    def _params(params: Sequence[Any]) -> tuple[Any, ...] | None:
        """None for a statement without parameters: psycopg then reads no markers in it at all
        (with parameters, a literal ``%`` is written ``%%``, as psycopg documents)."""
        return tuple(params) if params else None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur:
            cur.execute(sql, self._params(params))
            return cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, self._params(params))
            return list(cur.fetchall())

    def begin(self) -> None:
        """psycopg opens the transaction with the first statement."""

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def lock_schema(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(hashtext('chunkfold-audit-schema'))")


def connect(url: str) -> Database:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path``, ``sqlite://`` (in memory) or
    ``postgresql://user[:password]@host[:port]/dbname[?options]`` (libpq URI)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        rest = url[len("sqlite://") :] if url.startswith("sqlite://") else None
        if rest is None:
            raise DatabaseUrlError(f"{url}: write sqlite:///relative/path or sqlite:////absolute/path")
        if rest in ("", "/:memory:"):
            return SqliteDatabase(":memory:")
        if not rest.startswith("/") or rest == "/":
            raise DatabaseUrlError(f"{url}: write sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteDatabase(rest[1:])
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return PostgresDatabase("postgresql" + url[len(scheme) :])
    raise DatabaseUrlError(f"{redact(url)}: unsupported database (use sqlite:///PATH or postgresql://...)")


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------
# The audit store: schema, batch writes, stored offsets. No Kafka here.
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


# --------------------------------------------------------------------------------------------
# The Kafka side.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkConfig:
    database: str
    group: str
    topic: str
    batch: int
    bootstrap_servers: str
    partitions: int
    replication_factor: int
    crash_after_db_commits: int = 0


def _rebalance_listener(sink: AuditSink) -> Any:
    from aiokafka.abc import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            await sink.on_revoked(revoked)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await sink.on_assigned(assigned)

    return Listener()


class AuditSink:
    def __init__(self, config: SinkConfig, store: AuditStore) -> None:
        self.config = config
        self.store = store
        # Serialises database access (one connection, used from worker threads) and keeps a
        # rebalance from revoking partitions in the middle of a batch.
        self.lock = asyncio.Lock()
        self.consumer: Any = None
        self.stop = asyncio.Event()
        self.db_commits = 0
        self.batches = 0
        # offsets sought from the database, to be committed to Kafka (outside the listener)
        self.realign: dict[Any, int] = {}

    async def on_revoked(self, revoked: Any) -> None:
        gone = set(revoked)
        async with self.lock:  # wait for the batch in progress
            self.realign = {tp: o for tp, o in self.realign.items() if tp not in gone}
        if revoked:
            log.info("revoked %s", _partitions(revoked))

    async def on_assigned(self, assigned: Any) -> None:
        tps = sorted((tp for tp in assigned if tp.topic == self.config.topic), key=lambda tp: tp.partition)
        log.info("assigned %s", _partitions(tps))
        async with self.lock:
            stored = await asyncio.to_thread(
                self.store.stored_offsets, self.config.topic, [tp.partition for tp in tps]
            )
            for tp in tps:
                db_next = stored.get(tp.partition)
                if db_next is None:
                    continue
                committed = await self.consumer.committed(tp)
                if committed is None or db_next > committed:
                    # The database committed a batch whose Kafka commit never happened.
                    self.consumer.seek(tp, db_next)
                    self.realign[tp] = db_next
                    log.info(
                        "resume %s[%d] at offset %d from the database (Kafka committed %s)",
                        tp.topic,
                        tp.partition,
                        db_next,
                        committed,
                    )
                elif db_next < committed:
                    log.warning(
                        "%s[%d]: Kafka committed %d is ahead of the database's %d; following Kafka",
                        tp.topic,
                        tp.partition,
                        committed,
                        db_next,
                    )

    async def commit_kafka(self, offsets: dict[Any, int]) -> None:
        from aiokafka.errors import KafkaError

        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # rebalanced away, coordinator moved: the database has them
            log.warning("Kafka offset commit failed (%s); the database holds the offsets", exc)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        from chunkfold.kafka_io import ensure_topics

        cfg = self.config
        await ensure_topics(cfg.bootstrap_servers, [cfg.topic], cfg.partitions, cfg.replication_factor)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group,
            client_id="chunkfold-audit-sink",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self.consumer.subscribe([cfg.topic], listener=_rebalance_listener(self))
        await self.consumer.start()
        log.info(
            "audit-sink: %s (group %s) -> %s, batches of up to %d",
            cfg.topic,
            cfg.group,
            redact(cfg.database),
            cfg.batch,
        )
        try:
            while not self.stop.is_set():
                if self.realign:  # offsets sought from the database: tell Kafka too
                    realign, self.realign = self.realign, {}
                    await self.commit_kafka(realign)
                fetched = await self.consumer.getmany(timeout_ms=500, max_records=cfg.batch)
                records = [
                    SourceRecord(tp.topic, tp.partition, m.offset, m.key, m.value)
                    for tp, messages in sorted(fetched.items(), key=lambda kv: kv[0].partition)
                    for m in messages
                ]
                if not records:
                    continue
                started = time.monotonic()
                async with self.lock:
                    result = await asyncio.to_thread(self.store.write_batch, records)
                    self.db_commits += 1
                    # This batch's commit supersedes a pending realignment (never go back).
                    for partition in result.next_offsets:
                        self.realign.pop(TopicPartition(cfg.topic, partition), None)
                    if cfg.crash_after_db_commits and self.db_commits >= cfg.crash_after_db_commits:
                        log.error(
                            "%s=%d: exiting after database commit %d, before the Kafka offset commit",
                            CRASH_ENV,
                            cfg.crash_after_db_commits,
                            self.db_commits,
                        )
                        logging.shutdown()
                        os._exit(137)
                db_ms = (time.monotonic() - started) * 1000
                await self.commit_kafka(
                    {TopicPartition(cfg.topic, p): o for p, o in result.next_offsets.items()}
                )
                self.batches += 1
                offsets = ",".join(f"p{p}:{o}" for p, o in sorted(result.next_offsets.items()))
                log.info(
                    "batch=%d records=%d stored=%d repeats=%d conflicts=%d rejected=%d skipped=%d "
                    "offsets=%s db_ms=%.1f",
                    self.batches,
                    result.records,
                    result.stored,
                    result.repeats,
                    result.conflicts,
                    result.rejected,
                    result.skipped,
                    offsets or "-",
                    db_ms,
                )
        finally:
            await self.consumer.stop()
            log.info("audit-sink stopped after %d batches", self.batches)


def _partitions(tps: Iterable[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps) or "nothing"


async def _serve(config: SinkConfig) -> None:
    db = await asyncio.to_thread(connect, config.database)
    try:
        store = AuditStore(db)
        await asyncio.to_thread(store.migrate)
        sink = AuditSink(config, store)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop.set)
        try:
            await sink.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        with contextlib.suppress(Exception):
            db.close()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit-sink", help="store every completion-done record in SQLite or PostgreSQL, exactly once"
    )
    p.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help=f"sqlite:///PATH or postgresql://user@host:port/db (default {DEFAULT_DATABASE})",
    )
    p.add_argument("--group", default=DEFAULT_GROUP, help=f"consumer group (default {DEFAULT_GROUP})")
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"records per database transaction, at most (default {DEFAULT_BATCH})",
    )
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--done-topic", help="topic to consume (default completion-done)")
    p.add_argument("--loglevel", default="info")
    p.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines as JSON (default) or text"
    )
    p.set_defaults(func=cmd_audit_sink)


def cmd_audit_sink(args: argparse.Namespace) -> int:
    settings = Settings.from_env(bootstrap_servers=args.bootstrap_servers, done_topic=args.done_topic)
    if not settings.bootstrap_servers:
        print(
            "chunkfold audit-sink: no Kafka: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers",
            file=sys.stderr,
        )
        return 2
    if args.batch < 1:
        print("chunkfold audit-sink: --batch must be at least 1", file=sys.stderr)
        return 2
    crash = os.environ.get(CRASH_ENV, "").strip()
    config = SinkConfig(
        database=args.database,
        group=args.group,
        topic=settings.done_topic,
        batch=args.batch,
        bootstrap_servers=settings.bootstrap_servers,
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        crash_after_db_commits=int(crash) if crash else 0,
    )
    from chunkfold.app.logs import logging_config

    logging.config.dictConfig(logging_config(args.loglevel, args.log_format))
    from aiokafka.errors import KafkaError

    try:
        asyncio.run(_serve(config))
    except DatabaseUrlError as exc:
        print(f"chunkfold audit-sink: {exc}", file=sys.stderr)
        return 2
    except SchemaTooNew as exc:
        log.error("%s", exc)
        return 2
    except KafkaError as exc:
        log.error("Kafka error: %s: %s", type(exc).__name__, exc)
        return 1
    except database_errors() as exc:
        # Nothing of the failed batch is committed, neither in the database nor in Kafka:
        # a restart takes it up again.
        log.error("database error: %s: %s", type(exc).__name__, exc)
        return 1
    return 0


def database_errors() -> tuple[type[Exception], ...]:
    """Errors of either database client (the sink exits 1 on them; a restart resumes)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)
