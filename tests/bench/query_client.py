"""``python -m tests.bench.query_client PLAN OUT``: the query load of the bench's queries section,
run as its own OS process (neither the worker's nor the one that times the worker's events).

It issues, open loop on fixed schedules (a slow answer never delays the next request):
``GET /completions/{id}`` at ``snapshot_rate``; ``GET /completions/{id}/events?from_seq=k`` at
``live_resume_rate`` for completions in flight and at ``finished_resume_rate`` for finished ones.

With a send schedule (``QueryPlan.record_due``, a latency run) it learns when the load generator
started from the first records on the input topic (their timestamps are their send times) and
picks ids by that schedule: in flight means the completion's first record was due at least
``SETTLE_S`` ago and its last is not yet due; ``k`` is drawn below the seq of the last event
its chunks due ``PUBLISHED_S`` ago yield (already published), finished ones from
``FINISHED_S`` after their last record. Without one (a backlog drain, no schedule) any id of
the workload is asked for, resumed from seq 0.

Starts once the listener answers; stops issuing at SIGTERM, waits up to ``DRAIN_S`` for the
open event streams, and writes the timings to OUT as JSON (``QueryTimings``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from chunkfold.core.records import SEQ_HEADER

SETTLE_S = 0.1
PUBLISHED_S = 0.3
FINISHED_S = 1.0
DRAIN_S = 15.0
SNAPSHOT_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
RESUME_TIMEOUT = aiohttp.ClientTimeout(total=60.0, sock_read=30.0)
LISTENER_WAIT_S = 120.0
CONNECTIONS = 256


@dataclass(frozen=True, slots=True)
class Completion:
    """One completion of the workload and, with a send schedule, when its records are sent
    (s after the load generator's start): ``events[i]`` = (due, seq of the first event that
    chunk yields), in due order."""

    completion_id: str
    first_due: float
    last_due: float
    events: tuple[tuple[float, int], ...]

    def published_seq(self, at: float) -> int | None:
        """The largest seq among the events of chunks due by ``at`` (None: none yet)."""
        seqs = [seq for due, seq in self.events if due <= at]
        return max(seqs) if seqs else None


@dataclass(frozen=True, slots=True)
class QueryPlan:
    url: str
    completions: list[Completion]
    snapshot_rate: float
    live_resume_rate: float
    finished_resume_rate: float
    seed: int
    bootstrap_servers: str
    input_topic: str
    input_partitions: int
    record_due: dict[tuple[bytes, int], float] = field(default_factory=dict)
    """(key, chunkfold.seq header) -> when the load generator sends that record; empty: no
    schedule (the records were published before the worker started)."""

    def dump(self, path: Path) -> None:
        """As JSON: this file runs as ``__main__``, where pickled classes would not resolve."""
        data = {
            **asdict(self),
            "record_due": [[k.decode(), seq, due] for (k, seq), due in self.record_due.items()],
        }
        path.write_bytes(orjson.dumps(data))

    @classmethod
    def load(cls, path: Path) -> QueryPlan:
        data = orjson.loads(path.read_bytes())
        completions = [
            Completion(
                c["completion_id"], c["first_due"], c["last_due"], tuple((d, s) for d, s in c["events"])
            )
            for c in data.pop("completions")
        ]
        record_due = {(k.encode(), seq): due for k, seq, due in data.pop("record_due")}
        return cls(completions=completions, record_due=record_due, **data)


@dataclass
class QueryTimings:
    """What the client measured. Snapshots: (ms, HTTP status, the snapshot's status or "").
    Resumes: see ``ResumeTiming``. HTTP status 0: no answer (connection error or timeout)."""

    snapshots: list[tuple[float, int, str]] = field(default_factory=list)
    resumes: list[ResumeTiming] = field(default_factory=list)
    started: float = math.nan
    """Epoch s at which the first request went out."""

    @classmethod
    def from_json(cls, raw: bytes) -> QueryTimings:
        data = orjson.loads(raw)
        return cls(
            [(float(ms), int(status), str(state)) for ms, status, state in data["snapshots"]],
            [ResumeTiming(**r) for r in data["resumes"]],
            float(data["started"]),
        )


@dataclass
class ResumeTiming:
    kind: str
    """"live" (in flight when asked) or "finished"."""
    from_seq: int
    status: int = 0
    first_event_ms: float = math.nan
    """Request sent -> the first event received whole."""
    last_event_ms: float = math.nan
    """Request sent -> the last event received whole."""
    total_ms: float = math.nan
    """Request sent -> the end of the stream."""
    events: int = 0
    exact: bool = False
    """Seqs from_seq, from_seq + 1, ... without gap or repeat, ending with a ``*.done`` event."""


def _pick_ids(plan: QueryPlan, rng: random.Random, kind: str, at: float | None) -> tuple[str, int] | None:
    """(id, from_seq) for a request of ``kind`` ("snapshot", "live", "finished") at ``at`` s
    into the send schedule (None: no schedule); None when no completion fits right now."""
    if at is None:
        return rng.choice(plan.completions).completion_id, 0
    if kind == "finished":
        fits = [c for c in plan.completions if c.last_due <= at - FINISHED_S]
    else:
        fits = [c for c in plan.completions if c.first_due <= at - SETTLE_S and at < c.last_due]
    if kind == "live":
        fits = [c for c in fits if c.published_seq(at - PUBLISHED_S) is not None]
    if not fits:
        return None
    chosen = rng.choice(fits)
    top = chosen.published_seq(at - (FINISHED_S if kind == "finished" else PUBLISHED_S))
    return chosen.completion_id, 0 if kind == "snapshot" or top is None else rng.randint(0, top)


async def _schedule_start(plan: QueryPlan) -> float:
    """Epoch s of the load generator's start: the earliest (send time - due) of the first
    records it sends (it never sends early)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=plan.bootstrap_servers, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(plan.input_topic, p) for p in range(plan.input_partitions)])
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            starts: list[float] = [
                m.timestamp / 1000 - plan.record_due[(m.key, int(raw))]
                for messages in batch.values()
                for m in messages
                for name, raw in m.headers
                if name == SEQ_HEADER and m.key is not None
            ]
            if starts:
                return min(starts)
    finally:
        await consumer.stop()


async def _wait_listener(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + LISTENER_WAIT_S
    while True:
        try:
            async with session.get(f"{url}/completions/-", timeout=SNAPSHOT_TIMEOUT):
                return
        except (aiohttp.ClientError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no query listener at {url}") from None
            await asyncio.sleep(0.05)


async def _snapshot(session: aiohttp.ClientSession, url: str, completion_id: str, out: QueryTimings) -> None:
    start = time.perf_counter()
    status, state = 0, ""
    try:
        async with session.get(
            f"{url}/completions/{quote(completion_id, safe='')}", timeout=SNAPSHOT_TIMEOUT
        ) as response:
            body = await response.read()
            status = response.status
            if status == 200:
                state = str(orjson.loads(body)["status"])
    except (aiohttp.ClientError, TimeoutError):
        pass
    out.snapshots.append(((time.perf_counter() - start) * 1000, status, state))


async def _resume(session: aiohttp.ClientSession, url: str, completion_id: str, timing: ResumeTiming) -> None:
    start = time.perf_counter()
    seqs: list[int] = []
    last_type = ""
    try:
        async with session.get(
            f"{url}/completions/{quote(completion_id, safe='')}/events",
            params={"from_seq": str(timing.from_seq)},
            timeout=RESUME_TIMEOUT,
        ) as response:
            timing.status = response.status
            if response.status != 200:
                await response.read()
                return
            async for line in response.content:
                if line.startswith(b"id: "):
                    seqs.append(int(line[4:]))
                elif line.startswith(b"event: "):
                    last_type = line[7:].decode().strip()
                elif line == b"\n":
                    timing.last_event_ms = (time.perf_counter() - start) * 1000
                    if math.isnan(timing.first_event_ms):
                        timing.first_event_ms = timing.last_event_ms
            timing.total_ms = (time.perf_counter() - start) * 1000
    except (aiohttp.ClientError, TimeoutError):
        return
    finally:
        timing.events = len(seqs)
    expected = list(range(timing.from_seq, timing.from_seq + len(seqs)))
    timing.exact = bool(seqs) and seqs == expected and last_type.endswith(".done")


async def run(plan: QueryPlan, out_path: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random(plan.seed)
    timings = QueryTimings()
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        await _wait_listener(session, plan.url)
        origin = await _schedule_start(plan) if plan.record_due else None
        rates = {
            "snapshot": plan.snapshot_rate,
            "live": plan.live_resume_rate,
            "finished": plan.finished_resume_rate,
        }
        now = time.time()
        timings.started = now
        next_at = {kind: now for kind, rate in rates.items() if rate > 0}
        while not stop.is_set() and next_at:
            kind, at = min(next_at.items(), key=lambda item: item[1])
            if at > time.time():
                try:
                    await asyncio.wait_for(stop.wait(), at - time.time())
                    break
                except TimeoutError:
                    pass
            next_at[kind] = at + 1 / rates[kind]
            picked = _pick_ids(plan, rng, kind, None if origin is None else time.time() - origin)
            if picked is None:
                continue
            completion_id, from_seq = picked
            if kind == "snapshot":
                request = _snapshot(session, plan.url, completion_id, timings)
            else:
                timing = ResumeTiming(kind if origin is not None else "any", from_seq)
                timings.resumes.append(timing)
                request = _resume(session, plan.url, completion_id, timing)
            task = asyncio.create_task(request)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    out_path.write_bytes(
        orjson.dumps(
            {
                "snapshots": timings.snapshots,
                "resumes": [asdict(r) for r in timings.resumes],
                "started": timings.started,
            }
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.query_client")
    parser.add_argument("plan", type=Path, help="a QueryPlan as QueryPlan.dump writes it")
    parser.add_argument("out", type=Path, help="where the timings go (JSON)")
    args = parser.parse_args(argv)
    asyncio.run(run(QueryPlan.load(args.plan), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
