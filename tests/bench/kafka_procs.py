"""Helper processes of the Kafka benchmark section, each run as its own OS process:

``python -m tests.bench.kafka_procs pipe``: the ceiling a Faust worker is compared with, a bare
aiokafka consume-then-produce loop: every input record is produced unchanged (key, value,
headers) to the output topic, and the group's offsets are committed every ``--commit-interval``
seconds once everything produced before is acknowledged (at least once, like the worker).

``python -m tests.bench.kafka_procs load``: a gateway-like load generator: a producer
(acks=all, linger 5 ms) sending pre-built records on a fixed schedule, each with its send time as
the record timestamp; writes the send time (epoch s, float64) of every record to a file.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import gc
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from chunkfold.drivers.direct.sender import BatchSender
from chunkfold.kafka_io import make_producer

PIPE_LINGER_MS = 2
"""The worker's ``producer_linger_ms``, so that both batch their output the same way."""

LOAD_TICK_S = 0.001
"""The load generator sends what is due at most once per tick."""

Header = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What ``load`` sends: ``records[i]`` (key, value, headers) at ``due[i]`` s after the start."""

    records: list[tuple[bytes, bytes, list[Header]]]
    due: list[float]

    def dump(self, path: Path) -> None:
        path.write_bytes(pickle.dumps((self.records, self.due), protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: Path) -> LoadPlan:
        records, due = pickle.loads(path.read_bytes())
        return cls(records, due)


def read_times(path: Path) -> list[float]:
    times = array.array("d")
    times.frombytes(path.read_bytes())
    return times.tolist()


async def pipe(servers: str, source: str, sink: str, group: str, commit_interval: float, ready: Path) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=PIPE_LINGER_MS)
    await producer.start()
    await consumer.start()
    positions: dict[TopicPartition, int] = {}

    async def commit_loop() -> None:
        while True:
            await asyncio.sleep(commit_interval)
            offsets = dict(positions)
            if offsets:
                await producer.flush()
                await consumer.commit(offsets)

    committer = asyncio.create_task(commit_loop())
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.02)
        ready.write_text("ready\n")
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                for m in messages:
                    await producer.send(sink, m.value, key=m.key, headers=list(m.headers))
                positions[tp] = messages[-1].offset + 1
    finally:
        committer.cancel()
        await consumer.stop()
        await producer.stop()


async def load(servers: str, topic: str, plan: LoadPlan, out: Path, ready: Path | None) -> None:
    """Send the plan on schedule through the worker's ``BatchSender`` (records batched as
    ``producer.send`` batches them, at a fraction of its CPU: on a 2-core machine the load
    generator competes with what it measures)."""
    producer = make_producer(servers, request_timeout_ms=120_000)
    await producer.start()
    sender = BatchSender(producer)
    await sender.start([topic])
    sent = array.array("d", bytes(8 * len(plan.records)))
    records, due = plan.records, plan.due
    try:
        if ready is not None:
            ready.write_text("ready\n")
        start = time.time() + 0.05
        i, n = 0, len(records)
        while i < n:
            while i < n and due[i] <= time.time() - start:
                key, value, headers = records[i]
                now = time.time()
                sent[i] = now
                sender.add(topic, key, value, headers=headers, timestamp_ms=int(now * 1000))
                i += 1
            sender.kick()
            if i < n:  # a tick of at least LOAD_TICK_S: fewer wake-ups (each record's time is its own)
                await asyncio.sleep(max(LOAD_TICK_S, due[i] - (time.time() - start)))
        for future in await sender.take(sender.kick()):
            await future
    finally:
        await sender.stop()
        await producer.stop()
        out.write_bytes(sent.tobytes())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.kafka_procs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipe", help="bare aiokafka consume-then-produce pipe")
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--sink", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--commit-interval", type=float, default=0.5)
    p.add_argument("--ready", type=Path, required=True, help="file written once partitions are assigned")
    g = sub.add_parser("load", help="paced producer of a pickled LoadPlan")
    g.add_argument("--bootstrap-servers", required=True)
    g.add_argument("--topic", required=True)
    g.add_argument("--plan", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True, help="float64 send times, one per record")
    g.add_argument("--ready", type=Path, help="file written once connected, just before sending")
    args: Any = parser.parse_args(argv)
    if args.command == "pipe":
        asyncio.run(
            pipe(args.bootstrap_servers, args.source, args.sink, args.group, args.commit_interval, args.ready)
        )
    else:
        plan = LoadPlan.load(args.plan)
        gc.collect()
        gc.freeze()  # the plan is long-lived: no full collection walks it while sending
        asyncio.run(load(args.bootstrap_servers, args.topic, plan, args.out, args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
