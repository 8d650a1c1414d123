"""The pydantic models in ``schemas`` accept exactly what the engine publishes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from chunkfold.config import Settings
from chunkfold.core.outputs import deadletter_value
from chunkfold.replay import replay_kafka
from chunkfold_schemas.deadletter import parse_deadletter
from chunkfold_schemas.done import parse_done
from chunkfold_schemas.events import parse_event
from tests.recorded import recordings

pytestmark = pytest.mark.unit


def published(settings: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rec in recordings():
        out += replay_kafka(rec.sse.read_text(), rec.request, settings)
    return out


@pytest.mark.parametrize(
    "settings", [Settings(), Settings(snapshots=True, partial_parse=True)], ids=["plain", "snapshots"]
)
def test_every_published_record_parses(settings: Settings) -> None:
    records = published(settings)
    kinds = set()
    for record in records:
        raw = orjson.dumps(record["value"])
        if record["topic"] == settings.events_topic:
            event = parse_event(raw)
            kinds.add(event.type)
            assert event.completion_id == record["key"]
        else:
            done = parse_done(raw)
            assert done.completion_id == record["key"]
    assert {"content.delta", "tool_calls.function.arguments.done", "logprobs.refusal.done"} <= kinds


def test_event_types_are_strict() -> None:
    with pytest.raises(ValueError):
        parse_event(b'{"type": "content.delta", "completion_id": "x", "choice_index": 0, "seq": 0}')
    with pytest.raises(ValueError):
        parse_event(b'{"type": "nonsense", "completion_id": "x", "choice_index": 0, "seq": 0, "delta": ""}')


def test_deadletter_keeps_the_original_bytes() -> None:
    value = deadletter_value(
        reason="invalid_json",
        detail="unexpected character",
        key=b"k",
        value=b"\xff\xfenot utf8",
        headers=[("chunkfold.seq", b"3")],
        topic="completion-chunks",
        partition=2,
        offset=9,
        timestamp_ms=1,
    )
    parsed = parse_deadletter(orjson.dumps(value))
    assert parsed.original_value() == b"\xff\xfenot utf8"
    assert parsed.value_text is None
    assert parsed.headers[0].key == "chunkfold.seq"
