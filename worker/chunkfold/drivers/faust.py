"""The Faust driver, wiring only: the app, its topics and state table, one agent, one timer
and the web pages. The only module that imports Faust, with ``chunkfold.state.faust_table``
(the table store, imported from here).

The agent decodes nothing and decides nothing: it takes the records Faust has fetched in
batches (``noack_take``: up to ``BATCH_MAX_RECORDS``, or what came within ``BATCH_WITHIN_S``),
hands each raw record to the ``Processor`` and sends what comes back, each output to the
partition its key maps to, computed once per key (``KeyPartitions``). The timer writes state behind: it captures the
changed completions, waits until every output produced so far is delivered, writes their
state to the table (changelog), and only then acknowledges the input records, so Faust's
offset commit never passes a record whose outputs or state are not durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TP

from chunkfold.config import Settings
from chunkfold.drivers import PRODUCER_LINGER_MS
from chunkfold.drivers.partitions import KeyPartitions
from chunkfold.kafka_security import faust_options
from chunkfold.processor import Output, Processor
from chunkfold.state.faust_table import TableStore
from chunkfold.web import Page, Pages

log = logging.getLogger("chunkfold.worker")
STATE_TABLE = "state"
BATCH_MAX_RECORDS = 500
BATCH_WITHIN_S = 0.005
"""A batch is what Faust has fetched, up to 500 records; at low rates a record waits at most
5 ms for others to join it."""
PRODUCER_BUFFER_MESSAGES = 20_000


def _view(page: Callable[[], Page]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A Faust page serving ``page``."""

    async def view(self: Any, _request: Any) -> Any:
        status, content_type, body = page()
        return self.bytes(body, status=status, headers={"Content-Type": content_type})

    return view


def create_app(settings: Settings, partitions: KeyPartitions) -> tuple[faust.App, Processor]:
    """The Faust app of a worker and its ``Processor``. Its clients authenticate as the settings
    say (``broker_credentials``: ``chunkfold.kafka_security.faust_options``); ``partitions``
    knows the partition counts of the output topics."""
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
        producer_acks=-1,
        producer_linger_ms=PRODUCER_LINGER_MS,
        producer_max_request_size=settings.max_message_bytes,
        # Acks are held until the write-behind timer has made the state durable; waiting for
        # them at shutdown or rebalance would stall (the timer is stopped by then). Unacked
        # records are simply redelivered to the next owner.
        stream_wait_empty=False,
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

    processor = Processor(settings, TableStore(table, settings.input_topic), highwater=highwater)
    metrics = processor.stats.metrics

    sending = asyncio.Lock()
    """Held while a batch is folded and its outputs handed to the producer, and while the
    write-behind captures changed state: a capture then covers only records whose outputs are
    all in the producer, so the flush before their acknowledgement covers those outputs."""

    async def send(items: list[Output]) -> None:
        producer_send = app.producer.send
        for item in items:
            partition = partitions(item.topic, item.key)
            await producer_send(
                item.topic, item.key, item.value, partition=partition, timestamp=None, headers=None
            )

    @app.agent(chunks, name="fold")
    async def fold(stream: Any) -> None:
        # Faust's per-record path (a wait_first per message, a send per output awaited one by
        # one) is what limits this driver: records are taken in batches, their outputs sent
        # together, and the events that changed no state acknowledged after those sends.
        async for events in stream.noack_take(BATCH_MAX_RECORDS, within=BATCH_WITHIN_S):
            async with sending:
                await _fold_batch(events)

    async def _fold_batch(events: list[Any]) -> None:
        """Fold a batch and send its outputs; acknowledge the records that changed no state."""
        out: list[Output] = []
        done: list[Any] = []
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
                done.append(event)
        await send(out)
        for event in done:
            event.ack()

    @app.timer(interval=settings.commit_interval_s, name="write_behind")  # type: ignore[untyped-decorator]
    async def write_behind() -> None:
        async with sending:
            await send(processor.sweep())
            batch = processor.capture()
        if not batch.writes and not batch.acks:
            return
        await app.producer.flush()
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
