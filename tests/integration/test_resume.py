"""Resuming a completion's events (``EventsSource.resume_events``) on a real broker, and
``chunkfold watch`` following a live completion from a worker's query listener to its end.

Event records are written straight to an events topic, several completions interleaved on the
same partitions and some seqs written twice (as an at-least-once redelivery does), behind
records of other completions written earlier. A fake snapshot stands in for the worker's state.
Checked: exactly the events with seq >= from_seq, in order, read from ``events_from`` on (the
consumer fetches nothing before it); a live completion's stream ends only after its last event,
once the snapshot has turned terminal; a completion without events yet is read from the
partition's end; with ``exactly_once`` an aborted transaction's events never show; a missing seq
is an error; the consumer is stopped however the stream ends.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from chunkfold.config import Settings
from chunkfold.core.outputs import event_value
from chunkfold.drivers.partitions import KeyPartitions
from chunkfold.kafka_io import KafkaClients, ensure_topics, make_producer
from chunkfold.query.resume import EventsSource, ResumeError
from tests.harness import (
    WorkerProcess,
    collect,
    done_count,
    fresh_settings,
    produce,
    settings_env,
    start_workers,
    wait_for,
)
from tests.postgres import free_port
from tests.shapes import gateway_records

pytestmark = pytest.mark.integration

PARTITIONS = 2
IDLE_POLL_MS = 100


class WatchedConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """A consumer that notes the offsets its fetches returned and whether it was stopped."""

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        self.fetched: list[int] = []
        self.stopped = False

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        batch = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        for records in batch.values():
            self.fetched.extend(record.offset for record in records)
        return batch

    async def stop(self) -> None:
        self.stopped = True
        await super().stop()


@dataclass(frozen=True)
class WatchedClients(KafkaClients):
    """``KafkaClients`` whose consumers are ``WatchedConsumer``s, kept in ``consumers``."""

    consumers: list[WatchedConsumer] = field(default_factory=list)

    def consumer(self, *topics: str, **options: Any) -> WatchedConsumer:
        consumer = WatchedConsumer(*topics, bootstrap_servers=self.servers, **self.options, **options)
        self.consumers.append(consumer)
        return consumer


@dataclass
class Topic:
    """A fresh events topic with ``PARTITIONS`` partitions, and how keys map onto them."""

    settings: Settings
    partitions: KeyPartitions

    def partition(self, key: bytes) -> int:
        return self.partitions(self.settings.events_topic, key)

    def source(self, clients: WatchedClients, **overrides: Any) -> EventsSource:
        settings = self.settings.model_copy(update=overrides)
        return EventsSource(settings, clients, self.partition, idle_poll_ms=IDLE_POLL_MS)

    def clients(self) -> WatchedClients:
        return WatchedClients(self.settings.bootstrap_servers)


@pytest.fixture
def topic(kafka: str) -> Topic:
    settings = fresh_settings(kafka, partitions=PARTITIONS)
    asyncio.run(ensure_topics(kafka, [settings.events_topic], PARTITIONS))
    return Topic(settings, KeyPartitions({settings.events_topic: PARTITIONS}))


def neighbour(topic: Topic, completion_id: str) -> str:
    """Another completion id on the same partition as ``completion_id``."""
    partition = topic.partition(completion_id.encode())
    return next(
        other
        for other in (f"{completion_id}-neighbour-{n}" for n in range(1000))
        if topic.partition(other.encode()) == partition
    )


def value(completion_id: str, seq: int, note: str = "") -> bytes:
    event = {"type": "content.delta", "choice_index": 0, "seq": seq, "delta": f"{completion_id}/{seq}{note}"}
    return orjson.dumps(event_value(completion_id, event))


class Writer:
    """Writes event records to the topic's partition of their key, and returns their offsets."""

    def __init__(self, topic: Topic, producer: AIOKafkaProducer) -> None:
        self.topic = topic
        self.producer = producer

    async def write(self, completion_id: str, data: bytes) -> int:
        key = completion_id.encode()
        metadata = await self.producer.send_and_wait(
            self.topic.settings.events_topic, data, key=key, partition=self.topic.partition(key)
        )
        offset: int = metadata.offset
        return offset

    async def events(self, completion_id: str, seqs: Iterable[int]) -> list[int]:
        return [await self.write(completion_id, value(completion_id, seq)) for seq in seqs]


async def started(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    await producer.start()
    return producer


def fixed(state: dict[str, Any] | None) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    async def snapshot() -> dict[str, Any] | None:
        return state

    return snapshot


def finished(event_count: int, events_from: int | None) -> dict[str, Any]:
    return {"status": "completed", "event_count": event_count, "events_from": events_from}


async def resumed(
    source: EventsSource,
    completion_id: str,
    from_seq: int,
    snapshot: Callable[[], Awaitable[dict[str, Any] | None]],
) -> list[bytes]:
    stream = source.resume_events(completion_id, from_seq, snapshot)
    return await asyncio.wait_for(_drain(stream), timeout=30)


async def _drain(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [item async for item in stream]


def test_resume_from_any_seq_gives_exactly_the_rest_in_order_read_from_events_from(topic: Topic) -> None:
    rng = random.Random(15)
    tag = uuid.uuid4().hex[:6]
    lengths = {f"{tag}-{name}": length for name, length in zip("abcdef", (30, 1, 17, 24, 9, 40), strict=True)}

    async def write() -> dict[str, int]:
        """The offset of each completion's first event."""
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        writer = Writer(topic, producer)
        try:
            for index in range(40):  # other completions' events, before any of these started
                await writer.events(f"{tag}-earlier-{index}", [0])
            first: dict[str, int] = {}
            sent = dict.fromkeys(lengths, 0)
            while any(sent[c] < n for c, n in lengths.items()):
                completion_id = rng.choice([c for c, n in lengths.items() if sent[c] < n])
                offset = await writer.write(completion_id, value(completion_id, sent[completion_id]))
                first.setdefault(completion_id, offset)
                sent[completion_id] += 1
                if rng.random() < 0.2:  # redelivered: its last few seqs again, as they were
                    await writer.events(
                        completion_id, range(rng.randrange(sent[completion_id]), sent[completion_id])
                    )
            return first
        finally:
            await producer.stop()

    first = asyncio.run(write())
    assert len({topic.partition(c.encode()) for c in lengths}) == PARTITIONS, "completions share partitions"
    for completion_id, length in lengths.items():
        assert first[completion_id] > 0, "other completions' records lie before its first event"
        expected = [value(completion_id, seq) for seq in range(length)]
        for from_seq in sorted({0, length - 1, rng.randrange(length), rng.randrange(length)}):
            clients = topic.clients()
            state = finished(length, first[completion_id])
            got = asyncio.run(resumed(topic.source(clients), completion_id, from_seq, fixed(state)))
            assert got == expected[from_seq:], (completion_id, from_seq)
            (consumer,) = clients.consumers
            assert consumer.stopped
            assert consumer.fetched, "it read the topic"
            assert [offset for offset in consumer.fetched if offset < first[completion_id]] == []
        clients = topic.clients()
        past_the_end = asyncio.run(resumed(topic.source(clients), completion_id, length, fixed(state)))
        assert past_the_end == [] and clients.consumers == [], "nothing to read: no consumer"


class LiveState:
    """The snapshot of a completion a test moves along; counts the snapshots taken."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        self.state = state
        self.taken = 0

    async def __call__(self) -> dict[str, Any] | None:
        self.taken += 1
        return None if self.state is None else dict(self.state)

    async def taken_again(self, times: int = 2) -> None:
        """Until the reader has asked ``times`` more snapshots (it caught up and waits)."""
        target = self.taken + times
        while self.taken < target:
            await asyncio.sleep(0.01)


def test_a_live_completion_ends_only_after_its_last_event_once_terminal(topic: Topic) -> None:
    completion_id = f"live-{uuid.uuid4().hex[:6]}"
    everything = [value(completion_id, seq) for seq in range(12)]

    async def scenario() -> list[bytes]:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        writer = Writer(topic, producer)
        got: list[bytes] = []
        try:
            await writer.events(neighbour(topic, completion_id), range(5))
            first, *_ = await writer.events(completion_id, range(5))
            live = LiveState({"status": "in_progress", "event_count": 5, "events_from": first})

            async def read() -> None:
                async for item in topic.source(topic.clients()).resume_events(completion_id, 2, live):
                    got.append(item)

            reader = asyncio.create_task(read())
            await live.taken_again()
            assert got == everything[2:5] and not reader.done()
            await writer.events(completion_id, [5, 6, 7, 6, 7, 8, 9])
            live.state = {"status": "in_progress", "event_count": 10, "events_from": first}
            await live.taken_again()
            assert got == everything[2:10] and not reader.done()
            # terminal before its last events are visible (as an uncommitted transaction's are not)
            live.state = {"status": "completed", "event_count": 12, "events_from": first}
            await live.taken_again(1)
            await asyncio.sleep(0.5)
            assert got == everything[2:10] and not reader.done(), "it waits for seqs 10 and 11"
            await writer.events(completion_id, [10, 11, 11])
            await asyncio.wait_for(reader, timeout=30)
            return got
        finally:
            await producer.stop()

    assert asyncio.run(scenario()) == everything[2:]


def test_a_live_completion_on_a_busy_partition_ends_soon_after_its_last_event(topic: Topic) -> None:
    """A neighbour keeps its events partition busy (the reader never sees an empty fetch):
    the stream still asks for snapshots and ends within a second of its completion's end."""
    completion_id = f"busy-{uuid.uuid4().hex[:6]}"
    other = neighbour(topic, completion_id)

    async def scenario() -> float:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        writer = Writer(topic, producer)
        busy = True

        async def keep_busy() -> None:
            seq = 0
            while busy:
                await writer.events(other, [seq])
                seq += 1

        noise = asyncio.create_task(keep_busy())
        try:
            first, *_ = await writer.events(completion_id, range(6))
            live = LiveState({"status": "in_progress", "event_count": 6, "events_from": first})
            source = topic.source(topic.clients())
            reader = asyncio.create_task(_drain(source.resume_events(completion_id, 0, live)))
            await live.taken_again()
            live.state = {"status": "completed", "event_count": 6, "events_from": first}
            ended_at = asyncio.get_running_loop().time()
            got = await asyncio.wait_for(reader, timeout=30)
            assert got == [value(completion_id, seq) for seq in range(6)]
            return asyncio.get_running_loop().time() - ended_at
        finally:
            busy = False
            await noise
            await producer.stop()

    assert asyncio.run(scenario()) < 1.0


def test_a_completion_without_events_yet_is_read_from_the_partitions_end(topic: Topic) -> None:
    completion_id = f"new-{uuid.uuid4().hex[:6]}"
    clients = topic.clients()

    async def scenario() -> tuple[int, list[bytes]]:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        writer = Writer(topic, producer)
        try:
            end = 1 + (await writer.events(neighbour(topic, completion_id), range(20)))[-1]
            live = LiveState({"status": "in_progress", "event_count": 0, "events_from": None})
            reader = asyncio.create_task(resumed(topic.source(clients), completion_id, 0, live))
            await live.taken_again(3)
            await writer.events(completion_id, range(4))
            live.state = {"status": "completed", "event_count": 4, "events_from": None}
            return end, await reader
        finally:
            await producer.stop()

    end, got = asyncio.run(scenario())
    assert got == [value(completion_id, seq) for seq in range(4)]
    (consumer,) = clients.consumers
    assert min(consumer.fetched) == end, "nothing before the end it saw at the start was read"


def test_a_forgotten_completion_is_read_from_the_beginning_and_ends_when_caught_up(topic: Topic) -> None:
    completion_id = f"gone-{uuid.uuid4().hex[:6]}"

    async def write() -> None:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        try:
            await Writer(topic, producer).events(completion_id, [0, 1, 1, 2])
        finally:
            await producer.stop()

    asyncio.run(write())
    got = asyncio.run(resumed(topic.source(topic.clients()), completion_id, 1, fixed(None)))
    assert got == [value(completion_id, 1), value(completion_id, 2)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_exactly_once_serves_committed_events_only(topic: Topic, guarantee: str) -> None:
    """Seqs 3-5 are written in a transaction that aborts, then again in one that commits: a
    committed reader gives the committed ones; the at-least-once reader, which reads everything,
    the aborted ones (so the test tells the two apart)."""
    completion_id = f"tx-{uuid.uuid4().hex[:6]}"

    async def write() -> int:
        producer = await started(
            make_producer(topic.settings.bootstrap_servers, transactional_id=f"tx-{completion_id}")
        )
        writer = Writer(topic, producer)
        try:
            async with producer.transaction():
                first, *_ = await writer.events(completion_id, range(3))
            await producer.begin_transaction()
            for seq in range(3, 6):
                await writer.write(completion_id, value(completion_id, seq, " (aborted)"))
            await producer.abort_transaction()
            async with producer.transaction():
                await writer.events(completion_id, range(3, 6))
            return first
        finally:
            await producer.stop()

    first = asyncio.run(write())
    source = topic.source(topic.clients(), processing_guarantee=guarantee)
    got = asyncio.run(resumed(source, completion_id, 0, fixed(finished(6, first))))
    committed = [value(completion_id, seq) for seq in range(6)]
    if guarantee == "exactly_once":
        assert got == committed
    else:
        assert got == committed[:3] + [value(completion_id, seq, " (aborted)") for seq in range(3, 6)]


def test_a_missing_seq_is_an_error_and_the_consumer_is_stopped(topic: Topic) -> None:
    completion_id = f"gap-{uuid.uuid4().hex[:6]}"

    async def write() -> int:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        try:
            return (await Writer(topic, producer).events(completion_id, [0, 1, 3, 4]))[0]
        finally:
            await producer.stop()

    first = asyncio.run(write())
    clients = topic.clients()
    got: list[bytes] = []

    async def read() -> None:
        async for item in topic.source(clients).resume_events(completion_id, 1, fixed(finished(5, first))):
            got.append(item)

    with pytest.raises(ResumeError, match=rf"seq 2 of '{completion_id}' is missing .* has seq 3"):
        asyncio.run(read())
    assert got == [value(completion_id, 1)]
    assert [c.stopped for c in clients.consumers] == [True]


def test_a_stream_closed_or_cancelled_midway_stops_its_consumer(topic: Topic) -> None:
    completion_id = f"drop-{uuid.uuid4().hex[:6]}"

    async def scenario() -> list[WatchedConsumer]:
        producer = await started(make_producer(topic.settings.bootstrap_servers))
        try:
            first = (await Writer(topic, producer).events(completion_id, range(5)))[0]
        finally:
            await producer.stop()
        live = {"status": "in_progress", "event_count": 5, "events_from": first}
        clients = topic.clients()
        stream = topic.source(clients).resume_events(completion_id, 0, fixed(live))
        assert await anext(stream) == value(completion_id, 0)
        await stream.aclose()  # a client that went away after the first event

        async def read_all() -> None:
            async for _ in topic.source(clients).resume_events(completion_id, 0, fixed(live)):
                pass

        waiting = asyncio.create_task(read_all())  # caught up, waiting for more
        while len(clients.consumers) < 2 or len(clients.consumers[1].fetched) < 5:
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return clients.consumers

    assert [c.stopped for c in asyncio.run(scenario())] == [True, True]


def test_watch_follows_a_live_completion_from_a_worker_to_its_end(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """``chunkfold watch`` started while the completion is half folded, with the worker's
    environment (its query port), prints the events from --from-seq on as the worker published
    them, and exits 0 after the last."""
    settings = fresh_settings(kafka, query_port=free_port())
    start_workers(settings, 1, tmp_path, workers)
    completion_id = f"watched ✓/{uuid.uuid4().hex[:6]}"
    records = gateway_records(15, completion_id)
    produce(settings, records[: len(records) // 2])
    url = f"http://127.0.0.1:{settings.query_port}/completions/{urllib.parse.quote(completion_id, safe='')}"

    def in_progress() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return bool(orjson.loads(answer.read())["status"] == "in_progress")
        except urllib.error.HTTPError:
            return False

    wait_for(in_progress, 60, "the completion open on the worker")
    watch = subprocess.Popen(
        [sys.executable, "-m", "chunkfold.cli", "watch", completion_id, "--from-seq", "3"],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        produce(settings, records[len(records) // 2 :])
        out, err = watch.communicate(timeout=120)
    finally:
        watch.kill()
    assert watch.returncode == 0, err.decode()
    published = collect(settings, done_count(1)).events_by_id()[completion_id]
    assert len(published) > 3
    assert [orjson.loads(line) for line in out.splitlines()] == published[3:]
