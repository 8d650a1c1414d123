"""``chunkfold tail``: follow ``completion-events`` and ``completion-done`` in a readable form."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from chunkfold.config import Settings
from chunkfold.kafka_io import bootstrap


def register(sub: Any) -> None:
    p = sub.add_parser("tail", help="follow completion-events / completion-done in a readable form")
    p.add_argument("--bootstrap-servers")
    p.add_argument("--events", action="store_true", help="events only")
    p.add_argument("--done", action="store_true", help="completion-done only")
    p.add_argument("--deadletter", action="store_true", help="also the dead-letter topic")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--json", action="store_true", help="print raw JSON values, one per line")
    p.add_argument("--max", type=int, default=0, help="stop after this many records")
    p.set_defaults(func=cmd_tail)


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


async def follow(settings: Settings, args: argparse.Namespace) -> None:
    topics = []
    if not args.done:
        topics.append(settings.events_topic)
    if not args.events:
        topics.append(settings.done_topic)
    if args.deadletter:
        topics.append(settings.deadletter_topic)
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap(settings),
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        group_id=None,
    )
    await consumer.start()
    seen = 0
    try:
        async for message in consumer:
            value = orjson.loads(message.value) if message.value else {}
            if args.json:
                line = orjson.dumps(value).decode()
            elif message.topic == settings.events_topic:
                line = describe_event(value)
            elif message.topic == settings.done_topic:
                line = describe_done(value)
            else:
                line = f"{value.get('key')} DEADLETTER {value.get('reason')}: {value.get('detail')}"
            print(line, flush=True)
            seen += 1
            if args.max and seen >= args.max:
                return
    finally:
        await consumer.stop()


def cmd_tail(args: argparse.Namespace) -> int:
    settings = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
    try:
        asyncio.run(follow(settings, args))
    except RuntimeError as exc:
        print(f"chunkfold tail: {exc}", file=sys.stderr)
        return 2
    return 0
