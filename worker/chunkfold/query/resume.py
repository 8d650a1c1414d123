"""Resume a completion's events from any seq: read back from the events topic, then live.

``EventsSource.resume_events`` yields the record values of one completion's events, exactly as
the worker published them, from seq ``from_seq`` on: in seq order, each seq once, no gap, and
ends after the completion's last event. ``sse_frame`` turns one of them into a Server-Sent
Events message (what ``GET /completions/{id}/events`` streams).

Where reading starts: the completion's state records ``events_from``, a lower bound of the
offset of its first event on its events partition, so the reader seeks there and filters by key
instead of scanning the topic. Without it: a completion without events yet starts at the
partition's end (taken before a fresh snapshot that still shows none: every event it publishes
later lands there or after); one whose events were published but whose position is unknown, or
that the first snapshot does not know, starts at the partition's beginning (a scan of the
partition, the price of a worker that keeps no positions).

Where reading ends: the reader asks ``snapshot()`` whenever it has caught up with the
partition (its position reached the high watermark of the last fetch, or the last stable offset
when reading committed records only), and at least every ``idle_poll_ms`` while the partition
is so busy that it never quite catches up. A terminal status gives the final
``event_count``; ``in_progress`` means more is coming; ``None`` means the worker has forgotten
the completion (its tombstone expired, so every event of it was published long ago): when the
final count was never learnt, the stream ends after what was read.

With ``exactly_once`` the reader sees committed records only (``read_committed``): an aborted
transaction's events never show, and a live event shows once its transaction commits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from chunkfold.config import Settings
from chunkfold.kafka_io import KafkaClients

MIN_SNAPSHOT_GAP_S = 0.05
"""A reader that keeps catching up with a partition asks for a snapshot at most this often (a
snapshot may be a request to another member)."""

Snapshot = Callable[[], Awaitable[dict[str, Any] | None]]
"""The completion as it stands now (``Processor.snapshot``), or None once it is forgotten."""

IDLE_POLL_MS = 200
"""How long a fetch waits for new records before the reader checks whether it has caught up:
at most this long between a finished completion's last event and the end of the stream, and
the rate at which a caught-up reader of a live completion asks for a snapshot."""

FETCH_BYTES = 1 << 20
"""The most record bytes one fetch of the events partition holds (a single larger record is
still returned whole): the reader keeps one fetch in memory at a time."""


class ResumeError(RuntimeError):
    """The events topic disagrees with the completion's state: a seq is missing (records lost,
    or deleted by retention before they were read) or a record under its key is no event."""


class EventsSource:
    """Reads completions' events back from the events topic of ``settings``; ``events_partition``
    maps a completion's key to its partition of that topic (as the producer placed it)."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaClients,
        events_partition: Callable[[bytes], int],
        *,
        idle_poll_ms: int = IDLE_POLL_MS,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.events_partition = events_partition
        self.idle_poll_ms = idle_poll_ms
        self.read_committed = settings.processing_guarantee == "exactly_once"

    async def resume_events(
        self, completion_id: str, from_seq: int, snapshot: Snapshot
    ) -> AsyncIterator[bytes]:
        """The events of ``completion_id`` with seq >= ``from_seq`` (see the module docstring).

        One consumer per call, assigned the completion's events partition (no group, no
        commits), stopped however the iteration ends: exhausted, closed or cancelled (a client
        that disconnects); none when the first snapshot already shows that no seq >=
        ``from_seq`` will come. Raises ``ValueError`` for a negative ``from_seq`` (on the first
        ``__anext__``: check it before answering) and ``ResumeError`` when the topic lacks a
        seq the stream must contain.
        """
        if from_seq < 0:
            raise ValueError(f"from_seq must be 0 or more, not {from_seq}")
        state = await snapshot()
        final_count = _final_count(state)
        if final_count is not None and from_seq >= final_count:
            return  # nothing at or after from_seq will ever come: no need to read
        key = completion_id.encode("utf-8")
        partition = TopicPartition(self.settings.events_topic, self.events_partition(key))
        consumer = self.kafka.consumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if self.read_committed else "read_uncommitted",
            max_partition_fetch_bytes=FETCH_BYTES,
            fetch_max_bytes=FETCH_BYTES,
        )
        try:
            await consumer.start()
            consumer.assign([partition])
            state = await self._seek_start(consumer, partition, state, snapshot)
            final_count = _final_count(state)
            expected = from_seq
            last_snapshot = time.monotonic()
            while final_count is None or expected < final_count:
                fetched = await consumer.getmany(partition, timeout_ms=self.idle_poll_ms)
                records = fetched.get(partition, [])
                for record in records:
                    if record.key != key:
                        continue
                    seq, value = _event(record.value, completion_id, record.offset)
                    if seq < expected:
                        continue  # before from_seq, or an at-least-once redelivery
                    if seq > expected:
                        raise ResumeError(
                            f"seq {expected} of {completion_id!r} is missing from "
                            f"{partition.topic}[{partition.partition}]: the next event, at offset "
                            f"{record.offset}, has seq {seq}"
                        )
                    yield value
                    expected += 1
                    if final_count is not None and expected >= final_count:
                        return
                now = time.monotonic()
                if final_count is None and (
                    now >= last_snapshot + self.idle_poll_ms / 1000
                    or (
                        now >= last_snapshot + MIN_SNAPSHOT_GAP_S
                        and await self._caught_up(consumer, partition)
                    )
                ):
                    state = await snapshot()
                    if state is None:
                        return  # forgotten: everything it published was read
                    final_count = _final_count(state)
                    last_snapshot = time.monotonic()
        finally:
            await consumer.stop()

    async def _seek_start(
        self,
        consumer: AIOKafkaConsumer,
        partition: TopicPartition,
        state: dict[str, Any] | None,
        snapshot: Snapshot,
    ) -> dict[str, Any] | None:
        """Position ``consumer`` at or before the completion's first event, and return the
        state that decided where: its ``events_from``; for a completion without events, the
        partition's end taken before a fresh snapshot that still shows none (each event handed
        to the producer after that snapshot lands at that end or later); else the beginning."""
        if state is not None and state["events_from"] is None and state["event_count"] == 0:
            end = (await consumer.end_offsets([partition]))[partition]
            state = await snapshot()
            if state is not None and state["events_from"] is None and state["event_count"] == 0:
                consumer.seek(partition, end)
                return state
        if state is not None and state["events_from"] is not None:
            consumer.seek(partition, state["events_from"])
        else:
            await consumer.seek_to_beginning(partition)
        return state

    async def _caught_up(self, consumer: AIOKafkaConsumer, partition: TopicPartition) -> bool:
        """Whether ``consumer`` has read all that its last fetch said the partition holds
        (for a committed reader: up to the last stable offset)."""
        end = consumer.last_stable_offset(partition) if self.read_committed else consumer.highwater(partition)
        return end is not None and await consumer.position(partition) >= end


def _final_count(state: dict[str, Any] | None) -> int | None:
    """The completion's event count once no more can come (terminal status), else None."""
    if state is None or state["status"] == "in_progress":
        return None
    count: int = state["event_count"]
    return count


def _event(value: bytes | None, completion_id: str, offset: int) -> tuple[int, bytes]:
    """The seq of an event record's ``value``, and the value; ``ResumeError`` when it is no event."""
    try:
        seq = orjson.loads(value or b"")["seq"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        seq = None
    if value is None or type(seq) is not int:
        raise ResumeError(
            f"the record at offset {offset} keyed {completion_id!r} is no event (no integer seq)"
        )
    return seq, value


def sse_frame(value: bytes) -> bytes:
    """One Server-Sent Events message for an event record's ``value``: ``id`` its seq (what a
    client sends back as ``Last-Event-ID``), ``event`` its type, ``data`` the JSON exactly as
    published. Compact JSON has no line break; one in ``value`` still starts a new ``data:``
    line (the client joins them with a newline, whitespace the JSON allows there)."""
    try:
        event = orjson.loads(value)
        seq, event_type = event["seq"], event["type"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        raise ValueError(f"not an event record (a JSON object with seq and type): {value[:80]!r}") from None
    if type(seq) is not int or not isinstance(event_type, str) or any(c in event_type for c in "\r\n"):
        raise ValueError(f"an event needs an integer seq and a one-line type: {value[:80]!r}")
    data = b"".join(b"data: " + line + b"\n" for line in value.splitlines())
    return b"id: %d\nevent: %b\n%b\n" % (seq, event_type.encode(), data)
