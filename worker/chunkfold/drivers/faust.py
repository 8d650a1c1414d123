"""The Faust driver, wiring only: the app, its topics and state table, one agent, one timer
and the web pages. The only module that imports Faust, with ``chunkfold.state.faust_table``
(the table store, imported from here).

The agent decodes nothing and decides nothing: it takes the records Faust has fetched in
batches (``noack_take``: up to ``BATCH_MAX_RECORDS``, or what came within ``BATCH_WITHIN_S``),
hands each raw record to the ``Processor`` and adds what comes back to the output batches
(``OutputSender``: the direct driver's ``BatchSender`` on a producer of its own). The timer
writes state behind: it captures the changed completions, waits until every output added so
far is delivered, acknowledges the records that changed no state, writes the captured state
to the table (changelog) and only then acknowledges those records, so Faust's offset commit
never passes a record whose outputs or state are not durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import mode
from aiokafka import TopicPartition
from faust.transport.drivers.aiokafka import Consumer as FaustKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as FaustKafkaTransport
from faust.types import TP
from mode.services import WaitResults

from chunkfold.config import Settings
from chunkfold.drivers import PRODUCER_LINGER_MS
from chunkfold.drivers.direct.sender import BatchSender, delivered_ends
from chunkfold.drivers.partitions import KeyPartitions
from chunkfold.kafka_io import KafkaClients
from chunkfold.kafka_security import faust_options
from chunkfold.processor import Output, Processor
from chunkfold.query.resume import EventsSource
from chunkfold.query.server import serve_queries
from chunkfold.state.faust_table import TableStore
from chunkfold.web import Page, Pages

log = logging.getLogger("chunkfold.worker")
STATE_TABLE = "state"
BATCH_MAX_RECORDS = 2_000
BATCH_WITHIN_S = 0.005
"""A batch is what Faust has fetched, up to 2,000 records (the direct driver's poll size); at low
rates a record waits at most 5 ms for others to join it."""
STREAM_BUFFER_RECORDS = 16_384
"""Records Faust may hold between its fetcher and the agent. Faust's default (4,096) paused
fetching whenever a 2,000-record batch was being folded: py-spy showed the worker idle about half
the time on a backlog, waiting for the fetcher to resume."""
PRODUCER_BUFFER_MESSAGES = 20_000
NO_QUERY_LISTENER = "http://no-query-listener.invalid"
"""The canonical URL a member without a query listener advertises through Faust's assignor (a
reserved, unresolvable name): the others know it has nothing to forward to."""
PRODUCER_BATCH_BYTES = 512 * 1024
"""As the direct driver's: an output batch is at most this large (or the smallest topic limit)."""


class DirectDeliveryConsumer(FaustKafkaConsumer):
    """Faust's aiokafka consumer, minus four tasks per record.

    Faust's fetch loop (``Consumer._drain_messages``) hands every record to the topic conductor
    through ``wait_first(callback(message), suspend_flow.wait())``: three more tasks (with the
    service's stop and crash events) and an ``asyncio.wait`` per record, 11% of the worker's busy
    samples, so that a delivery blocked on a full buffer is abandoned when a rebalance suspends
    the flow. While the flow is not suspended that call is awaited directly here. A delivery that
    then blocks and sees a rebalance either ends with the fetcher's task, which Faust cancels to
    restart it, or delivers its record late: the agent skips a record of an older generation,
    unacknowledged, as it skips the ones Faust's own stream would."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        if (
            len(coros) == 2
            and timeout is None
            and asyncio.iscoroutine(coros[0])
            and asyncio.iscoroutine(coros[1])
            and getattr(coros[1], "__qualname__", None) == "Event.wait"
            and not self.suspend_flow.is_set()
            and not self.should_stop
        ):
            delivery, suspended = coros
            suspended.close()
            return WaitResults([delivery], [await delivery], False)
        return await super().wait_first(*coros, timeout=timeout)


class FaustOwners:
    """The Faust driver's ``chunkfold.query.owners.Owners``: Faust's own assignor carries every
    member's canonical URL (the advertised query URL here) and hands every member the map of
    which URL holds which partition of the input topic (``Router.external_topics_metadata``)."""

    def __init__(self, app: faust.App, input_topic: str, processor: Processor) -> None:
        self.app, self.input_topic, self.processor = app, input_topic, processor

    def owner(self, partition: int) -> str | None:
        for url, topics in self.app.router.external_topics_metadata().items():
            if partition in topics.get(self.input_topic, ()):
                return "" if url.rstrip("/") == NO_QUERY_LISTENER else url.rstrip("/")
        return None

    def settled(self) -> bool:
        return not (self.app.rebalancing or self.app.in_recovery) and bool(self.processor.assigned)


class QueryListener(mode.Service):
    """The query listener (``chunkfold.query.server``) of a Faust worker, started after Faust's
    recovery has begun and stopped with the app."""

    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        super().__init__()
        self.start_listener = start
        self.runner: Any = None

    async def on_start(self) -> None:
        self.runner = await self.start_listener()

    async def on_stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class ChunkfoldTransport(FaustKafkaTransport):
    """Faust's aiokafka transport with ``DirectDeliveryConsumer``."""

    Consumer = DirectDeliveryConsumer


def _view(page: Callable[[], Page]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A Faust page serving ``page``."""

    async def view(self: Any, _request: Any) -> Any:
        status, content_type, body = page()
        return self.bytes(body, status=status, headers={"Content-Type": content_type})

    return view


class OutputSender(mode.Service):
    """The worker's outputs go through the direct driver's ``BatchSender`` on a producer of their
    own, not Faust's producer: that one awaits an aiokafka ``send`` (a future, a partitioner call)
    per record. Faust's producer keeps the table's changelog writes. Started before the agents
    (a dependency of the app, added before Faust's own), stopped after them. Delivery reports of
    the events topic's batches tell ``processor`` the events positions (``note_events_position``),
    seeded at start with the topic's end offsets."""

    def __init__(
        self, kafka: KafkaClients, settings: Settings, partitions: KeyPartitions, processor: Processor
    ) -> None:
        super().__init__()
        self.kafka, self.settings, self.processor = kafka, settings, processor
        self.limits = processor.limits
        """The output topics' record limits, known once the worker command read them."""
        self.partitions = partitions
        self.ready = asyncio.Event()
        self._sender: BatchSender | None = None

    @property
    def sender(self) -> BatchSender:
        if self._sender is None:
            raise RuntimeError("the output sender is not started")
        return self._sender

    async def on_start(self) -> None:
        s = self.settings
        producer = self.kafka.producer(
            acks="all",
            linger_ms=PRODUCER_LINGER_MS,
            max_request_size=s.max_message_bytes,
            # A batch of several records must fit the smallest output topic too.
            max_batch_size=min(PRODUCER_BATCH_BYTES, *self.limits.values()),
        )
        await producer.start()
        sender = BatchSender(producer, tracked_topics=(s.events_topic,))
        sender.partitions = self.partitions
        await sender.start((s.events_topic, s.done_topic, s.deadletter_topic))
        # No event this worker produces can land before the events topic's end offsets now.
        reader = self.kafka.consumer(group_id=None, enable_auto_commit=False)
        await reader.start()
        try:
            events = self.settings.events_topic
            ends = await reader.end_offsets(
                [TopicPartition(events, p) for p in range(self.partitions.counts[events])]
            )
        finally:
            await reader.stop()
        for tp, end in ends.items():
            self.processor.note_events_position(tp.partition, end)
        self._sender = sender
        self.ready.set()

    async def on_stop(self) -> None:
        if self._sender is not None:
            await self._sender.stop()
            await self._sender.producer.stop()


def create_app(
    settings: Settings, partitions: KeyPartitions, kafka: KafkaClients
) -> tuple[faust.App, Processor]:
    """The Faust app of a worker and its ``Processor``. Its clients authenticate as the settings
    say (``broker_credentials``: ``chunkfold.kafka_security.faust_options``; the output producer
    comes from ``kafka``); ``partitions`` knows the partition counts of the output topics."""
    brokers = [
        f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",") if server.strip()
    ]
    app = faust.App(
        settings.app_id,
        broker=brokers,
        store=settings.store,
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee="at_least_once",
        broker_commit_interval=settings.commit_interval_s,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=settings.web_port > 0,
        web_port=max(settings.web_port, 1),
        web_bind=settings.web_host,
        web_in_thread=False,
        # Health and metrics only (the pages below): Faust's /router (cluster topology) and
        # /table (reads table keys, i.e. completion state) views off, and its statistics,
        # graph and /performance views too; "/" then answers a constant {"status": "OK"}.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        # The query listener's URL travels in the group's member metadata (Faust's assignor), so
        # that every member knows where each input partition can be asked about.
        canonical_url=settings.query_url() if settings.query_port > 0 else NO_QUERY_LISTENER,
        producer_acks=-1,
        producer_linger_ms=PRODUCER_LINGER_MS,
        producer_max_request_size=settings.max_message_bytes,
        # Acks are held until the write-behind timer has made the state durable; waiting for
        # them at shutdown or rebalance would stall (the timer is stopped by then). Unacked
        # records are simply redelivered to the next owner.
        stream_wait_empty=False,
        stream_buffer_maxsize=STREAM_BUFFER_RECORDS,
        # A member that stops heartbeating (kill -9, a lost node) leaves the group after 10 s,
        # as the direct driver's consumer (aiokafka's default), not Faust's 60: its partitions
        # are not stalled for a minute.
        broker_session_timeout=10.0,
        # Topics: with CHUNKFOLD_CREATE_TOPICS=false Faust declares none (no CreateTopics); the
        # worker command created or checked them all before (chunkfold.kafka_checks). No leader
        # topic (<app id>-__assignor-__leader): nothing here runs on the leader only.
        topic_allow_declare=settings.create_topics,
        topic_disable_leader=True,
        **faust_options(settings),
    )
    app.transport = ChunkfoldTransport(app.conf.broker_consumer, app)
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    chunks = app.topic(settings.input_topic, partitions=settings.partitions, **raw)
    sinks = {
        name: app.topic(name, partitions=settings.partitions, **raw)
        for name in (settings.events_topic, settings.done_topic, settings.deadletter_topic)
    }
    table = app.Table(
        STATE_TABLE, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes
    )

    def highwater(partition: int) -> int | None:
        try:
            value = app.consumer.highwater(TP(settings.input_topic, partition))
        except Exception:
            return None
        return None if value is None else int(value)

    def events_partition(key: bytes) -> int:
        return partitions(settings.events_topic, key)

    processor = Processor(
        settings,
        TableStore(table, settings.input_topic),
        highwater=highwater,
        events_partition=events_partition,
    )
    metrics = processor.stats.metrics

    outputs = OutputSender(kafka, settings, partitions, processor)
    app.add_dependency(outputs)
    delivered_acks: list[Any] = []
    """Events that changed no state, acknowledged once the outputs sent before them are delivered."""

    def send(items: list[Output]) -> None:
        add = outputs.sender.add
        for item in items:
            add(item.topic, item.key, item.value)

    @app.agent(chunks, name="fold")
    async def fold(stream: Any) -> None:
        # Faust's per-record path is what limits this driver: records are taken in batches and
        # their outputs handed to the producer together.
        await outputs.ready.wait()
        async for events in stream.noack_take(BATCH_MAX_RECORDS, within=BATCH_WITHIN_S):
            # No await between folding a batch and adding its outputs to the sender: a capture
            # by the write-behind covers only records whose outputs are all in the sender.
            _fold_batch(events)
            outputs.sender.kick()

    def _fold_batch(events: list[Any]) -> None:
        """Fold a batch and add its outputs to the sender's batches; the records that changed no
        state wait in ``delivered_acks`` for the next write-behind."""
        out: list[Output] = []
        generation, assigned = app.consumer_generation_id, processor.assigned
        flowing = app.flow_control.is_active()
        for event in events:
            message = event.message
            if not flowing or message.generation_id != generation or message.partition not in assigned:
                # fetched before or during a rebalance (Faust's own stream skips these too): its
                # partition's owner, maybe this worker again, reads it anew from the committed
                # offset once the state is restored. Folded now, without that state, it would
                # publish another completion. Not acknowledged: that could let the commit pass
                # the new copy before its state is written.
                continue
            started = time.perf_counter()
            outputs, ack_now = processor.process(
                partition=message.partition,
                offset=message.offset,
                key=message.key,
                value=message.value,
                headers=message.headers,
                timestamp_ms=None if message.timestamp is None else round(message.timestamp * 1000),
                handle=event,
            )
            metrics.processing_latency_s.observe(time.perf_counter() - started)
            if outputs:
                out += outputs
                if message.timestamp is not None:
                    metrics.end_to_end_latency_s.observe(max(0.0, time.time() - message.timestamp))
            if ack_now:
                delivered_acks.append(event)
        send(out)

    @app.timer(interval=settings.commit_interval_s, name="write_behind")  # type: ignore[untyped-decorator]
    async def write_behind() -> None:
        if not outputs.ready.is_set():
            return
        send(processor.sweep())
        batch = processor.capture()
        acks, delivered_acks[:] = list(delivered_acks), []
        mark = outputs.sender.kick()
        # Every output of the captured records is delivered (a failed delivery raises: the
        # worker stops, an infrastructure failure) before their state is written and they are
        # acknowledged.
        for future in await outputs.sender.take(mark):
            await future
        for partition, end in delivered_ends(outputs.sender.take_tracked(settings.events_topic)).items():
            processor.note_events_position(partition, end)
        for event in acks:
            event.ack()
        for handle in processor.apply(batch):
            handle.ack()

    @app.task  # type: ignore[untyped-decorator]
    async def widen_producer_buffer() -> None:
        # State writes are sent through Faust's producer buffer; its default of 100 messages
        # pauses the stream at every write-behind flush of more completions than that.
        app.producer.buffer.max_messages = PRODUCER_BUFFER_MESSAGES

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(_sender: Any, *args: Any, **_: Any) -> None:
        processor.assign(tp.partition for tp in args[0] if tp.topic == settings.input_topic)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def on_recovered(_sender: Any, *_args: Any, **_: Any) -> None:
        # Sent once table recovery has replayed the changelog of every assigned partition:
        # only now is the store complete enough to load completions nobody writes to any more.
        loaded = processor.scan()
        if loaded:
            log.info("loaded %d stored completions of newly assigned partitions", loaded)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(_sender: Any, *args: Any, **_: Any) -> None:
        processor.revoke(tp.partition for tp in args[0] if tp.topic == settings.input_topic)

    if settings.query_port > 0:
        input_partitions = KeyPartitions({settings.input_topic: settings.partitions})

        async def start_queries() -> Any:
            return await serve_queries(
                settings,
                processor,
                FaustOwners(app, settings.input_topic, processor),
                lambda key: input_partitions(settings.input_topic, key),
                EventsSource(settings, kafka, events_partition),
            )

        app.add_dependency(QueryListener(start_queries))

    pages = Pages(processor, recovering=lambda: bool(app.rebalancing or app.in_recovery))
    for path, page in pages.routes().items():
        app.page(path, name=path.strip("/"))(_view(page))

    del (
        fold,
        write_behind,
        widen_producer_buffer,
        on_assigned,
        on_recovered,
        on_revoked,
    )
    _ = sinks
    return app, processor
