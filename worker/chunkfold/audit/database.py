"""The audit sink's database connections: one adapter per driver, SQLite (stdlib ``sqlite3``) and
PostgreSQL (``psycopg`` 3), so that the same SQL serves both.

Invariant: statement text is never rewritten. Each statement is written with the driver's own
parameter marker (:attr:`Database.mark`), so a ``?`` or ``%s`` elsewhere in SQL (a string
literal, an operator) keeps its meaning. Called by :mod:`chunkfold.audit.store` (the SQL) and
:mod:`chunkfold.audit.sink` (opening the connection); knows nothing of Kafka or of records.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class DatabaseUrlError(ValueError):
    """A ``--database`` URL the sink cannot use."""


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


def database_errors() -> tuple[type[Exception], ...]:
    """Errors of either database client (the sink exits 1 on them; a restart resumes)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)
