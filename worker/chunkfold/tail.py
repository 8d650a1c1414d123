"""Follow the output topics in a readable form (``chunkfold tail``): one line per record.

Reads committed records only, like every reader of the outputs: with ``exactly_once`` the
records of an aborted transaction never show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from chunkfold.config import Settings
from chunkfold.kafka_checks import guarded
from chunkfold.kafka_io import KafkaClients, output_consumer


def _clip(text: Any, width: int = 60) -> str:
    shown = repr(text) if not isinstance(text, str) else text.replace("\n", "\\n")
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def describe_event(e: dict[str, Any]) -> str:
    head = f"{e['completion_id']} #{e['seq']:<4} [{e['choice_index']}] {e['type']:<36}"
    t = e["type"]
    if t.endswith(".delta") and "delta" in e:
        return f"{head} {_clip(e['delta'])}"
    if t.startswith("tool_calls") and t.endswith(".delta"):
        return f"{head} {e.get('name')}[{e['index']}] {_clip(e['arguments_delta'])}"
    if t.startswith("tool_calls"):
        return f"{head} {e.get('name')}[{e['index']}] {_clip(e.get('parsed_arguments') or e['arguments'])}"
    if t.startswith("logprobs"):
        tokens = e.get("content") or e.get("refusal") or []
        return f"{head} {len(tokens)} tokens"
    body = e.get("parsed") or e.get("content") or e.get("refusal") or e.get("reasoning")
    return f"{head} {_clip(body)}"


def describe_done(d: dict[str, Any]) -> str:
    usage = d.get("usage") or {}
    timing = d.get("timing") or {}
    parts = [
        f"{d['completion_id']} DONE {d['status']}",
        f"chunks={d['chunk_count']} events={d['event_count']}",
        f"tokens={usage.get('completion_tokens')}",
        f"ttft={timing.get('time_to_first_token_ms')}ms tok/s={timing.get('tokens_per_second')}",
    ]
    if d.get("error"):
        parts.append(f"error={d['error']['type']}: {_clip(d['error']['message'])}")
    anomalies = {k: v for k, v in (d.get("anomalies") or {}).items() if v}
    if anomalies:
        parts.append(f"anomalies={anomalies}")
    return "  ".join(parts)


async def follow(
    settings: Settings, topics: Sequence[str], *, from_beginning: bool, raw: bool, limit: int
) -> None:
    """Print each committed record of ``topics`` (output topics of ``settings``) on one line:
    described, or as its JSON value with ``raw``; return after ``limit`` records (0: never).
    A failed authentication or a denied READ: ``StartupError`` (one line)."""
    consumer = output_consumer(settings, from_beginning=from_beginning, topics=topics)
    await guarded(_print(consumer, settings, raw=raw, limit=limit), KafkaClients.of(settings), settings)


async def _print(consumer: Any, settings: Settings, *, raw: bool, limit: int) -> None:
    await consumer.start()
    seen = 0
    try:
        async for message in consumer:
            value = orjson.loads(message.value) if message.value else {}
            if raw:
                line = orjson.dumps(value).decode()
            elif message.topic == settings.events_topic:
                line = describe_event(value)
            elif message.topic == settings.done_topic:
                line = describe_done(value)
            else:
                line = f"{value.get('key')} DEADLETTER {value.get('reason')}: {value.get('detail')}"
            print(line, flush=True)
            seen += 1
            if limit and seen >= limit:
                return
    finally:
        await consumer.stop()
