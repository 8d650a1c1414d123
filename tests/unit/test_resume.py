"""Resume without a broker: the SSE frame of an event record, and what ``resume_events``
settles before it reads (a bad ``from_seq``, a finished completion with nothing left to send).
The reading itself runs on a real broker: tests/integration/test_resume.py."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from chunkfold.config import Settings
from chunkfold.kafka_io import KafkaClients
from chunkfold.query.resume import EventsSource, sse_frame
from chunkfold.watch import SseDecoder

pytestmark = pytest.mark.unit

UNREACHABLE = KafkaClients("127.0.0.1:1")
"""No broker listens there: a test that passes with it never touched Kafka."""


def event_value(seq: int, event_type: str = "content.delta", **extra: Any) -> bytes:
    return orjson.dumps({"type": event_type, "completion_id": "c-1", "choice_index": 0, "seq": seq, **extra})


def test_a_frame_carries_seq_type_and_the_value_exactly() -> None:
    value = event_value(7, delta="héllo\nworld")
    assert sse_frame(value) == b"id: 7\nevent: content.delta\ndata: " + value + b"\n\n"


def test_a_value_with_line_breaks_becomes_data_lines_a_client_joins_back() -> None:
    value = b'{"type": "content.done",\r\n "seq": 3,\r "choice_index": 0,\n "content": "a\\nb"}'
    frame = sse_frame(value)
    assert frame.count(b"\ndata: ") == 4
    (event,) = SseDecoder().feed(frame)
    assert (event.id, event.event) == ("3", "content.done")
    assert orjson.loads(event.data) == orjson.loads(value)


def test_frames_in_a_row_decode_to_the_values_in_order() -> None:
    values = [event_value(seq, delta=f"part {seq}") for seq in range(5)]
    events = SseDecoder().feed(b"".join(sse_frame(value) for value in values))
    assert [event.data.encode() for event in events] == values
    assert [event.id for event in events] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "content.delta"}',
        b'{"seq": 1}',
        b'{"seq": "1", "type": "content.delta"}',
        b'{"seq": 1, "type": "content.delta\\nevent: injected"}',
        b'{"seq": 1, "type": 5}',
    ],
)
def test_a_value_that_is_no_event_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match="seq"):
        sse_frame(value)


def drain(source: EventsSource, from_seq: int, state: dict[str, Any] | None) -> tuple[list[bytes], int]:
    """The values ``resume_events`` yields with a snapshot that is always ``state``, and how
    many snapshots it took."""
    asked = 0

    async def snapshot() -> dict[str, Any] | None:
        nonlocal asked
        asked += 1
        return state

    async def run() -> list[bytes]:
        return [value async for value in source.resume_events("c-1", from_seq, snapshot)]

    return asyncio.run(run()), asked


def finished(event_count: int) -> dict[str, Any]:
    return {"status": "completed", "event_count": event_count, "events_from": 12, "last_seq": event_count - 1}


@pytest.mark.parametrize("from_seq", [4, 5, 100])
def test_a_finished_completion_resumed_at_or_after_its_end_yields_nothing_without_kafka(
    from_seq: int,
) -> None:
    source = EventsSource(Settings(), UNREACHABLE, lambda key: 0)
    assert drain(source, from_seq, finished(event_count=4)) == ([], 1)


def test_a_negative_from_seq_is_refused_before_a_snapshot_is_taken() -> None:
    source = EventsSource(Settings(), UNREACHABLE, lambda key: 0)

    async def snapshot() -> dict[str, Any] | None:
        raise AssertionError("no snapshot for a request refused anyway")

    async def first() -> bytes:
        return await anext(source.resume_events("c-1", -1, snapshot))

    with pytest.raises(ValueError, match="from_seq must be 0 or more, not -1"):
        asyncio.run(first())
