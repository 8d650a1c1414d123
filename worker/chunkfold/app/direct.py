"""The direct driver: the ``Processor`` on a plain aiokafka consumer and producer, in batches.

Faust hands a stream one event at a time through several layers of queues, sensors and
acknowledgement bookkeeping; that costs about ten times what chunkfold itself does per record.
This driver keeps Faust's contract and storage format but drives batches itself:

* input: one group consumer of the input topic (the same group id and committed offsets as
  the Faust driver), ``getmany`` batches, manual commits;
* state: the same changelog topic as the Faust table (``<app id>-state-changelog``, one
  partition per input partition, raw keys and values, ``None`` deletes), read back into memory
  for every partition this worker is assigned, before any of its records is processed;
* write-behind checkpoint, every ``commit_interval_s`` and before partitions are given up:
  sweep idle completions and capture the changed state, the sends made so far and the offsets
  of every record processed so far. Then, while the next records are processed: wait until
  every captured send is acknowledged by the brokers (``acks=all``), only then write the
  captured state to the changelog and wait for that, and only then commit the captured
  offsets. So state never gets ahead of the outputs it covers, a committed offset never passes
  a record whose outputs or state are not durable, and processing does not stop for the
  round trips. Checkpoints are strictly sequential; a rebalance or shutdown waits for them.
* local copy (``CHUNKFOLD_STORE=rocksdb://``; ``memory://`` keeps none): once a checkpoint's
  state writes are acknowledged, the same writes go to a RocksDB database on the worker's
  volume (``worker/chunkfold/app/local_state.py``) together with, per changelog partition, the offset
  after them. A restart or a partition coming back loads those entries and reads the
  changelog only from that offset on (Kafka Streams' checkpoint model); a checkpoint too old
  for the changelog's tombstones, or outside its offsets, means a full read as without it.

A delivery failure stops the worker (non-zero exit) without committing: the records are
redelivered to whoever owns the partitions next, and the replay rules make that idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.partitioner import murmur2

from chunkfold.app.metrics import METRICS_CONTENT_TYPE, render
from chunkfold.app.processor import FlushBatch, MemoryStore, Processor
from chunkfold.app.transactions import PartitionTransactions
from chunkfold.config import Settings
from chunkfold.kafka_io import ensure_topics, record_limits, topic_config

if TYPE_CHECKING:
    from chunkfold.app.local_state import LocalState

log = logging.getLogger("chunkfold.worker")
BATCH_MAX_RECORDS = 2_000
POLL_TIMEOUT_MS = 100
FETCH_MIN_BYTES = 16 * 1024
FETCH_MAX_WAIT_MS = 2
"""A fetch returns once 16 KiB are there or 2 ms have passed: under load that is a few fetches
per 10 ms instead of one per record or two, which costs broker and worker CPU that a busy
machine takes out of latency (measured at 5,000 chunks/s on 2 cores: p99 45-55 ms instead
of 52-78 ms); when idle it adds at most 2 ms."""
PRODUCER_LINGER_MS = 2
PRODUCER_REQUEST_TIMEOUT_MS = 120_000
HAND_OVER_EVERY = 200
"""Records processed between two hand-overs of the built batches to the producer."""
PARTITION_CACHE_SIZE = 100_000
PRODUCER_BATCH_BYTES = 512 * 1024
"""aiokafka keeps one open batch per partition and makes ``send`` wait while it is full, for
a whole produce round trip; completion-done records and state segments are kilobytes each."""
CHANGELOG_DELETE_RETENTION_MS = 86_400_000
"""``delete.retention.ms`` of the changelog when this driver creates it (Kafka's default, set
explicitly): compaction may remove a tombstone once it is that old."""
RESTORE_YIELD_EVERY = 10_000
"""Entries loaded from the local copy between two yields to the event loop (heartbeats)."""


def local_checkpoint_max_age_s(delete_retention_ms: int) -> float:
    """How old a local checkpoint may be and still be used: half the changelog's
    ``delete.retention.ms``. A tombstone written after the checkpoint stays in the changelog
    at least that long, so the tail read from the checkpoint still deletes what it deleted
    (the other half is margin for clock differences and the time a restore takes)."""
    return delete_retention_ms / 2000


def changelog_topic(settings: Settings) -> str:
    """The state changelog: the same topic a Faust table named ``state`` uses."""
    return f"{settings.app_id}-state-changelog"


def keeps_local_state(settings: Settings) -> bool:
    """Whether this driver keeps a local copy of its state (in ``data_dir``): with a
    ``rocksdb://`` store; ``memory://`` (the default) opens no local database."""
    return settings.store.startswith("rocksdb://")


async def changelog_delete_retention_ms(servers: str, topic: str) -> int | None:
    """The topic's ``delete.retention.ms`` as the brokers report it; None when it cannot be read."""
    value = (await topic_config(servers, [topic], "delete.retention.ms")).get(topic)
    return None if value is None else int(value)


class ChangelogStore(MemoryStore):
    """``MemoryStore`` of the assigned partitions' state; its write ``log`` is the outbox of
    changelog records still to send (to the partition of the completion's input partition)."""

    def __init__(self) -> None:
        super().__init__()
        self.partition_of: dict[str, int] = {}

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        super().write(partition, key, value)
        self._place(partition, key, value)

    def load(self, partition: int, key: str, value: bytes | None) -> None:
        """Apply one changelog record read back (not a new write)."""
        self.put(key, value)
        self._place(partition, key, value)

    def _place(self, partition: int, key: str, value: bytes | None) -> None:
        if value is None:
            self.partition_of.pop(key, None)
        else:
            self.partition_of[key] = partition

    def take_outbox(self) -> list[tuple[int, str, bytes | None]]:
        outbox, self.log = self.log, []
        return outbox

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state and unsent writes of ``partitions`` (given up to another worker)."""
        gone = set(partitions)
        for key in [k for k, p in self.partition_of.items() if p in gone]:
            del self.data[key]
            del self.partition_of[key]
        self.log = [w for w in self.log if w[0] not in gone]


class Checkpoint(NamedTuple):
    """What one checkpoint makes durable: the outputs built before ``mark``, then the state
    writes ``flush``, then the input ``offsets``."""

    mark: int
    flush: FlushBatch
    offsets: dict[TopicPartition, int]


class DeliveryFailed(RuntimeError):
    """An output or state write was not acknowledged by the brokers."""


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

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.partition_counts: dict[str, int] = {}
        self.partition_cache: dict[tuple[int, bytes], int] = {}
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
        self.tracked_topic: str | None = None
        """Batches of this topic are also kept with their partition and future for
        ``take_tracked`` (the driver's local copy derives changelog offsets from them)."""
        self.tracked: list[tuple[int, Any, asyncio.Future[Any]]] = []

    async def start(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.partition_counts[topic] = len(await self.producer.partitions_for(topic))
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
            partition = self._partition(topic, key)
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

    def _partition(self, topic: str, key: bytes) -> int:
        count = self.partition_counts[topic]
        cached = self.partition_cache.get((count, key))
        if cached is None:
            if len(self.partition_cache) >= PARTITION_CACHE_SIZE:
                self.partition_cache.clear()
            cached = self.partition_cache[(count, key)] = (murmur2(key) & 0x7FFFFFFF) % count
        return cached

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
            if topic == self.tracked_topic:
                self.tracked.append((partition, batch, future))

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

    def take_tracked(self) -> list[tuple[int, Any, asyncio.Future[Any]]]:
        """(partition, batch, future) of every batch of ``tracked_topic`` handed over since the
        last call."""
        tracked, self.tracked = self.tracked, []
        return tracked


class DirectWorker:
    """One consumer-group member running ``processor`` over its partitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ChangelogStore()
        self.processor = Processor(settings, self.store)
        self.changelog = changelog_topic(settings)
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.restoring = False
        self.failure: DeliveryFailed | None = None
        self.next_offsets: dict[int, int] = {}
        self.settling: asyncio.Future[None] | None = None
        self.last_checkpoint = time.monotonic()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.sender: BatchSender | None = None
        self.local: LocalState | None = None
        """The local copy of the state (``rocksdb://`` store), None without one."""
        self.local_max_age_s = 0.0
        self.restored_local_entries = 0
        self.restored_changelog_records = 0
        self.local_stale: set[int] = set()
        """Partitions whose local copy was dropped (a write's offset unknown): not kept locally
        until their next restore."""
        self.transactions: PartitionTransactions | None = None
        """``exactly_once``: the owned partitions' transactional producers (outputs, state and
        offsets committed together per checkpoint); None: at least once, checkpoints settled
        in order (outputs, then state, then offsets)."""

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until SIGTERM/SIGINT, then checkpoint and leave the group."""
        s = self.settings
        await ensure_topics(
            s.bootstrap_servers,
            [self.changelog],
            s.partitions,
            s.replication_factor,
            configs={
                "cleanup.policy": "compact",
                "delete.retention.ms": str(CHANGELOG_DELETE_RETENTION_MS),
                "max.message.bytes": str(s.max_message_bytes),
            },
        )
        limits = await record_limits(
            s.bootstrap_servers, [*self.processor.limits, self.changelog], s.max_message_bytes
        )
        self.processor.limits.update((topic, limits[topic]) for topic in self.processor.limits)
        # A batch of several records must fit the smallest topic too (one record always fits:
        # the processor cuts each value to its topic's limit, and a batch takes a first record
        # whatever its size).
        batch_bytes = min(PRODUCER_BATCH_BYTES, *limits.values())
        if s.processing_guarantee == "exactly_once":
            self.transactions = PartitionTransactions(
                s.bootstrap_servers,
                s.app_id,
                s.input_topic,
                request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
                linger_ms=PRODUCER_LINGER_MS,
                max_request_size=s.max_message_bytes,
            )
            if keeps_local_state(s):
                log.warning("exactly_once keeps no local state copy: assignments read the whole changelog")
        elif keeps_local_state(s):
            await self._open_local()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            acks="all",
            linger_ms=PRODUCER_LINGER_MS,
            request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
            max_batch_size=batch_bytes,
            max_request_size=s.max_message_bytes,
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.app_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=BATCH_MAX_RECORDS,
            fetch_min_bytes=FETCH_MIN_BYTES,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.consumer.subscribe([s.input_topic], listener=_Rebalance(self))
        web_runner = await self._start_web() if s.web_port > 0 else None
        await self.producer.start()
        self.sender = BatchSender(self.producer)
        await self.sender.start((s.events_topic, s.done_topic, s.deadletter_topic))
        if self.local is not None:
            self.sender.tracked_topic = self.changelog
        await self.consumer.start()
        # Everything allocated so far (modules, clients) lives as long as the process: move it out
        # of the collector's reach, so that a full collection walks only the completions' state
        # (the first one, under the first wave of records, stopped the worker for ~50 ms).
        gc.collect()
        gc.freeze()
        log.info("worker started (direct driver), group %s, input %s", s.app_id, s.input_topic)
        try:
            await self._loop()
        finally:
            if self.failure is None:
                with contextlib.suppress(DeliveryFailed, KafkaError):
                    async with self.lock:
                        await self._checkpoint()
            await self.sender.stop()
            await self.consumer.stop()
            await self.producer.stop()
            if self.transactions is not None:
                await self.transactions.close()
            if self.local is not None:
                self.local.close()
            if web_runner is not None:
                await web_runner.cleanup()
            log.info("worker stopped")

    async def _open_local(self) -> None:
        """Open the local copy, and take its checkpoints' age limit from the changelog's
        ``delete.retention.ms`` as the brokers report it (a topic created elsewhere may set
        its own; when it cannot be read, no checkpoint is trusted)."""
        try:
            from chunkfold.app.local_state import LocalState, local_state_path
        except ImportError as exc:
            raise RuntimeError(
                f"CHUNKFOLD_STORE={self.settings.store} needs rocksdict (pip install 'chunkfold[rocksdb]')"
            ) from exc

        path = local_state_path(self.settings)
        self.local = LocalState(path)
        retention_ms = await changelog_delete_retention_ms(self.settings.bootstrap_servers, self.changelog)
        if retention_ms is None:
            log.warning(
                "could not read delete.retention.ms of %s: the local state at %s is kept but every "
                "restore reads the changelog from the beginning",
                self.changelog,
                path,
            )
            self.local_max_age_s = 0.0
        else:
            self.local_max_age_s = local_checkpoint_max_age_s(retention_ms)
            log.info(
                "local state at %s; its checkpoints are used up to %.0f s old (changelog "
                "delete.retention.ms %d)",
                path,
                self.local_max_age_s,
                retention_ms,
            )

    def _lose_local(self, exc: BaseException) -> None:
        """A local write failed: keep running without the local copy. What it holds stays
        consistent (entries and checkpoint are written in one batch), so the next start reads
        the changelog from its last good checkpoint."""
        log.error("writing the local state failed (%r); continuing without it", exc)
        local, self.local = self.local, None
        if self.sender is not None:
            self.sender.tracked_topic = None
            self.sender.tracked = []
        if local is not None:
            with contextlib.suppress(Exception):
                local.close()

    async def _loop(self) -> None:
        assert self.consumer is not None
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                fetch = asyncio.ensure_future(self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS))
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                batch = fetch.result()
                async with self.lock:
                    for tp, messages in batch.items():
                        if tp.partition in self.processor.assigned:
                            await self._process(tp.partition, messages)
                    if self._checkpoint_due():
                        if self.transactions is not None:
                            await self._commit_transactions()
                        else:
                            self._start_checkpoint()  # it settles while the next batches are processed
        finally:
            stop.cancel()

    # -- records --------------------------------------------------------------------------

    async def _process(self, partition: int, messages: list[Any]) -> None:
        assert self.sender is not None
        processor = self.processor
        metrics = processor.stats.metrics
        add = self.sender.add
        for n, m in enumerate(messages, 1):
            started = time.perf_counter()
            outputs, _ = processor.process(
                partition=partition,
                offset=m.offset,
                key=m.key,
                value=m.value,
                headers=m.headers,
                timestamp_ms=m.timestamp,
                handle=None,
            )
            metrics.processing_latency_s.observe(time.perf_counter() - started)
            if outputs:
                if self.transactions is None:
                    for o in outputs:
                        add(o.topic, o.key, o.value)
                else:
                    for o in outputs:
                        await self.transactions.send(partition, o.topic, o.key, o.value)
                if m.timestamp is not None:
                    metrics.end_to_end_latency_s.observe(max(0.0, time.time() - m.timestamp / 1000))
            if n % HAND_OVER_EVERY == 0:
                self.sender.kick()
                await asyncio.sleep(0)
        self.sender.kick()
        self.next_offsets[partition] = messages[-1].offset + 1

    def _checkpoint_due(self) -> bool:
        """The interval has passed and the previous checkpoint has settled (commits stay in
        order; while the brokers are slow, checkpoints simply cover more records)."""
        return time.monotonic() - self.last_checkpoint >= self.settings.commit_interval_s and (
            self.settling is None or self.settling.done()
        )

    async def _checkpoint(self) -> None:
        """Make everything processed so far durable, then commit its offsets; waits for both.
        Call holding ``lock``."""
        if self.transactions is not None:
            await self._commit_transactions()
            return
        await self._settled()
        self._start_checkpoint()
        await self._settled()

    async def _commit_transactions(self) -> None:
        """The ``exactly_once`` checkpoint: sweep, add the expired completions' outputs and every
        changed completion's state writes to their partitions' transactions, and commit each
        with its next input offset. Processing waits for it (a partition's next transaction
        cannot begin before this one is committed). Call holding ``lock``. A failed commit stops
        the worker: what was not committed is aborted and redone by the next owner."""
        transactions = self.transactions
        assert transactions is not None
        if self.failure is not None:
            raise self.failure
        self.last_checkpoint = time.monotonic()
        processor = self.processor
        try:
            for o in processor.sweep():
                await transactions.send(
                    processor.tracked[o.key.decode("utf-8")].partition, o.topic, o.key, o.value
                )
            processor.apply(processor.capture())
            for partition, key, value in self.store.take_outbox():
                await transactions.send(
                    partition, self.changelog, key.encode("utf-8"), value, to_partition=partition
                )
            offsets = {p: o for p, o in self.next_offsets.items() if p in processor.assigned}
            await transactions.commit(offsets, self.settings.app_id)
        except Exception as exc:
            self.failure = DeliveryFailed(f"committing a transaction failed: {exc!r}")
            self.stopping.set()
            raise self.failure from exc

    def _start_checkpoint(self) -> None:
        """Capture now; settle in the background (``settling``). Call holding ``lock``."""
        self.settling = asyncio.ensure_future(self._settle(self._capture()))

    def _capture(self) -> Checkpoint:
        """Sweep, and take what the next checkpoint covers: the state writes of every changed
        completion, the offsets of every record processed so far, and the sender's mark for
        the batches holding their outputs. Call holding ``lock``; does not wait."""
        assert self.sender is not None
        self.last_checkpoint = time.monotonic()
        for o in self.processor.sweep():
            self.sender.add(o.topic, o.key, o.value)
        flush = self.processor.capture()
        offsets = {
            TopicPartition(self.settings.input_topic, p): offset
            for p, offset in self.next_offsets.items()
            if p in self.processor.assigned
        }
        return Checkpoint(self.sender.kick(), flush, offsets)

    async def _settle(self, checkpoint: Checkpoint) -> None:
        """Make a captured checkpoint durable, in the order the ``Processor`` requires: wait
        until every output built before the capture is acknowledged, only then write the
        captured state to the changelog and wait for that, then commit the captured offsets.
        (State written before its outputs were durable could make a redelivered record look
        already applied after a crash, and its outputs would be lost.) On a failure: record
        it, stop the worker, and write or commit nothing more."""
        assert self.consumer is not None and self.sender is not None
        if not await self._delivered(checkpoint.mark):
            return
        self.processor.apply(checkpoint.flush)
        written = self.store.take_outbox()
        counts: dict[Any, int] = {}
        """Changelog records per batch (for the local copy's offsets)."""
        stamp = time.time()  # before any of these records can reach the changelog
        for partition, key, value in written:
            batch = self.sender.add(self.changelog, key.encode("utf-8"), value, partition)
            if self.local is not None:
                counts[batch] = counts.get(batch, 0) + 1
        if not await self._delivered(self.sender.kick()):
            return
        if self.local is not None and written:
            self._keep_locally(written, counts, stamp)
        if not checkpoint.offsets:
            return
        try:
            await self.consumer.commit(checkpoint.offsets)
        except (KafkaError, IllegalStateError) as exc:
            log.warning("offset commit failed (%r); the records will be redelivered", exc)

    def _keep_locally(
        self, written: list[tuple[int, str, bytes | None]], counts: dict[Any, int], stamp: float
    ) -> None:
        """Apply acknowledged changelog writes to the local copy, with each written partition's
        new checkpoint: the offset after its last batch (its base offset from the broker's
        acknowledgement plus the records in it). This worker is the partition's only writer
        while it owns it, and everything before that batch is either already local or a
        retried duplicate of these writes, so the entries reflect the changelog up to there."""
        assert self.local is not None and self.sender is not None
        ends: dict[int, int] = {}
        unknown: set[int] = set()
        for partition, batch, future in self.sender.take_tracked():
            count = counts.get(batch)
            if count is None:
                continue  # not one of these writes
            metadata = future.result()
            if metadata is None or metadata.offset is None or metadata.offset < 0:
                unknown.add(partition)
            else:
                ends[partition] = max(ends.get(partition, 0), metadata.offset + count)
        # A partition with a batch whose offset was not reported loses its local copy until it
        # is next restored from the changelog: skipping just these writes would let a later
        # checkpoint claim them.
        unknown -= self.local_stale
        self.local_stale |= unknown
        for partition in self.local_stale:
            ends.pop(partition, None)
        items = [w for w in written if w[0] in ends]
        try:
            self.local.write(items, ends, stamp, wipe=unknown)
        except Exception as exc:
            self._lose_local(exc)

    async def _delivered(self, mark: int) -> bool:
        """Wait until the batches built before ``mark`` are handed over and every batch handed
        over is acknowledged; False (and the worker stopping) when any of that failed."""
        assert self.sender is not None
        try:
            in_flight = await self.sender.take(mark)
        except (KafkaError, ValueError) as exc:
            self.failure = DeliveryFailed(f"handing records to the producer failed: {exc!r}")
            self.stopping.set()
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
            self.failure = DeliveryFailed(f"{failed} of {len(in_flight)} sends failed: {first!r}")
            self.stopping.set()
            return False
        return True

    async def _settled(self) -> None:
        """Wait for the commit in progress, if any; raise ``DeliveryFailed`` after a failure."""
        if self.settling is not None:
            settling, self.settling = self.settling, None
            await settling
        if self.failure is not None:
            raise self.failure

    # -- ownership ------------------------------------------------------------------------

    async def revoke(self, partitions: list[int]) -> None:
        async with self.lock:
            if self.failure is None:
                with contextlib.suppress(KafkaError, DeliveryFailed):
                    await self._checkpoint()
            self.processor.revoke(partitions)
            self.store.drop(partitions)
            for p in partitions:
                self.next_offsets.pop(p, None)
            if self.transactions is not None:
                await self.transactions.release(partitions)
        if partitions:
            log.info("partitions revoked: %s", sorted(partitions))

    async def assign(self, partitions: list[int]) -> None:
        async with self.lock:
            new = sorted(set(partitions) - self.processor.assigned)
            self.restoring = True
            try:
                if self.transactions is not None:
                    # Fence the partitions' previous owners first: their open transactions are
                    # aborted, so the state read back next is final.
                    await self.transactions.own(new)
                await self._restore(new)
            finally:
                self.restoring = False
            self.processor.assign(new)
            loaded = self.processor.scan()
        log.info("partitions assigned: %s; %d stored completions loaded", new, loaded)

    async def _restore(self, partitions: list[int]) -> None:
        """Read the state of ``partitions`` into the store: from the local copy plus the
        changelog from its checkpoint on, where the local copy has a usable checkpoint;
        otherwise the changelog from its beginning to its end. Then bring the local copy up to
        what was read."""
        if not partitions:
            return
        local = self.local
        self.store.drop(partitions)
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await reader.start()
        try:
            tps = [TopicPartition(self.changelog, p) for p in partitions]
            reader.assign(tps)
            started_at = time.time()  # before any record after what is read can be appended
            from_local: dict[int, int] = {}
            notes: dict[int, str] = {}
            if local is None:
                await reader.seek_to_beginning(*tps)
                ends = await reader.end_offsets(tps)
            else:
                ends = await reader.end_offsets(tps)
                await self._load_local(local, reader, tps, ends, started_at, from_local, notes)
            first = {tp: await reader.position(tp) for tp in tps}
            read = dict.fromkeys(partitions, 0)
            changed: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
            todo = {tp for tp in tps if ends[tp] > first[tp]}
            while todo:
                batch = await reader.getmany(*todo, timeout_ms=500)
                for tp, messages in batch.items():
                    read[tp.partition] += len(messages)
                    seen = changed[tp.partition]
                    for m in messages:
                        if m.key is not None:
                            key = m.key.decode("utf-8", "replace")
                            self.store.load(tp.partition, key, m.value)
                            if local is not None:
                                seen[key] = m.value
                for tp in list(todo):
                    if await reader.position(tp) >= ends[tp]:
                        todo.discard(tp)
            last = {tp.partition: await reader.position(tp) for tp in tps}
        finally:
            await reader.stop()
        if local is not None:
            full = [p for p in partitions if p not in from_local]
            items = [
                (p, key, value)
                for p in partitions
                for key, value in changed[p].items()
                if value is not None or p in from_local
            ]
            try:
                local.write(items, last, started_at, wipe=full)
            except Exception as exc:
                self._lose_local(exc)
            else:
                self.local_stale.difference_update(partitions)
        self.restored_local_entries += sum(from_local.values())
        self.restored_changelog_records += sum(read.values())
        restored = set(partitions)
        log.info(
            "restored partitions %s: %d entries from local state, %d changelog records read, "
            "%d entries held (%s)",
            partitions,
            sum(from_local.values()),
            sum(read.values()),
            sum(1 for p in self.store.partition_of.values() if p in restored),
            "; ".join(
                f"p{tp.partition}: {read[tp.partition]} from offset {first[tp]}"
                + (f" ({notes[tp.partition]})" if tp.partition in notes else "")
                + f" to {last[tp.partition]}"
                for tp in tps
            ),
        )

    async def _load_local(
        self,
        local: LocalState,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        ends: dict[TopicPartition, int],
        now: float,
        loaded: dict[int, int],
        notes: dict[int, str],
    ) -> None:
        """Load the local entries of each partition of ``tps`` with a usable checkpoint into the
        store and position ``reader`` at the checkpoint; the others at the changelog's
        beginning. Fills ``loaded`` (partition: entries loaded from the local copy) and
        ``notes`` (partition: where its read starts, and why)."""
        begins = await reader.beginning_offsets(tps)
        for tp in tps:
            checkpoint, why = local.usable(
                tp.partition, begin=begins[tp], end=ends[tp], now=now, max_age_s=self.local_max_age_s
            )
            notes[tp.partition] = why
            if checkpoint is None:
                reader.seek(tp, begins[tp])
                continue
            count = 0
            for key, value in local.entries(tp.partition):
                self.store.load(tp.partition, key, value)
                count += 1
                if count % RESTORE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            loaded[tp.partition] = count
            reader.seek(tp, checkpoint.offset)

    # -- web ------------------------------------------------------------------------------

    async def _start_web(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.web_host, self.settings.web_port).start()
        return runner

    def _highwater(self, partition: int) -> int | None:
        if self.consumer is None:
            return None
        try:
            value = self.consumer.highwater(TopicPartition(self.settings.input_topic, partition))
        except Exception:
            return None
        return None if value is None else int(value)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self.processor.metrics_text(self._highwater) + render(
            counters={
                "chunkfold_restore_local_entries_total": (
                    "state entries loaded from the local copy when partitions were assigned",
                    self.restored_local_entries,
                    "",
                ),
                "chunkfold_restore_changelog_records_total": (
                    "state changelog records read when partitions were assigned",
                    self.restored_changelog_records,
                    "",
                ),
            },
            gauges={},
            histograms={},
        )
        return web.Response(text=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        body = self.processor.readiness(recovering=self.restoring)
        return web.json_response(body, status=200 if body["ready"] else 503)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: DirectWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker.revoke([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker.assign([tp.partition for tp in assigned])


def run(settings: Settings) -> int:
    """Run a direct-driver worker until it is stopped; non-zero when a delivery failed."""
    worker = DirectWorker(settings)
    with contextlib.suppress(DeliveryFailed):
        asyncio.run(worker.run())
    if worker.failure is not None:
        log.error("stopping without committing: %s", worker.failure)
        return 1
    return 0
