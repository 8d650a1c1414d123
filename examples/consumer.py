"""A downstream service reading chunkfold's output topics, with only the ``chunkfold_schemas`` package.

    pip install ./schemas aiokafka          # chunkfold-schemas (pydantic only) and a Kafka client
    KAFKA_BOOTSTRAP_SERVERS=localhost:9092 python examples/consumer.py [GROUP_ID]
    chunkfold replay capture.sse | python examples/consumer.py -     # no Kafka, no aiokafka

It consumes ``completion-events`` and ``completion-done`` as its own consumer group (or reads
``chunkfold replay --format kafka`` lines from standard input with ``-``), parses every value
into its typed record (``chunkfold_schemas.events.parse_event``, ``chunkfold_schemas.done.parse_done``) and acts on
it once: delivery is at least once, so it drops repeats of an event by ``(completion_id, seq)``
and of a finished completion by ``completion_id``. A real service would keep those keys in its
own store (with a TTL) and commit offsets after its side effects. It prints one line per
finished text or refusal of a choice, finished tool call and finished completion:

    chatcmpl-…[0]: '{"city":"San Francisco","temperature":61,"units":"f"}'
    chatcmpl-…: call get_weather({"city":"San Francisco","state":"CA"})
    chatcmpl-…: completed after 17 chunks, 93 tokens

Invalid values are reported on standard error and skipped. The parsing part needs only
``pydantic`` and ``chunkfold_schemas`` (which imports nothing from ``chunkfold``); Kafka needs ``aiokafka``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from chunkfold_schemas.done import DoneRecord, parse_done
from chunkfold_schemas.events import CompletionEvent, parse_event

EVENTS_TOPIC = os.environ.get("CHUNKFOLD_EVENTS_TOPIC", "completion-events")
DONE_TOPIC = os.environ.get("CHUNKFOLD_DONE_TOPIC", "completion-done")

Record = CompletionEvent | DoneRecord


def parse_record(topic: str, value: bytes) -> Record:
    """The typed record of one ``completion-events`` or ``completion-done`` value.

    Raises ``pydantic.ValidationError`` for a value that is not a valid record of its topic.
    """
    if topic == DONE_TOPIC:
        return parse_done(value)
    if topic == EVENTS_TOPIC:
        return parse_event(value)
    raise ValueError(f"{topic} is not a chunkfold output topic")


@dataclass
class Deduplicator:
    """Remembers what was handled: events by (completion id, seq), completions by id."""

    events: set[tuple[str, int]] = field(default_factory=set)
    completions: set[str] = field(default_factory=set)

    def first_time(self, record: Record) -> bool:
        if isinstance(record, DoneRecord):
            new = record.completion_id not in self.completions
            self.completions.add(record.completion_id)
        else:
            key = (record.completion_id, record.seq)
            new = key not in self.events
            self.events.add(key)
        return new


def describe(record: Record) -> str | None:
    """What this example does with a record: one line for the events it cares about."""
    if isinstance(record, DoneRecord):
        usage = record.usage.total_tokens if record.usage else None
        return f"{record.completion_id}: {record.status} after {record.chunk_count} chunks, {usage} tokens"
    if record.type == "tool_calls.function.arguments.done":
        return f"{record.completion_id}: call {record.name}({record.arguments})"
    if record.type == "content.done":
        return f"{record.completion_id}[{record.choice_index}]: {record.content[:80]!r}"
    if record.type == "refusal.done":
        return f"{record.completion_id}[{record.choice_index}]: refused: {record.refusal[:80]!r}"
    return None


def handle(topic: str, value: bytes, seen: Deduplicator) -> str | None:
    """Parse, de-duplicate and describe one output record: the line to print, if any."""
    try:
        record = parse_record(topic, value)
    except ValidationError as exc:
        print(f"skipping an invalid {topic} record: {exc}", file=sys.stderr)
        return None
    return describe(record) if seen.first_time(record) else None


def read_replay(lines: Iterable[str]) -> None:
    """Handle ``chunkfold replay --format kafka`` lines (``{"topic", "key", "value"}``); records
    of other topics (dead letters) are skipped."""
    seen = Deduplicator()
    for line in lines:
        if not line.strip():
            continue
        out = json.loads(line)
        if out["topic"] in (EVENTS_TOPIC, DONE_TOPIC):
            printed = handle(out["topic"], json.dumps(out["value"]).encode(), seen)
            if printed:
                print(printed, flush=True)


async def consume(bootstrap_servers: str, group_id: str) -> None:
    from aiokafka import AIOKafkaConsumer  # only this mode needs a Kafka client

    consumer = AIOKafkaConsumer(
        EVENTS_TOPIC,
        DONE_TOPIC,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    seen = Deduplicator()
    await consumer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for messages in batches.values():
                for message in messages:
                    if message.value is None:
                        continue
                    printed = handle(message.topic, message.value, seen)
                    if printed:
                        print(printed, flush=True)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()


def main() -> int:
    if sys.argv[1:] == ["-"]:
        read_replay(sys.stdin)
        return 0
    bootstrap_servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap_servers:
        print("set KAFKA_BOOTSTRAP_SERVERS, or pass - to read `chunkfold replay` output", file=sys.stderr)
        return 2
    group_id = sys.argv[1] if len(sys.argv) > 1 else "chunkfold-example-consumer"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume(bootstrap_servers, group_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
