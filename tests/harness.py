"""Real-broker test harness: worker processes, fresh topics per test, output collection."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import orjson
from pydantic import SecretStr

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord, capture_records, interleave, load_captures
from chunkfold.kafka_io import output_consumer
from chunkfold.produce import publish
from tests.recorded import FIXTURES
from tests.shapes import gateway_records as shape_records

ROOT = Path(__file__).resolve().parents[1]


def fresh_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings with a new app id and new topic names, so tests never see each other's data."""
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "app_id": f"cf-{tag}",
        "input_topic": f"{tag}-chunks",
        "events_topic": f"{tag}-events",
        "done_topic": f"{tag}-done",
        "deadletter_topic": f"{tag}-deadletter",
        "partitions": 4,
        "web_port": 0,
        "commit_interval_s": 0.5,
    }
    base.update(overrides)
    return Settings(**base)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKFOLD_")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    for name in Settings.model_fields:
        if name != "bootstrap_servers":
            value = getattr(settings, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"CHUNKFOLD_{name.upper()}"] = str(int(value) if isinstance(value, bool) else value)
    return env


@dataclass
class WorkerProcess:
    """One ``chunkfold worker`` OS process (so that it can be killed for real)."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    loglevel: str = "warning"
    """``info`` adds a line per finished completion."""

    def start(self) -> Self:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chunkfold.cli",
                "worker",
                "--loglevel",
                self.loglevel,
                "--log-format",
                "json",
            ],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Collected:
    events: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    done: list[tuple[bytes, dict[str, Any], bytes]] = field(default_factory=list)
    deadletters: list[dict[str, Any]] = field(default_factory=list)
    first_done_at: dict[bytes, float] = field(default_factory=dict)
    """Completion key -> when its first completion-done was appended (epoch s)."""
    largest: dict[str, int] = field(default_factory=dict)
    """Topic -> the largest record read from it (key plus value bytes)."""

    def repeats(self) -> tuple[int, int]:
        """(repeated completion-done records, repeated events) before de-duplication."""
        done_ids = [k for k, _, _ in self.done]
        event_ids = [(k, v["seq"]) for k, v in self.events]
        return len(done_ids) - len(set(done_ids)), len(event_ids) - len(set(event_ids))

    def duplicates_after_dedup(self) -> int:
        """Records that de-duplication by completion id (done) and ``(completion id, seq)``
        (events) cannot remove: a repeat whose bytes differ from the first copy."""
        done: dict[bytes, set[bytes]] = {}
        for key, _, raw in self.done:
            done.setdefault(key, set()).add(raw)
        events: dict[tuple[bytes, int], set[bytes]] = {}
        for key, value in self.events:
            events.setdefault((key, value["seq"]), set()).add(orjson.dumps(value))
        return sum(len(v) - 1 for v in done.values()) + sum(len(v) - 1 for v in events.values())

    def done_by_id(self) -> dict[str, dict[str, Any]]:
        """One completion-done per id; asserts any repeat is byte-identical."""
        seen: dict[str, bytes] = {}
        out: dict[str, dict[str, Any]] = {}
        for key, value, raw in self.done:
            completion_id = key.decode()
            assert seen.setdefault(completion_id, raw) == raw, (
                f"repeated completion-done differs for {completion_id}: {raw!r} vs {seen[completion_id]!r}"
            )
            out[completion_id] = value
        return out

    def events_by_id(self) -> dict[str, list[dict[str, Any]]]:
        """Events per completion in seq order, repeats dropped (asserting they are identical)."""
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for key, value in self.events:
            slot = by.setdefault(key.decode(), {})
            assert slot.setdefault(value["seq"], value) == value, (
                f"repeated event differs: {value} vs {slot[value['seq']]}"
            )
        return {k: [v[s] for s in sorted(v)] for k, v in by.items()}


async def _collect(
    settings: Settings, until: Callable[[Collected], bool], timeout: float, idle: float
) -> Collected:
    consumer = output_consumer(settings, from_beginning=True)
    await consumer.start()
    got = Collected()
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, messages in batch.items():
                for m in messages:
                    assert m.value is not None
                    size = len(m.key or b"") + len(m.value)
                    got.largest[tp.topic] = max(got.largest.get(tp.topic, 0), size)
                    if tp.topic == settings.events_topic:
                        assert m.key is not None
                        got.events.append((m.key, orjson.loads(m.value)))
                    elif tp.topic == settings.done_topic:
                        assert m.key is not None
                        got.done.append((m.key, orjson.loads(m.value), m.value))
                        got.first_done_at.setdefault(m.key, m.timestamp / 1000)
                    else:
                        got.deadletters.append(orjson.loads(m.value))
            if until(got):
                if quiet_since is None:
                    quiet_since = time.monotonic()
                if batch:
                    quiet_since = time.monotonic()
                if time.monotonic() - quiet_since >= idle:
                    return got
            else:
                quiet_since = None
    finally:
        await consumer.stop()
    return got


def collect(
    settings: Settings, until: Callable[[Collected], bool], timeout: float = 120.0, idle: float = 1.5
) -> Collected:
    """Everything on the output topics once ``until`` holds and nothing new came for ``idle`` s."""
    return asyncio.run(_collect(settings, until, timeout, idle))


def produce(settings: Settings, records: list[GatewayRecord], rate: float = 0.0) -> int:
    return asyncio.run(publish(settings, records, rate))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def _group_members(settings: Settings) -> tuple[str, set[str]]:
    """The worker group's state and member ids."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        response = await admin.describe_consumer_groups([settings.app_id])
        group = response[0].groups[0] if hasattr(response[0], "groups") else response[0]
        state, members = (group[2], group[5]) if isinstance(group, tuple) else (group.state, group.members)
        return str(state), {str(m[0] if isinstance(m, tuple) else m.member_id) for m in members}
    finally:
        await admin.close()


def wait_group_stable(
    settings: Settings, members: int, timeout: float = 90.0, *, without: frozenset[str] = frozenset()
) -> set[str]:
    """Block until the worker group is Stable with exactly ``members`` members, none of them in
    ``without`` (members known to be dead); returns their ids."""
    found: set[str] = set()

    def stable() -> bool:
        nonlocal found
        try:
            state, found = asyncio.run(_group_members(settings))
        except Exception:
            return False
        return state == "Stable" and len(found) == members and not found & without

    wait_for(stable, timeout, f"consumer group {settings.app_id} stable with {members} members")
    return found


def feed(
    processor: Any,
    records: list[GatewayRecord],
    start: int = 0,
    *,
    base_ms: int | None = None,
    timestamps: list[int] | None = None,
) -> Iterator[list[Any]]:
    """Hand ``records`` to a ``Processor`` as partition 0 at offsets ``start``, ``start + 1`` ...
    (each record's handle is its offset; its timestamp ``timestamps[i]`` when given, else
    ``base_ms`` + offset when that is given); yields each record's outputs."""
    for i, (offset, r) in enumerate(enumerate(records, start=start)):
        if timestamps is not None:
            timestamp_ms: int | None = timestamps[i]
        else:
            timestamp_ms = None if base_ms is None else base_ms + offset
        outputs, _ = processor.process(
            partition=0,
            offset=offset,
            key=r.key,
            value=r.value,
            headers=r.headers,
            timestamp_ms=timestamp_ms,
            handle=offset,
        )
        yield outputs


def offline_reference(
    records: list[GatewayRecord], settings: Settings | None = None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Events and completion-done per completion from the same engine without Kafka or faults."""
    events, done, _ = offline_run(records, settings)
    return events, done


def offline_run(
    records: list[GatewayRecord],
    settings: Settings | None = None,
    *,
    timestamps: list[int] | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``offline_reference`` plus the dead letters; records stamped with ``timestamps`` when
    given, the processor reading ``clock``."""
    from chunkfold.processor import Processor
    from chunkfold.state.memory import MemoryStore

    settings = settings or Settings()
    processor = Processor(settings, MemoryStore(), clock=clock)
    processor.assign([0])
    events: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, dict[str, Any]] = {}
    deadletters: list[dict[str, Any]] = []
    for outputs in feed(processor, records, timestamps=timestamps):
        for o in outputs:
            value = orjson.loads(o.value)
            if o.topic == settings.events_topic:
                events.setdefault(o.key.decode(), []).append(value)
            elif o.topic == settings.done_topic:
                done[o.key.decode()] = value
            else:
                deadletters.append(value)
    return events, done, deadletters


TIMING_FREE = (
    "completion",
    "status",
    "error",
    "usage",
    "usage_reported",
    "request",
    "chunk_count",
    "event_count",
    "anomalies",
)
"""The fields of a completion-done record that do not depend on when records were published
(``timing`` does)."""


def assert_matches_reference(
    got: Collected, reference: tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]
) -> None:
    """Every completion finished once (after de-duplication; any repeat byte-identical), equal to
    the fault-free run, with a gap-free event sequence (seq 0, 1, ...) equal to the fault-free
    one (any repeated event identical)."""
    want_events, want_done = reference
    done, events = got.done_by_id(), got.events_by_id()
    assert set(done) == set(want_done), (
        f"missing {sorted(set(want_done) - set(done))[:5]} extra {sorted(set(done) - set(want_done))[:5]}"
    )
    for completion_id, want in want_done.items():
        assert {k: done[completion_id][k] for k in TIMING_FREE} == {k: want[k] for k in TIMING_FREE}, (
            completion_id
        )
        sequence = events.get(completion_id, [])
        assert [e["seq"] for e in sequence] == list(range(len(sequence))), f"seq gap in {completion_id}"
        assert sequence == want_events.get(completion_id, []), completion_id


class BackgroundProducer(threading.Thread):
    """Publishes records at ``rate`` per second from a thread, as a gateway would (idempotent
    producer, acks=all), remembering when each completion's first and last record went out."""

    def __init__(self, settings: Settings, records: list[GatewayRecord], rate: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.records, self.rate = settings, records, rate
        self.first_sent: dict[bytes, float] = {}
        self.last_sent: dict[bytes, float] = {}
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        from chunkfold.kafka_io import ensure_topics, make_producer

        await ensure_topics(
            self.settings.bootstrap_servers, [self.settings.input_topic], self.settings.partitions
        )
        producer = make_producer(
            self.settings.bootstrap_servers, enable_idempotence=True, request_timeout_ms=120_000
        )
        await producer.start()
        start = time.monotonic()
        try:
            for i, r in enumerate(self.records):
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await producer.send(self.settings.input_topic, r.value, key=r.key, headers=r.headers)
                now = time.time()
                self.first_sent.setdefault(r.key, now)
                self.last_sent[r.key] = now
                self.sent += 1
            await producer.flush()
        finally:
            await producer.stop()

    def in_flight_at(self, moment: float, keys: set[bytes] | None = None) -> int:
        """Completions (of ``keys``, default all) that had started but not finished publishing at
        ``moment`` (epoch s)."""
        return sum(
            1
            for k, t in self.first_sent.items()
            if t <= moment < self.last_sent[k] and (keys is None or k in keys)
        )

    def finish(self, timeout: float = 300.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "producer did not finish"
        if self.error is not None:
            raise self.error


def start_workers(settings: Settings, count: int, tmp_path: Path, started: list[WorkerProcess]) -> None:
    for n in range(count):
        started.append(WorkerProcess(settings, tmp_path / f"worker-{n}.log").start())
    wait_group_stable(settings, count)


def recorded_records(
    repeat: int = 1, concurrency: int = 0, *, shapes: int = 0
) -> tuple[list[GatewayRecord], int]:
    """The recorded API streams ``repeat`` times (as distinct completions), plus ``shapes``
    generated streams per repeat carrying every field shape the engine accumulates
    (``tests.shapes``), interleaved; and how many completions that is."""
    streams: list[list[GatewayRecord]] = []
    for _, text, request in load_captures([FIXTURES]):
        for n in range(repeat):
            streams += capture_records(text, request, key_suffix=f"-{n}" if repeat > 1 else "").values()
    streams += [shape_records(k, f"shapes-{k}") for k in range(repeat * shapes)]
    return list(interleave(streams, seed=repeat, concurrency=concurrency)), len(streams)


def done_count(n: int) -> Any:
    return lambda got: len({k for k, _, _ in got.done}) >= n
