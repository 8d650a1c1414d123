"""Shared fixtures: one real Kafka broker per test session (started from the Maven Central
jars by ``deploy/kafka/kafka.py``), or the one ``KAFKA_BOOTSTRAP_SERVERS`` names."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]


def kafka_module() -> ModuleType:
    """``deploy/kafka/kafka.py`` (a script, not a package) loaded as a module."""
    name = "chunkfold_deploy_kafka"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "kafka" / "kafka.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    broker = kafka_module().Broker(run_dir=tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.start()
    finally:
        broker.close()


@pytest.fixture
def workers(kafka: str) -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; stopped (SIGTERM, then SIGKILL) after it."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()
