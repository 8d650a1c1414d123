"""Checkpoints of the direct driver: how the outputs, state writes and input offsets of the
records processed so far become durable, every ``commit_interval_s`` and before partitions are
given up. One interface, ``Checkpointer``, with one implementation per processing guarantee,
chosen at construction:

* ``OrderedCheckpointer`` (``at_least_once``), write-behind: sweep idle completions and capture
  the changed state, the sends made so far and the offsets of every record processed so far.
  Then, while the next records are processed: wait until every captured send is acknowledged by
  the brokers (``acks=all``), only then write the captured state to the changelog and wait for
  that, and only then commit the captured offsets. So state never gets ahead of the outputs it
  covers, a committed offset never passes a record whose outputs or state are not durable, and
  processing does not stop for the round trips. Checkpoints are strictly sequential.
* ``TransactionalCheckpointer`` (``exactly_once``): outputs, state writes and the input offset
  of each partition go into that partition's Kafka transaction (``transactions.py``), and a
  checkpoint commits them together; processing waits for it.

A delivery failure stops the worker (``stopping``) without committing: the records are
redelivered to whoever owns the partitions next, and the replay rules make that idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from chunkfold.config import Settings
from chunkfold.drivers.direct.recovery import LocalCopy
from chunkfold.drivers.direct.sender import BatchSender, TrackedBatch, delivered_ends
from chunkfold.drivers.direct.transactions import PartitionTransactions
from chunkfold.processor import FlushBatch, Output, Processor
from chunkfold.state.changelog import ChangelogStore, changelog_topic

log = logging.getLogger("chunkfold.worker")

CommitOffsets = Callable[[dict[TopicPartition, int]], Awaitable[Any]]
"""The group consumer's offset commit."""


class DeliveryFailed(RuntimeError):
    """An output or state write was not acknowledged by the brokers."""


class Captured(NamedTuple):
    """What one ordered checkpoint makes durable: the outputs built before ``mark``, then the
    state writes ``flush``, then the input ``offsets``."""

    mark: int
    flush: FlushBatch
    offsets: dict[TopicPartition, int]


class Checkpointer(ABC):
    """Makes processed records durable. The worker hands it each record's outputs (``send``)
    and each batch's next offset (``processed``), starts a checkpoint when one is ``due`` and
    waits for a ``complete`` one before partitions are given up and at shutdown. The worker
    calls it holding its lock; only an ordered checkpoint's settling runs outside the lock."""

    def __init__(
        self, processor: Processor, store: ChangelogStore, settings: Settings, stopping: asyncio.Event
    ) -> None:
        self.processor = processor
        self.store = store
        self.settings = settings
        self.stopping = stopping
        """Set on a failure: the worker stops."""
        self.changelog = changelog_topic(settings)
        self.failure: DeliveryFailed | None = None
        """What stopped the worker; once set, nothing more is written or committed."""
        self.next_offsets: dict[int, int] = {}
        """Per input partition, the offset after the last record processed."""
        self.last_checkpoint = time.monotonic()

    @abstractmethod
    def send(self, partition: int, outputs: list[Output]) -> Awaitable[None] | None:
        """Send the outputs of one record of ``partition``. None when they are queued (no await
        on the hot path); otherwise an awaitable to await before the next record."""

    def processed(self, partition: int, next_offset: int) -> None:
        """Every record of ``partition`` before ``next_offset`` is processed."""
        self.next_offsets[partition] = next_offset

    def _interval_passed(self) -> bool:
        return time.monotonic() - self.last_checkpoint >= self.settings.commit_interval_s

    @abstractmethod
    def due(self) -> bool:
        """Whether the worker should ``begin`` a checkpoint now."""

    @abstractmethod
    async def begin(self) -> None:
        """Start a checkpoint of everything processed so far (it may settle in the background)."""

    @abstractmethod
    async def complete(self) -> None:
        """Make everything processed so far durable and commit its offsets; waits for both.
        Raises ``DeliveryFailed`` after a failure."""

    @abstractmethod
    async def own(self, partitions: Iterable[int]) -> None:
        """Newly assigned ``partitions``, before their state is read back."""

    async def release(self, partitions: Iterable[int]) -> None:
        """``partitions`` were given up (after a last ``complete``)."""
        for p in partitions:
            self.next_offsets.pop(p, None)

    @abstractmethod
    async def close(self) -> None:
        """At shutdown, after the last ``complete``."""

    @abstractmethod
    async def between_commits(self) -> None:
        """Return at a moment the processor's state may be read for a query (the query
        listener's snapshots); the caller reads it before it next awaits."""

    def note_events_positions(self, batches: list[TrackedBatch]) -> None:
        """Tell the processor where the delivered ``batches`` of the events topic ended: every
        event it hands over later lands after them (``Processor.note_events_position``)."""
        for partition, end in delivered_ends(batches).items():
            self.processor.note_events_position(partition, end)

    def _fail(self, message: str) -> DeliveryFailed:
        """Record a failure and stop the worker."""
        self.failure = DeliveryFailed(message)
        self.stopping.set()
        return self.failure


class OrderedCheckpointer(Checkpointer):
    """``at_least_once``: outputs, then state, then offsets, each only after the one before is
    acknowledged; settled in the background while the next records are processed."""

    def __init__(
        self,
        processor: Processor,
        store: ChangelogStore,
        settings: Settings,
        stopping: asyncio.Event,
        *,
        sender: BatchSender,
        commit: CommitOffsets,
        local_copy: LocalCopy | None,
    ) -> None:
        super().__init__(processor, store, settings, stopping)
        self.sender = sender
        self.add = sender.add
        self.commit = commit
        self.local_copy = local_copy
        """Where acknowledged state writes are also kept (``rocksdb://``), if anywhere."""
        self.settling: asyncio.Future[None] | None = None
        """The checkpoint settling in the background, if any."""

    def send(self, partition: int, outputs: list[Output]) -> None:
        add = self.add
        for o in outputs:
            add(o.topic, o.key, o.value)

    def due(self) -> bool:
        """The interval has passed and the previous checkpoint has settled (commits stay in
        order; while the brokers are slow, checkpoints simply cover more records)."""
        return self._interval_passed() and (self.settling is None or self.settling.done())

    async def begin(self) -> None:
        """Capture now; settle in the background (``settling``)."""
        self.settling = asyncio.ensure_future(self.settle(self.capture()))

    async def complete(self) -> None:
        await self._settled()
        await self.begin()
        await self._settled()

    async def own(self, partitions: Iterable[int]) -> None:
        """Nothing to fence: at least once uses no transactions."""

    async def between_commits(self) -> None:
        """Any moment: queries read the processor's memory, which a checkpoint only copies."""

    async def close(self) -> None:
        """Nothing to close: the sender and the consumer belong to the worker."""

    def capture(self) -> Captured:
        """Sweep, and take what the next checkpoint covers: the state writes of every changed
        completion, the offsets of every record processed so far, and the sender's mark for
        the batches holding their outputs. Does not wait."""
        self.last_checkpoint = time.monotonic()
        for o in self.processor.sweep():
            self.sender.add(o.topic, o.key, o.value)
        flush = self.processor.capture()
        offsets = {
            TopicPartition(self.settings.input_topic, p): offset
            for p, offset in self.next_offsets.items()
            if p in self.processor.assigned
        }
        return Captured(self.sender.kick(), flush, offsets)

    async def settle(self, captured: Captured) -> None:
        """Make a captured checkpoint durable, in the order the ``Processor`` requires: wait
        until every output built before the capture is acknowledged, only then write the
        captured state to the changelog and wait for that, then commit the captured offsets.
        (State written before its outputs were durable could make a redelivered record look
        already applied after a crash, and its outputs would be lost.) On a failure: record
        it, stop the worker, and write or commit nothing more."""
        if not await self._delivered(captured.mark):
            return
        self.note_events_positions(self.sender.take_tracked(self.settings.events_topic))
        self.processor.apply(captured.flush)
        written = self.store.take_outbox()
        local = self.local_copy
        counts: dict[Any, int] = {}
        """Changelog records per batch (for the local copy's offsets)."""
        stamp = time.time()  # before any of these records can reach the changelog
        for partition, key, value in written:
            batch = self.sender.add(self.changelog, key.encode("utf-8"), value, partition)
            if local is not None:
                counts[batch] = counts.get(batch, 0) + 1
        if not await self._delivered(self.sender.kick()):
            return
        if local is not None and written:
            local.keep(written, counts, self.sender.take_tracked(self.changelog), stamp)
        if not captured.offsets:
            return
        try:
            await self.commit(captured.offsets)
        except (KafkaError, IllegalStateError) as exc:
            log.warning("offset commit failed (%r); the records will be redelivered", exc)

    async def _delivered(self, mark: int) -> bool:
        """Wait until the batches built before ``mark`` are handed over and every batch handed
        over is acknowledged; False (and the worker stopping) when any of that failed."""
        try:
            in_flight = await self.sender.take(mark)
        except (KafkaError, ValueError) as exc:
            self._fail(f"handing records to the producer failed: {exc!r}")
            return False
        failed = 0
        first: BaseException | None = None
        for future in in_flight:
            if not future.done():
                await asyncio.wait([future])
            error = future.exception()
            if error is not None:
                failed += 1
                first = first or error
        if first is not None:
            self._fail(f"{failed} of {len(in_flight)} sends failed: {first!r}")
            return False
        return True

    async def _settled(self) -> None:
        """Wait for the checkpoint in progress, if any; raise ``DeliveryFailed`` after a failure."""
        if self.settling is not None:
            settling, self.settling = self.settling, None
            await settling
        if self.failure is not None:
            raise self.failure


class TransactionalCheckpointer(Checkpointer):
    """``exactly_once``: each owned input partition's outputs, state writes and next offset are
    committed together in its own transaction; processing waits for the commits (a partition's
    next transaction cannot begin before this one is committed)."""

    def __init__(
        self,
        processor: Processor,
        store: ChangelogStore,
        settings: Settings,
        stopping: asyncio.Event,
        *,
        transactions: PartitionTransactions,
    ) -> None:
        super().__init__(processor, store, settings, stopping)
        self.transactions = transactions
        self.committing = False
        """A checkpoint is in progress: the store already holds state its transactions have
        not committed yet."""
        self.commit_over = asyncio.Condition()

    async def between_commits(self) -> None:
        """Return at a moment no checkpoint is in progress, so the store holds exactly what was
        last committed (``complete`` applies a checkpoint's state to the store, then commits):
        the query listener's exactly_once snapshots. Read the store before the next await."""
        async with self.commit_over:
            await self.commit_over.wait_for(lambda: not self.committing)

    def send(self, partition: int, outputs: list[Output]) -> Awaitable[None] | None:
        add = self.transactions.add
        filled = False
        for o in outputs:
            filled |= add(partition, o.topic, o.key, o.value)
        return self.transactions.hand_over(partition) if filled else None

    def due(self) -> bool:
        return self._interval_passed()

    async def begin(self) -> None:
        await self.complete()

    async def complete(self) -> None:
        """Sweep, add the expired completions' outputs and every changed completion's state
        writes to their partitions' transactions, and commit each with its next input offset.
        A failed commit stops the worker: what was not committed is aborted and redone by the
        next owner."""
        if self.failure is not None:
            raise self.failure
        self.committing = True
        try:
            await self._commit()
        finally:
            async with self.commit_over:
                self.committing = False
                self.commit_over.notify_all()

    async def _commit(self) -> None:
        self.last_checkpoint = time.monotonic()
        processor, transactions = self.processor, self.transactions
        try:
            for o in processor.sweep():
                transactions.add(processor.tracked[o.key.decode("utf-8")].partition, o.topic, o.key, o.value)
            processor.apply(processor.capture())
            for partition, key, value in self.store.take_outbox():
                transactions.add(
                    partition, self.changelog, key.encode("utf-8"), value, to_partition=partition
                )
            offsets = {p: o for p, o in self.next_offsets.items() if p in processor.assigned}
            await transactions.commit(offsets, self.settings.app_id)
        except Exception as exc:
            raise self._fail(f"committing a transaction failed: {exc!r}") from exc
        self.note_events_positions(transactions.tracked.take(self.settings.events_topic))

    async def own(self, partitions: Iterable[int]) -> None:
        """Fence the partitions' previous owners first: their open transactions are aborted,
        so the state read back next is final."""
        await self.transactions.own(partitions)

    async def release(self, partitions: Iterable[int]) -> None:
        partitions = list(partitions)
        await super().release(partitions)
        await self.transactions.release(partitions)

    async def close(self) -> None:
        await self.transactions.close()
