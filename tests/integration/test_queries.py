"""The query listener on a real broker, three workers each with its own query port (the direct driver with both guarantees, the Faust driver): any
worker answers for any completion (forwarding to its owner), snapshots taken mid-stream equal
the in-process fold of the same records, a resume from a non-owner streams exactly the
remaining events, rebalances answer 503 then the new owner's answer, and the token holds."""

from __future__ import annotations

import asyncio
import http.client
import random
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiokafka import TopicPartition

from chunkfold.config import Settings
from chunkfold.gateway import interleave
from chunkfold.kafka_io import KafkaClients
from chunkfold.processor import Processor
from chunkfold.state.memory import MemoryStore
from tests.harness import WorkerProcess, collect, fresh_settings, produce, wait_for, wait_group_stable
from tests.postgres import free_port
from tests.shapes import gateway_records

pytestmark = pytest.mark.integration

TOKEN = "integration-token"
PARTITIONS = 6
COMPLETIONS = 9
FINISHED = "q-finished ✓/0"
"""Published whole (its id needs percent-encoding); the others stop halfway, still open."""

Answer = tuple[int, dict[str, str], bytes]


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def snapshot_path(completion_id: str) -> str:
    return f"/completions/{quote(completion_id, safe='')}"


def owner_port(ports: list[int], completion_id: str) -> int:
    """The one worker that answers a request marked as forwarded (the others: 503)."""
    answering = [
        port
        for port in ports
        if get(port, snapshot_path(completion_id), {"X-Chunkfold-Forwarded": "1"})[0] == 200
    ]
    assert len(answering) == 1, (completion_id, answering)
    return answering[0]


def start_worker(settings: Settings, tmp_path: Path, started: list[WorkerProcess]) -> int:
    port = free_port()
    worker_settings = settings.model_copy(update={"query_port": port})
    started.append(WorkerProcess(worker_settings, tmp_path / f"worker-{port}.log", loglevel="info").start())
    return port


async def _input_records(settings: Settings) -> dict[str, list[Any]]:
    """The input topic read back, per completion id in offset order (with the broker's
    offsets and timestamps, what the workers folded)."""
    consumer = KafkaClients.of(settings).consumer(group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.input_topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        by_id: dict[str, list[Any]] = {}
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for m in messages:
                    by_id.setdefault(m.key.decode(), []).append(m)
        return by_id
    finally:
        await consumer.stop()


def reference_snapshots(settings: Settings) -> dict[str, dict[str, Any]]:
    """What the pure core makes of each completion's records: a ``Processor`` on a memory store
    folding them in-process (no Kafka), ``events_from`` aside (it has no events topic)."""
    snapshots = {}
    for completion_id, messages in asyncio.run(_input_records(settings)).items():
        processor = Processor(settings, MemoryStore())
        processor.assign(range(PARTITIONS))
        for m in messages:
            processor.process(
                partition=m.partition,
                offset=m.offset,
                key=m.key,
                value=m.value,
                headers=m.headers,
                timestamp_ms=m.timestamp,
                handle=None,
            )
        snapshot = processor.snapshot(completion_id)
        assert snapshot is not None
        snapshots[completion_id] = snapshot
    return snapshots


def without_position(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snapshot.items() if k != "events_from"}


class Poller(threading.Thread):
    """Asks one worker for a completion over and over, keeping every answer, until stopped.
    Every few milliseconds: a rebalance among running workers can leave the group unsettled for
    only about 15 ms (seen when a fourth worker joined), and a slower poller missed the 503s."""

    def __init__(self, port: int, completion_id: str) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, snapshot_path(completion_id)
        self.answers: list[tuple[int, str | None, bytes]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            status, headers, body = get(self.port, self.path)
            self.answers.append((status, headers.get("retry-after"), body))
            time.sleep(0.002)

    def finish(self) -> list[tuple[int, str | None, bytes]]:
        self.stopping.set()
        self.join(20)
        return self.answers


def assert_503_then_right(answers: list[tuple[int, str | None, bytes]], right: bytes) -> None:
    """Every answer is 503 with Retry-After or the right snapshot; some were 503, the last right."""
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert all(retry == "1" for status, retry, _ in answers if status == 503)
    assert all(body == right for status, _, body in answers if status == 200)
    assert 503 in statuses, "no 503 while the group rebalanced"
    assert statuses[-1] == 200


@pytest.mark.parametrize(
    ("driver", "guarantee"),
    [("direct", "at_least_once"), ("direct", "exactly_once"), ("faust", "at_least_once")],
)
def test_any_worker_answers_for_any_completion_through_rebalances(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str, guarantee: str
) -> None:
    """With ``exactly_once`` the snapshots are of the committed state, which catches up with
    every checkpoint. The Faust driver finds owners through Faust's own assignor."""
    settings = fresh_settings(
        kafka,
        driver=driver,
        partitions=PARTITIONS,
        idle_timeout_s=3600.0,
        tombstone_s=3600.0,
        query_token=TOKEN,
        processing_guarantee=guarantee,
    )
    ports = [start_worker(settings, tmp_path, workers) for _ in range(3)]
    wait_group_stable(settings, 3)
    streams = {f"q-{n}": gateway_records(n, f"q-{n}") for n in range(COMPLETIONS)}
    streams[FINISHED] = gateway_records(2, FINISHED)  # ends with an abort record
    cut = [
        stream if completion_id == FINISHED else stream[: len(stream) // 2]
        for completion_id, stream in streams.items()
    ]
    produce(settings, list(interleave(cut, seed=15)))
    want = reference_snapshots(settings)

    def caught_up() -> bool:
        for completion_id, reference in want.items():
            status, _, body = get(ports[0], snapshot_path(completion_id))
            if status != 200 or without_position(orjson.loads(body)) != without_position(reference):
                return False
        return True

    wait_for(caught_up, 30, "every worker's snapshots to reach what was produced")

    # Every worker answers for every completion, the owner's own answer byte for byte; the
    # in-progress ones are the in-process fold of the same records (mid-stream snapshots).
    owners = {completion_id: owner_port(ports, completion_id) for completion_id in want}
    assert set(owners.values()) == set(ports), "each worker owns some of the completions"
    answers: dict[str, bytes] = {}
    for completion_id, owner in owners.items():
        status, _, answers[completion_id] = get(owner, snapshot_path(completion_id))
        assert status == 200
        for port in ports:
            assert get(port, snapshot_path(completion_id))[2] == answers[completion_id]
        snapshot = orjson.loads(answers[completion_id])
        assert without_position(snapshot) == without_position(want[completion_id])
        if snapshot["last_seq"] is not None:  # the worker knows where its events start
            assert snapshot["events_from"] is not None
        assert (snapshot["status"] == "in_progress") == (completion_id != FINISHED)
    assert get(ports[0], snapshot_path("q-never-published"))[0] == 404

    # Resume from a random seq through a worker that does not own the completion.
    got = collect(settings, lambda c: any(k.decode() == FINISHED for k, _, _ in c.done), timeout=30, idle=0.5)
    published = [value for key, value in got.events if key.decode() == FINISHED]
    from_seq = random.Random(7).randrange(len(published))
    reader = next(port for port in ports if port != owners[FINISHED])
    status, headers, body = get(reader, f"{snapshot_path(FINISHED)}/events?from_seq={from_seq}")
    assert (status, headers["content-type"]) == (200, "text/event-stream")
    streamed = [
        orjson.loads(line[len(b"data: ") :]) for line in body.splitlines() if line.startswith(b"data: ")
    ]
    assert streamed == published[from_seq:]

    # The token is enforced on every route.
    for path in (snapshot_path("q-0"), f"{snapshot_path('q-0')}/events"):
        status, headers, _ = get(ports[1], path, {"Authorization": "Bearer nope"})
        assert (status, headers["www-authenticate"]) == (401, "Bearer")

    # A worker leaves: while the group rebalances its completions get 503, then the new
    # owner's answer, the same snapshot restored from the changelog.
    leaving = ports[2]
    moving = next(c for c, owner in owners.items() if owner == leaving and c != FINISHED)
    pollers = [Poller(port, moving) for port in ports[:2]]
    for poller in pollers:
        poller.start()
    time.sleep(0.2)
    workers[2].stop()
    wait_group_stable(settings, 2)
    wait_for(
        lambda: all(p.answers and p.answers[-1][0] == 200 for p in pollers), 30, "the new owner's answer"
    )
    for poller in pollers:
        assert_503_then_right(poller.finish(), answers[moving])

    # A fourth worker joins: again 503 during the rebalance, then the right answer from all.
    pollers = [Poller(port, moving) for port in ports[:2]]
    for poller in pollers:
        poller.start()
    time.sleep(0.2)
    ports[2] = start_worker(settings, tmp_path, workers)
    wait_group_stable(settings, 3)
    wait_for(
        lambda: (
            all(p.answers and p.answers[-1][0] == 200 for p in pollers)
            and get(ports[2], snapshot_path(moving))[0] == 200
        ),
        30,
        "answers after the fourth worker joined",
    )
    for poller in pollers:
        assert_503_then_right(poller.finish(), answers[moving])
    for completion_id, answer in answers.items():
        for port in ports:
            assert get(port, snapshot_path(completion_id))[2] == answer, (completion_id, port)
    assert all(w.alive for w in workers[:2] + workers[3:]), [w.log_tail() for w in workers]
