"""The audit sink's databases as pytest fixtures: one real PostgreSQL server per session (see
:mod:`tests.postgres`) and a new, empty database per test, SQLite and PostgreSQL. A test module
uses them by importing the fixtures it needs (``from tests.database_fixtures import database as
database``, and ``postgres_server`` with it: ``database`` asks for it by name)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, PostgresUnavailable, find_bin_dir, install_with_apt


def unavailable(reason: str) -> None:
    """Skip the test, except in CI, which must run the PostgreSQL tests."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian's package; installed with apt-get when missing and
    running as root) in a temporary directory, on a free localhost port, for the session."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        try:
            install_with_apt()
        except PostgresUnavailable as exc:
            unavailable(str(exc))
        bin_dir = find_bin_dir()
        if bin_dir is None:
            unavailable("apt-get installed postgresql but no initdb/pg_ctl under /usr/lib/postgresql/*/bin")
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        try:
            server.start()
        except PostgresUnavailable as exc:
            unavailable(str(exc))
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a new, empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
