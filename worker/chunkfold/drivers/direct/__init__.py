"""The direct driver: the ``Processor`` on aiokafka in batches (``worker.py``), with its
producer path (``sender.py``), checkpoints (``checkpoint.py``, ``transactions.py``) and state
recovery (``recovery.py``). Entry point: ``run(settings)``."""

from __future__ import annotations

import asyncio
import logging

from chunkfold.config import Settings
from chunkfold.drivers.direct.worker import run_worker
from chunkfold.kafka_io import KafkaClients

log = logging.getLogger("chunkfold.worker")


def run(settings: Settings, kafka: KafkaClients) -> int:
    """Run a direct-driver worker until it is stopped; non-zero when a delivery failed (or the
    cluster refused something the worker needs: ``StartupError``, raised)."""
    from chunkfold.kafka_checks import guarded

    failure = asyncio.run(guarded(run_worker(settings, kafka), kafka, settings))
    if failure is not None:
        log.error("stopping without committing: %s", failure)
        return 1
    return 0
