"""Exactly-once output for the direct driver: Kafka transactions, one per owned input partition.

Each input partition this worker owns gets its own transactional producer, with the
transactional id ``<app id>-<input topic>-<partition>``. Starting it fences every earlier
producer with that id (a crashed or stalled previous owner of the partition can no longer
commit) and aborts the transaction it left open. Everything a partition's records cause, its
outputs, its state writes to the changelog and its input offset, goes into that partition's
transaction, and a checkpoint commits them together: a ``read_committed`` consumer sees either
all of a checkpoint's records or none, so a crash, rebalance or broker failure repeats nothing.

(aiokafka commits offsets in a transaction without the consumer group's generation, so fencing
relies on the transactional id being per partition, as Faust and pre-KIP-447 Kafka Streams do.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, TopicPartition

from chunkfold.kafka_io import KafkaClients

TRANSACTION_TIMEOUT_MS = 60_000


def transactional_id(app_id: str, input_topic: str, partition: int) -> str:
    return f"{app_id}-{input_topic}-{partition}"


class PartitionTransactions:
    """The transactional producers of the owned input partitions and their open transactions."""

    def __init__(
        self,
        kafka: KafkaClients,
        app_id: str,
        input_topic: str,
        *,
        request_timeout_ms: int,
        linger_ms: int,
        max_request_size: int,
    ) -> None:
        self.kafka = kafka
        self.app_id = app_id
        self.input_topic = input_topic
        self.request_timeout_ms = request_timeout_ms
        self.linger_ms = linger_ms
        self.max_request_size = max_request_size
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.open: set[int] = set()
        """Partitions whose transaction has begun and is not committed yet."""
        self.committed: dict[int, int] = {}
        """The input offset last committed per partition (by this worker)."""

    async def own(self, partitions: Iterable[int]) -> None:
        """Start a producer for each partition (fencing its previous owner); before its state is
        read back, so that nothing the previous owner left uncommitted is pending any more."""
        new = [p for p in partitions if p not in self.producers]
        producers = {
            p: self.kafka.producer(
                transactional_id=transactional_id(self.app_id, self.input_topic, p),
                transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
                request_timeout_ms=self.request_timeout_ms,
                linger_ms=self.linger_ms,
                max_request_size=self.max_request_size,
            )
            for p in new
        }
        try:
            await asyncio.gather(*(producer.start() for producer in producers.values()))
        finally:
            self.producers.update(producers)

    async def release(self, partitions: Iterable[int]) -> None:
        """Stop the producers of ``partitions`` (after their last commit); an open transaction
        is aborted by the next owner's fencing."""
        partitions = list(partitions)
        gone = [self.producers.pop(p) for p in partitions if p in self.producers]
        self.open.difference_update(partitions)
        for p in partitions:
            self.committed.pop(p, None)
        await asyncio.gather(*(producer.stop() for producer in gone), return_exceptions=True)

    async def send(
        self, partition: int, topic: str, key: bytes, value: bytes | None, *, to_partition: int | None = None
    ) -> None:
        """Add a record to ``partition``'s transaction (``to_partition`` None: the key's)."""
        producer = self.producers[partition]
        if partition not in self.open:
            await producer.begin_transaction()
            self.open.add(partition)
        await producer.send(topic, value, key=key, partition=to_partition)

    async def commit(self, offsets: dict[int, int], group_id: str) -> None:
        """Commit each partition's transaction together with its next input offset (a partition
        whose offset moved and that has no records gets a transaction holding just the offset).
        Raises when any commit fails; the worker must then stop without doing anything more."""
        offsets = {p: o for p, o in offsets.items() if self.committed.get(p) != o}

        async def one(partition: int) -> None:
            producer = self.producers[partition]
            if partition not in self.open:
                await producer.begin_transaction()
                self.open.add(partition)
            if partition in offsets:
                tp = TopicPartition(self.input_topic, partition)
                await producer.send_offsets_to_transaction({tp: offsets[partition]}, group_id)
            await producer.commit_transaction()
            self.open.discard(partition)
            if partition in offsets:
                self.committed[partition] = offsets[partition]

        todo = sorted(p for p in set(self.open) | set(offsets) if p in self.producers)
        results = await asyncio.gather(*(one(p) for p in todo), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        await self.release(list(self.producers))
