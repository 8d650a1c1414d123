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

Records are not sent one by one (aiokafka's ``send`` costs a partitioner call, a future and an
await per record, and made ``exactly_once`` a third of the at-least-once rate): ``add`` appends
a record to a batch built here, one per output partition and transaction, and only a full batch
or a commit hands batches to the producer (``send_batch``, which adds their partitions to the
transaction). A batch is never appended to once handed over, which the producer's sequence
numbers of a transactional batch require.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from chunkfold.drivers.direct.sender import TrackedBatches
from chunkfold.drivers.partitions import KeyPartitions
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
        max_batch_size: int,
        partitions: KeyPartitions,
        tracked_topics: Iterable[str] = (),
    ) -> None:
        self.kafka = kafka
        self.max_batch_size = max_batch_size
        self.partitions = partitions
        """Partition counts of the output topics: where a keyed record goes."""
        self.building: dict[int, dict[tuple[str, int], Any]] = {}
        """Per input partition, the batch being built for each output partition."""
        self.full: dict[int, list[tuple[str, int, Any]]] = {}
        """Per input partition, full batches (topic, partition, batch) not handed over yet."""
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
        self.tracked = TrackedBatches(tracked_topics)
        """Batches of these topics handed over, for their offsets once delivered."""

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
                max_batch_size=self.max_batch_size,
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
            self.building.pop(p, None)
            self.full.pop(p, None)
        await asyncio.gather(*(producer.stop() for producer in gone), return_exceptions=True)

    def add(
        self, partition: int, topic: str, key: bytes, value: bytes | None, *, to_partition: int | None = None
    ) -> bool:
        """Add a record to ``partition``'s transaction (``to_partition`` None: the key's).
        True when a batch filled up: ``hand_over`` should then be awaited before more records
        are added, so that batches waiting here stay few."""
        if to_partition is None:
            to_partition = self.partitions(topic, key)
        building = self.building.setdefault(partition, {})
        batch = building.get((topic, to_partition))
        if batch is not None and batch.append(timestamp=None, key=key, value=value, headers=[]) is not None:
            return False
        filled = batch is not None
        if filled:
            self.full.setdefault(partition, []).append((topic, to_partition, batch))
        batch = building[(topic, to_partition)] = self.producers[partition].create_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=[]) is None:
            raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")
        return filled

    async def hand_over(self, partition: int, *, everything: bool = False) -> None:
        """Give ``partition``'s full batches (``everything``: its open ones too) to its producer,
        in the order they were built, beginning its transaction first if need be."""
        batches = self.full.pop(partition, [])
        if everything:
            batches += [(topic, to, batch) for (topic, to), batch in self.building.pop(partition, {}).items()]
        if not batches:
            return
        producer = self.producers[partition]
        if partition not in self.open:
            await producer.begin_transaction()
            self.open.add(partition)
        for topic, to_partition, batch in batches:
            future = await producer.send_batch(batch, topic, partition=to_partition)
            self.tracked.handed(topic, to_partition, batch, future)

    async def commit(self, offsets: dict[int, int], group_id: str) -> None:
        """Commit each partition's transaction together with its next input offset (a partition
        whose offset moved and that has no records gets a transaction holding just the offset).
        Raises when any commit fails; the worker must then stop without doing anything more."""
        offsets = {p: o for p, o in offsets.items() if self.committed.get(p) != o}

        async def one(partition: int) -> None:
            producer = self.producers[partition]
            await self.hand_over(partition, everything=True)
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

        pending = set(self.open) | set(offsets) | set(self.full) | set(self.building)
        todo = sorted(p for p in pending if p in self.producers)
        results = await asyncio.gather(*(one(p) for p in todo), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        await self.release(list(self.producers))
