"""Publish gateway records to the input topic as a gateway would (``chunkfold produce``, the demo, tests)."""

from __future__ import annotations

import asyncio
import time

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord
from chunkfold.kafka_checks import guarded, require_topics
from chunkfold.kafka_io import KafkaClients, ensure_topics, make_producer, sleep_until


async def publish(
    settings: Settings, records: list[GatewayRecord], rate: float = 0.0, topic: str | None = None
) -> int:
    """Send ``records`` in order to ``topic`` (default: the input topic, created if missing),
    ``rate`` records per second (0: as fast as possible); the count sent once all are acknowledged.
    With ``create_topics`` off the topic is not created. A missing topic, a denied WRITE or a
    failed authentication: ``chunkfold.kafka_checks.StartupError`` (one line), nothing sent."""
    kafka = KafkaClients.of(settings)
    topic = topic or settings.input_topic

    async def prepare() -> None:
        if settings.create_topics:
            await ensure_topics(kafka, [topic], settings.partitions, settings.replication_factor)
        await require_topics(kafka, {topic: ["WRITE", "DESCRIBE"]}, create_topics=settings.create_topics)

    await guarded(prepare(), kafka, settings)
    producer = make_producer(kafka)
    await guarded(producer.start(), kafka, settings)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for i, r in enumerate(records):
            if rate > 0:
                await sleep_until(start + i / rate)
            await producer.send(
                topic, r.value, key=r.key, headers=r.headers, timestamp_ms=int(time.time() * 1000)
            )
        await producer.flush()
    finally:
        await producer.stop()
    return len(records)
