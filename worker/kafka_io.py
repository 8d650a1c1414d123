"""Small aiokafka helpers shared by ``produce``, ``tail``, the demo, tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from worker.config import Settings


def bootstrap(settings: Settings | None = None) -> str:
    servers = (settings.bootstrap_servers if settings else "") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS", ""
    )
    if not servers:
        raise RuntimeError("no Kafka: set KAFKA_BOOTSTRAP_SERVERS (make kafka-up prints one)")
    return servers


async def ensure_topics(
    servers: str,
    topics: Iterable[str],
    partitions: int,
    replication: int = 1,
    configs: dict[str, str] | None = None,
) -> None:
    """Create ``topics`` with ``partitions`` (and topic ``configs``) where missing; existing
    ones are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(t, partitions, replication, topic_configs=configs) for t in topics if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


def make_producer(servers: str, **options: object) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5, **options)


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def output_consumer(settings: Settings, *, from_beginning: bool) -> AIOKafkaConsumer:
    """A group-less consumer of the three output topics (events, done, dead letters); it reads
    committed records only (with ``exactly_once`` a crashed checkpoint's records never show)."""
    return AIOKafkaConsumer(
        settings.events_topic,
        settings.done_topic,
        settings.deadletter_topic,
        bootstrap_servers=bootstrap(settings),
        auto_offset_reset="earliest" if from_beginning else "latest",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
