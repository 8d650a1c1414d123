"""Small aiokafka helpers shared by the worker, ``produce``, ``tail``, the audit sink, the demo,
tests and benchmarks.

``KafkaClients`` is where every client chunkfold creates comes from: the brokers' address with
the security options of the settings (``chunkfold.kafka_security``). The helpers take one, or a
plain ``host:port`` string (PLAINTEXT: tests and benchmarks on the local broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from chunkfold.config import Settings
from chunkfold.kafka_security import client_options


@dataclass(frozen=True)
class KafkaClients:
    """Makes aiokafka clients for ``servers`` with the security ``options`` (``security_protocol``,
    ``ssl_context``, ``sasl_*``) added to each; the same options for all, built once."""

    servers: str
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, settings: Settings) -> KafkaClients:
        """The clients of ``settings`` (raises ``SettingsError`` for an unreadable secret file)."""
        return cls(bootstrap(settings), client_options(settings))

    def consumer(self, *topics: str, **options: Any) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(*topics, bootstrap_servers=self.servers, **self.options, **options)

    def producer(self, **options: Any) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=self.servers, **self.options, **options)

    def admin(self, **options: Any) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(bootstrap_servers=self.servers, **self.options, **options)

    def client(self, **options: Any) -> AIOKafkaClient:
        """A bare client (for requests the admin client does not offer)."""
        return AIOKafkaClient(bootstrap_servers=self.servers, **self.options, **options)


Connection = KafkaClients | str
"""Where a helper connects: ``KafkaClients``, or a ``host:port`` list (PLAINTEXT)."""


def clients(connection: Connection) -> KafkaClients:
    return connection if isinstance(connection, KafkaClients) else KafkaClients(connection)


def bootstrap(settings: Settings | None = None) -> str:
    servers = (settings.bootstrap_servers if settings else "") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS", ""
    )
    if not servers:
        raise RuntimeError("no Kafka: set KAFKA_BOOTSTRAP_SERVERS (make kafka-up prints one)")
    return servers


async def ensure_topics(
    servers: Connection,
    topics: Iterable[str],
    partitions: int,
    replication: int = 1,
    configs: dict[str, str] | None = None,
) -> None:
    """Create ``topics`` with ``partitions`` (and topic ``configs``) where missing; existing
    ones are left alone."""
    admin = clients(servers).admin()
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


async def topic_config(servers: Connection, topics: Iterable[str], name: str) -> dict[str, str]:
    """The value of topic config ``name`` for each of ``topics`` as the brokers report it (the
    topic's own or the broker's default); topics they do not answer for are left out."""
    admin = clients(servers).admin()
    values: dict[str, str] = {}
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {name: None}) for topic in topics]
        )
        for response in responses:
            for resource in response.resources:
                error_code, topic, entries = resource[0], resource[3], resource[4]
                if error_code != 0:
                    continue
                for entry in entries:
                    if entry[0] == name and entry[1] is not None:
                        values[topic] = entry[1]
    except (KafkaError, OSError, ValueError, IndexError, TypeError) as exc:
        logging.getLogger("chunkfold.kafka").warning("describing %s of %s failed: %r", name, topics, exc)
    finally:
        await admin.close()
    return values


async def record_limits(servers: Connection, topics: Iterable[str], cap: int) -> dict[str, int]:
    """The largest record each topic accepts (its ``max.message.bytes``), at most ``cap``; a
    topic whose limit cannot be read gets ``cap``."""
    topics = list(topics)
    reported = await topic_config(servers, topics, "max.message.bytes")
    return {topic: min(cap, int(reported.get(topic, cap))) for topic in topics}


async def partition_counts(servers: Connection, topics: Iterable[str]) -> dict[str, int]:
    """The partition count of each of ``topics`` (which exist) as the brokers' metadata says."""
    producer = clients(servers).producer()
    await producer.start()
    try:
        return {topic: len(await producer.partitions_for(topic)) for topic in topics}
    finally:
        await producer.stop()


def make_producer(servers: Connection, **options: object) -> AIOKafkaProducer:
    return clients(servers).producer(acks="all", linger_ms=5, **options)


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def output_consumer(
    settings: Settings, *, from_beginning: bool, topics: Iterable[str] | None = None
) -> AIOKafkaConsumer:
    """A group-less consumer of the output topics (events, done, dead letters; or ``topics``);
    it reads committed records only (with ``exactly_once`` a crashed checkpoint's records never show)."""
    if topics is None:
        topics = (settings.events_topic, settings.done_topic, settings.deadletter_topic)
    return KafkaClients.of(settings).consumer(
        *topics,
        auto_offset_reset="earliest" if from_beginning else "latest",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
