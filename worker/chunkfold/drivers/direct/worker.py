"""The direct driver's worker: the ``Processor`` on a plain aiokafka consumer and producer, in
batches; its consume loop, its rebalance listener and its lifecycle (``serve``).

Faust hands a stream one event at a time through several layers of queues, sensors and
acknowledgement bookkeeping; that costs about ten times what chunkfold itself does per record.
This driver keeps Faust's contract and storage format but drives batches itself:

* input: one group consumer of the input topic (the same group id and committed offsets as
  the Faust driver), ``getmany`` batches, manual commits;
* state: the same changelog topic as the Faust table (``chunkfold.state.changelog``), read back
  into memory for every partition this worker is assigned, before any of its records is
  processed (``recovery.py``, with the optional local copy);
* checkpoints every ``commit_interval_s`` and before partitions are given up (``checkpoint.py``);
  a rebalance or shutdown waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp.web import AppRunner
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from chunkfold.config import Settings
from chunkfold.drivers import PRODUCER_LINGER_MS
from chunkfold.drivers.direct.checkpoint import (
    Checkpointer,
    DeliveryFailed,
    OrderedCheckpointer,
    TransactionalCheckpointer,
)
from chunkfold.drivers.direct.recovery import LocalCopy, Recovery, keeps_local_state, open_local_copy
from chunkfold.drivers.direct.sender import BatchSender
from chunkfold.drivers.direct.transactions import PartitionTransactions
from chunkfold.drivers.partitions import KeyPartitions
from chunkfold.kafka_io import KafkaClients, record_limits
from chunkfold.metrics import Families
from chunkfold.processor import Processor
from chunkfold.query.membership import QueryMembership, assignment_strategy
from chunkfold.query.owners import GroupOwners
from chunkfold.query.resume import EventsSource
from chunkfold.query.server import serve_queries
from chunkfold.state.changelog import ChangelogStore, changelog_topic
from chunkfold.web import Pages, serve

log = logging.getLogger("chunkfold.worker")
BATCH_MAX_RECORDS = 2_000
POLL_TIMEOUT_MS = 100
FETCH_MIN_BYTES = 16 * 1024
FETCH_MAX_WAIT_MS = 2
"""A fetch returns once 16 KiB are there or 2 ms have passed: under load that is a few fetches
per 10 ms instead of one per record or two, which costs broker and worker CPU that a busy
machine takes out of latency (measured at 5,000 chunks/s on 2 cores: p99 45-55 ms instead
of 52-78 ms); when idle it adds at most 2 ms."""
PRODUCER_REQUEST_TIMEOUT_MS = 120_000
HAND_OVER_EVERY = 200
"""Records processed between two hand-overs of the built batches to the producer."""
PRODUCER_BATCH_BYTES = 512 * 1024
"""aiokafka keeps one open batch per partition and makes ``send`` wait while it is full, for
a whole produce round trip; completion-done records and state segments are kilobytes each."""


class DirectWorker:
    """One consumer-group member running ``processor`` over its partitions: it processes the
    records ``consumer`` fetches and hands their outputs to ``checkpointer``, and restores the
    state of partitions it is assigned (``recovery``)."""

    def __init__(
        self,
        processor: Processor,
        store: ChangelogStore,
        consumer: AIOKafkaConsumer,
        sender: BatchSender,
        checkpointer: Checkpointer,
        recovery: Recovery,
        stopping: asyncio.Event,
    ) -> None:
        self.processor = processor
        self.store = store
        self.consumer = consumer
        self.sender = sender
        self.checkpointer = checkpointer
        self.recovery = recovery
        self.stopping = stopping
        self.lock = asyncio.Lock()
        """Held while records are processed, a checkpoint is taken or partitions change hands."""
        self.refused: KafkaError | None = None
        """Taking partitions over failed (an ACL denied the transactional id, the changelog):
        the worker stops before processing any of their records."""
        self.rebalancing = True
        """Between a revocation (the start of every rebalance) and the end of the assignment
        that follows; true until the first assignment."""

    def settled(self) -> bool:
        """Ownership is not moving and no state is being restored: queries may be answered."""
        return not self.rebalancing and not self.recovery.restoring

    async def consume(self) -> None:
        """Process fetched batches until ``stopping`` is set; raises ``DeliveryFailed`` when a
        checkpoint failed."""
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
                    if self.checkpointer.due():
                        await self.checkpointer.begin()
        finally:
            stop.cancel()

    async def _process(self, partition: int, messages: list[Any]) -> None:
        processor = self.processor
        metrics = processor.stats.metrics
        send = self.checkpointer.send
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
                sending = send(partition, outputs)
                if sending is not None:
                    await sending
                if m.timestamp is not None:
                    metrics.end_to_end_latency_s.observe(max(0.0, time.time() - m.timestamp / 1000))
            if n % HAND_OVER_EVERY == 0:
                self.sender.kick()
                await asyncio.sleep(0)
        self.sender.kick()
        self.checkpointer.processed(partition, messages[-1].offset + 1)

    async def finish(self) -> None:
        """Checkpoint what was processed (unless a checkpoint failed) before leaving the group."""
        if self.checkpointer.failure is None:
            with contextlib.suppress(DeliveryFailed, KafkaError):
                async with self.lock:
                    await self.checkpointer.complete()

    # -- ownership ------------------------------------------------------------------------

    async def revoke(self, partitions: list[int]) -> None:
        self.rebalancing = True
        async with self.lock:
            if self.checkpointer.failure is None:
                with contextlib.suppress(KafkaError, DeliveryFailed):
                    await self.checkpointer.complete()
            self.processor.revoke(partitions)
            self.store.drop(partitions)
            await self.checkpointer.release(partitions)
        if partitions:
            log.info("partitions revoked: %s", sorted(partitions))

    async def assign(self, partitions: list[int]) -> None:
        async with self.lock:
            new = sorted(set(partitions) - self.processor.assigned)
            try:
                with self.recovery.in_progress():
                    await self.checkpointer.own(new)
                    await self.recovery.restore(new)
            except KafkaError as exc:
                # aiokafka would log a listener's error and go on: stop instead, nothing of
                # these partitions processed (the error is raised by ``run_worker``).
                self.refused = exc
                self.stopping.set()
                return
            self.processor.assign(new)
            loaded = self.processor.scan()
            self.rebalancing = False
        log.info("partitions assigned: %s; %d stored completions loaded", new, loaded)


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: DirectWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker.revoke([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker.assign([tp.partition for tp in assigned])


async def serve_web(settings: Settings, processor: Processor, recovery: Recovery) -> AppRunner:
    """The direct driver's ``/metrics``, ``/healthz`` and ``/readyz`` (not ready while restoring)."""
    pages = Pages(processor, recovering=lambda: recovery.restoring)
    return await serve(pages, settings.web_host, settings.web_port)


async def serve_worker_queries(
    settings: Settings,
    kafka: KafkaClients,
    worker: DirectWorker,
    membership: QueryMembership,
    producer: AIOKafkaProducer,
    events_partition: Callable[[bytes], int],
) -> AppRunner:
    """The query listener of ``worker``: owners from ``membership``, answering only while the
    worker is settled, snapshots between the checkpointer's commits."""
    input_topic = settings.input_topic
    input_partitions = KeyPartitions({input_topic: len(await producer.partitions_for(input_topic))})
    return await serve_queries(
        settings,
        worker.processor,
        GroupOwners(membership, input_topic, worker.settled),
        lambda key: input_partitions(input_topic, key),
        EventsSource(settings, kafka, events_partition),
        between_commits=worker.checkpointer.between_commits,
    )


async def seed_events_positions(
    consumer: AIOKafkaConsumer, processor: Processor, events_topic: str, partitions: int
) -> None:
    """Tell the processor the end offsets of the events topic's ``partitions`` before any
    record is processed: no event this worker produces can land before them."""
    ends = await consumer.end_offsets([TopicPartition(events_topic, p) for p in range(partitions)])
    for tp, end in ends.items():
        processor.note_events_position(tp.partition, end)


def _highwater(consumer: AIOKafkaConsumer, topic: str, partition: int) -> int | None:
    try:
        value = consumer.highwater(TopicPartition(topic, partition))
    except Exception:
        return None
    return None if value is None else int(value)


async def run_worker(settings: Settings, kafka: KafkaClients) -> DeliveryFailed | None:
    """Run one worker until SIGTERM/SIGINT (then checkpoint and leave the group) or a failed
    checkpoint; returns that failure, if any. Its topics exist and were checked
    (``chunkfold.kafka_checks.prepare_worker_topics``); every client comes from ``kafka``. A
    partition that cannot be taken over (an ACL) stops it before anything is processed: that
    error is raised."""
    s = settings
    changelog = changelog_topic(s)
    outputs = (s.events_topic, s.done_topic, s.deadletter_topic)
    limits = await record_limits(kafka, [*outputs, changelog], s.max_message_bytes)
    # A batch of several records must fit the smallest topic too (one record always fits:
    # the processor cuts each value to its topic's limit, and a batch takes a first record
    # whatever its size).
    batch_bytes = min(PRODUCER_BATCH_BYTES, *limits.values())
    exactly_once = s.processing_guarantee == "exactly_once"
    local_copy: LocalCopy | None = None
    if exactly_once and keeps_local_state(s):
        log.warning("exactly_once keeps no local state copy: assignments read the whole changelog")
    elif keeps_local_state(s):
        local_copy = await open_local_copy(s, changelog, kafka)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    producer: AIOKafkaProducer = kafka.producer(
        acks="all",
        linger_ms=PRODUCER_LINGER_MS,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        max_batch_size=batch_bytes,
        max_request_size=s.max_message_bytes,
    )
    membership = QueryMembership(s.query_url() if s.query_port > 0 else "")
    consumer: AIOKafkaConsumer = kafka.consumer(
        group_id=s.app_id,
        partition_assignment_strategy=assignment_strategy(membership),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH_MAX_RECORDS,
        fetch_min_bytes=FETCH_MIN_BYTES,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    tracked = () if exactly_once else (s.events_topic, *((changelog,) if local_copy is not None else ()))
    sender = BatchSender(producer, tracked_topics=tracked)

    def events_partition(key: bytes) -> int:
        return sender.partitions(s.events_topic, key)

    store = ChangelogStore()
    processor = Processor(
        s,
        store,
        highwater=lambda p: _highwater(consumer, s.input_topic, p),
        events_partition=events_partition,
    )
    processor.set_limits({topic: limits[topic] for topic in outputs})
    recovery = Recovery(s, store, changelog, local_copy, kafka)
    processor.registry.register(Families(recovery.metric_families))
    web_runner = await serve_web(s, processor, recovery) if s.web_port > 0 else None
    await producer.start()
    await sender.start((s.events_topic, s.done_topic, s.deadletter_topic))
    checkpointer: Checkpointer
    if exactly_once:
        transactions = PartitionTransactions(
            kafka,
            s.app_id,
            s.input_topic,
            request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
            linger_ms=PRODUCER_LINGER_MS,
            max_request_size=s.max_message_bytes,
            max_batch_size=batch_bytes,
            partitions=sender.partitions,
            tracked_topics=(s.events_topic,),
        )
        checkpointer = TransactionalCheckpointer(processor, store, s, stopping, transactions=transactions)
    else:
        checkpointer = OrderedCheckpointer(
            processor, store, s, stopping, sender=sender, commit=consumer.commit, local_copy=local_copy
        )
    worker = DirectWorker(processor, store, consumer, sender, checkpointer, recovery, stopping)
    # Listening before joining the group: once members forward to this one, it answers (503
    # until its first assignment is restored).
    query_runner = (
        await serve_worker_queries(s, kafka, worker, membership, producer, events_partition)
        if s.query_port > 0
        else None
    )
    consumer.subscribe([s.input_topic], listener=Rebalance(worker))
    await consumer.start()
    # Everything allocated so far (modules, clients) lives as long as the process: move it out
    # of the collector's reach, so that a full collection walks only the completions' state
    # (the first one, under the first wave of records, stopped the worker for ~50 ms).
    gc.collect()
    gc.freeze()
    log.info("worker started (direct driver), group %s, input %s", s.app_id, s.input_topic)
    try:
        await seed_events_positions(
            consumer, processor, s.events_topic, sender.partitions.counts[s.events_topic]
        )
        with contextlib.suppress(DeliveryFailed):
            await worker.consume()
    finally:
        if query_runner is not None:
            await query_runner.cleanup()
        await worker.finish()
        await sender.stop()
        await consumer.stop()
        await producer.stop()
        await checkpointer.close()
        if local_copy is not None:
            local_copy.close()
        if web_runner is not None:
            await web_runner.cleanup()
        log.info("worker stopped")
    if worker.refused is not None:
        raise worker.refused
    return checkpointer.failure
