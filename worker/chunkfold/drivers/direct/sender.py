"""``BatchSender``: the direct driver's at-least-once producer path, batches built here and
handed to aiokafka's producer by a background task (performance-tuned: no per-record future)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from chunkfold.drivers.partitions import KeyPartitions

TrackedBatch = tuple[int, Any, asyncio.Future[Any]]
"""(partition, batch, delivery future) of a batch handed to a producer."""


class TrackedBatches:
    """Batches of some topics handed to a producer, kept with their partition and delivery
    future until taken: how the driver learns the offsets its records got (the changelog's for
    the local copy, the events topic's for the positions ``Processor.note_events_position``
    keeps)."""

    def __init__(self, topics: Iterable[str]) -> None:
        self.batches: dict[str, list[TrackedBatch]] = {topic: [] for topic in topics}

    def handed(self, topic: str, partition: int, batch: Any, future: asyncio.Future[Any]) -> None:
        """``batch`` went to the producer; kept if its topic is tracked."""
        kept = self.batches.get(topic)
        if kept is not None:
            kept.append((partition, batch, future))

    def take(self, topic: str) -> list[TrackedBatch]:
        """The batches of ``topic`` handed over since the last call."""
        taken, self.batches[topic] = self.batches[topic], []
        return taken


def delivered_ends(batches: Iterable[TrackedBatch]) -> dict[int, int]:
    """Per partition, the offset after the last record of its delivered batches: a batch's base
    offset (its delivery report) plus its record count (final once the producer built it).
    Batches not delivered, yet or at all, are left out."""
    ends: dict[int, int] = {}
    for partition, batch, future in batches:
        if not future.done() or future.cancelled() or future.exception() is not None:
            continue
        metadata = future.result()
        if metadata is None or metadata.offset is None or metadata.offset < 0:
            continue
        ends[partition] = max(ends.get(partition, 0), metadata.offset + batch.record_count())
    return ends


class BatchSender:
    """Sends records in batches built here, the way ``producer.send`` batches them but without
    its per-record future and partitioner call. Per topic partition there is one open batch; a
    new one is handed to the producer by a background task (so processing never waits for the
    hand-over) and stays open after that: records keep joining it until the producer builds it
    for a produce request (then ``append`` returns None and the next record opens a new batch).
    So a record goes out with the next produce request to its broker, never queued behind a
    batch of its own partition (aiokafka sends one batch per partition per request).

    Requires a producer without idempotence or transactions (aiokafka numbers an idempotent
    batch when it takes it from its queue, before building it). Keys map to partitions as
    aiokafka's default partitioner (murmur2) maps them, computed once per key."""

    def __init__(self, producer: AIOKafkaProducer, *, tracked_topics: Iterable[str] = ()) -> None:
        self.producer = producer
        self.partitions = KeyPartitions()
        self.open: dict[tuple[str, int], Any] = {}
        self.new: list[tuple[tuple[str, int], Any]] = []
        """Batches opened and not yet handed over, in the order they were opened."""
        self.in_flight: list[asyncio.Future[Any]] = []
        self.wakeup = asyncio.Event()
        self.requested = 0
        """Hand-overs asked for by ``kick``; ``handed`` counts those done."""
        self.handed = 0
        self.progress = asyncio.Condition()
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self.tracked = TrackedBatches(tracked_topics)
        """Batches of these topics are also kept with their partition and future for
        ``take_tracked``."""

    async def start(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.partitions.counts[topic] = len(await self.producer.partitions_for(topic))
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def add(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        partition: int | None = None,
        *,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> Any:
        """Append a record (``partition`` None: the key's); it is sent after the next ``kick``.
        Returns the batch it joined."""
        if partition is None:
            partition = self.partitions(topic, key)
        tp = (topic, partition)
        batch = self.open.get(tp)
        # aiokafka's own send passes milliseconds here (its docstring says seconds)
        if (
            batch is None
            or batch.append(timestamp=timestamp_ms, key=key, value=value, headers=headers) is None
        ):
            batch = self.open[tp] = self.producer.create_batch()
            self.new.append((tp, batch))
            if batch.append(timestamp=timestamp_ms, key=key, value=value, headers=headers) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")
        return batch

    def kick(self) -> int:
        """Have the background task hand what is built so far to the producer; returns a mark
        for ``take``."""
        self.requested += 1
        self.wakeup.set()
        return self.requested

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            target = self.requested
            try:
                await self._hand_over()
            except (KafkaError, ValueError) as exc:  # reported by ``take``
                self.error = exc
            async with self.progress:
                self.handed = target
                self.progress.notify_all()
            if self.error is not None:
                return

    async def _hand_over(self) -> None:
        """Hand every new batch to the producer (only the background task does, so the batches
        of one partition go out in the order they were opened)."""
        batches, self.new = self.new, []
        for (topic, partition), batch in batches:
            future = await self.producer.send_batch(batch, topic, partition=partition)
            self.in_flight.append(future)
            self.tracked.handed(topic, partition, batch, future)

    async def take(self, mark: int) -> list[asyncio.Future[Any]]:
        """Wait until everything built before ``kick`` returned ``mark`` is handed to the
        producer, then return the futures of every batch handed over since the last ``take``.
        Raises what stopped the background task, if anything did."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.handed >= mark or self.error is not None)
        if self.error is not None:
            raise self.error
        in_flight, self.in_flight = self.in_flight, []
        return in_flight

    def take_tracked(self, topic: str) -> list[TrackedBatch]:
        """(partition, batch, future) of every batch of the tracked ``topic`` handed over since
        the last call."""
        return self.tracked.take(topic)
