"""``chunkfold produce``: publish captures to the input topic as a gateway would."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord, capture_records, interleave, load_captures
from chunkfold.kafka_io import bootstrap, ensure_topics, make_producer, sleep_until


def register(sub: Any) -> None:
    p = sub.add_parser(
        "produce", help="publish SSE / JSON Lines captures (files or directories) as a gateway would"
    )
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--bootstrap-servers")
    p.add_argument("--topic", help="input topic (default completion-chunks)")
    p.add_argument("--partitions", type=int, help="partitions if the topic must be created (default 8)")
    p.add_argument("--rate", type=float, default=0.0, help="records per second (0: as fast as possible)")
    p.add_argument(
        "--repeat", type=int, default=1, help="publish every capture N times as distinct completions"
    )
    p.add_argument("--no-seq", action="store_true", help="leave out the chunkfold.seq header")
    p.set_defaults(func=cmd_produce)


async def publish(
    settings: Settings, records: list[GatewayRecord], rate: float = 0.0, topic: str | None = None
) -> int:
    servers = bootstrap(settings)
    topic = topic or settings.input_topic
    await ensure_topics(servers, [topic], settings.partitions, settings.replication_factor)
    producer = make_producer(servers)
    await producer.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for i, r in enumerate(records):
            if rate > 0:
                await sleep_until(start + i / rate)
            await producer.send(
                topic, r.value, key=r.key, headers=r.headers, timestamp_ms=int(time.time() * 1000)
            )
        await producer.flush()
    finally:
        await producer.stop()
    return len(records)


def cmd_produce(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        bootstrap_servers=args.bootstrap_servers, input_topic=args.topic, partitions=args.partitions
    )
    streams: list[list[GatewayRecord]] = []
    for _, text, request in load_captures(args.paths):
        for n in range(args.repeat):
            suffix = f"-{n}" if args.repeat > 1 else ""
            streams += capture_records(text, request, key_suffix=suffix, with_seq=not args.no_seq).values()
    records = list(interleave(streams))
    sent = asyncio.run(publish(settings, records, args.rate))
    print(
        f"published {sent} records of {len(streams)} completions to {settings.input_topic}", file=sys.stderr
    )
    return 0
