"""Kafka section: one chunkfold worker end to end through a real broker, against the ceiling of a
bare aiokafka consume-then-produce pipe on the same broker, records and machine.

Measures (1) throughput draining a pre-produced backlog, (2) produce -> first event latency at a
fixed offered rate, and (3) the worker's changelog bytes per completion. Every measurement gets
fresh topics (``tests.harness.fresh_settings``) and its own consumer process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from chunkfold.config import Settings
from chunkfold.core.persist import completion_of
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.gateway import GatewayRecord, capture_records, interleave
from chunkfold.kafka_io import ensure_topics
from chunkfold.processor import Processor
from chunkfold.produce import publish
from chunkfold.state.memory import MemoryStore
from tests.bench.context import BenchContext, SectionResult, Verdict
from tests.bench.kafka_procs import LoadPlan, read_times
from tests.demo.synthetic import KINDS, capture, make_stream
from tests.harness import ROOT, WorkerProcess, feed, fresh_settings, wait_group_stable

PARTITIONS = 4
CONCURRENCY = 50
KIND_WEIGHTS = {"text": 45, "structured": 15, "tools": 15, "logprobs": 10, "n=2": 15}
CHUNK_RANGE = (40, 320)
POOL_CHUNKS = 15_000
"""Distinct synthetic completions generated; larger workloads repeat them under new ids."""

THROUGHPUT_CHUNKS = 30_000
THROUGHPUT_CAP_S = 40.0
THROUGHPUT_RUNS = 2
LATENCY_RATE = 5_000.0
LATENCY_S = 12.0
WARMUP_S = 1.0
GRACE_S = 3.0
KEPT_UP_S = 0.5
OFFERED_SHARE = 0.97
FALLBACK_SHARES = (0.8, 0.5)
STARTUP_TIMEOUT_S = 90.0

THROUGHPUT_TARGET = 0.5
EXACTLY_ONCE_TARGET = 0.7
"""exactly_once draining the backlog, over the at-least-once worker's rate in the same run."""
FAUST_TARGET = 0.25
"""The Faust driver draining the backlog, over the bare pipe's rate in the same run."""
P99_TARGET_MS = 50.0
CHANGELOG_TARGET = 3.0

During = Callable[[Settings], contextlib.AbstractContextManager[object]]
"""What else runs while a worker is measured (another section's load on it), given the
worker's settings: entered once the worker runs, left when the measurement ends."""
NO_OVERRIDES: Mapping[str, Any] = MappingProxyType({})


def nothing_during(_settings: Settings) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext()


# -- workload --------------------------------------------------------------------------------


@dataclass
class Workload:
    """Interleaved gateway records of many completions, and the chunk records that yield an
    event on completion-events, as indexes into ``records``: ``first_event[(key, seq of that
    first event)]`` (to match the worker's events) and ``by_position[(key, the record's
    chunkfold.seq header)]`` (to match the pipe's copies of the same records)."""

    records: list[GatewayRecord]
    completions: int
    chunk: list[bool]
    first_event: dict[tuple[bytes, int], int]
    by_position: dict[tuple[bytes, int], int]

    @property
    def chunks(self) -> int:
        return sum(self.chunk)

    def prefix(self, chunks: int) -> Workload:
        """The records up to the ``chunks``-th chunk record (completions left unfinished)."""
        count = 0
        end = len(self.records)
        for i, is_chunk in enumerate(self.chunk):
            count += is_chunk
            if count == chunks:
                end = i + 1
                break
        keep = {k: v for k, v in self.first_event.items() if v < end}
        return Workload(
            self.records[:end],
            len({r.key for r in self.records[:end]}),
            self.chunk[:end],
            keep,
            {k: v for k, v in self.by_position.items() if v < end},
        )


@dataclass
class CompletionTemplate:
    records: list[GatewayRecord]
    first_seq: dict[int, int]
    """record position in the stream -> seq of the first event it yields (chunks only)."""


def _header(record: GatewayRecord, name: str) -> bytes | None:
    return next((v for k, v in record.headers if k == name), None)


def _is_chunk(record: GatewayRecord) -> bool:
    return _header(record, KIND_HEADER) is None and record.value != b"[DONE]"


def completion_templates(seed: int) -> list[CompletionTemplate]:
    """Distinct completions (about ``POOL_CHUNKS`` chunks), each folded once offline to learn
    which of its chunk records yields which first event."""
    rng = random.Random(seed)
    streams: list[list[GatewayRecord]] = []
    total = 0
    while total < POOL_CHUNKS:
        kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
        n = rng.randint(*CHUNK_RANGE)
        stream = make_stream(kind, n, seed=seed * 1_000_003 + len(streams))
        streams += capture_records(capture(stream), stream.request).values()
        total += n
    settings = Settings()
    processor = Processor(settings, MemoryStore())
    processor.assign([0])
    templates: list[CompletionTemplate] = []
    for records in streams:
        first_seq: dict[int, int] = {}
        for position, (r, outputs) in enumerate(zip(records, feed(processor, records), strict=True)):
            events = [o for o in outputs if o.topic == settings.events_topic]
            if events and _is_chunk(r):
                first_seq[position] = int(orjson.loads(events[0].value)["seq"])
        templates.append(CompletionTemplate(records, first_seq))
    return templates


def _renamed(template: list[GatewayRecord], suffix: str) -> list[GatewayRecord]:
    """The same completion under the id ``<id><suffix>`` (key and every chunk's ``id``)."""
    old = template[0].key
    new = old + suffix.encode()
    old_id, new_id = b'"id":"' + old + b'"', b'"id":"' + new + b'"'
    return [GatewayRecord(new, r.value.replace(old_id, new_id), r.headers) for r in template]


def build_workload(templates: list[CompletionTemplate], chunks: int, tag: str, seed: int) -> Workload:
    """At least ``chunks`` chunk records: the templates cycled under new ids, interleaved
    ``CONCURRENCY`` completions at a time."""
    streams: list[list[GatewayRecord]] = []
    first_seq: dict[bytes, dict[int, int]] = {}
    total = 0
    while total < chunks:
        template = templates[len(streams) % len(templates)]
        records = _renamed(template.records, f"-{tag}{len(streams)}")
        streams.append(records)
        first_seq[records[0].key] = template.first_seq
        total += sum(map(_is_chunk, records))
    ordered = list(interleave(streams, seed=seed, concurrency=CONCURRENCY))
    first_event: dict[tuple[bytes, int], int] = {}
    by_position: dict[tuple[bytes, int], int] = {}
    for i, r in enumerate(ordered):
        raw = _header(r, SEQ_HEADER)
        assert raw is not None
        position = int(raw)
        seq = first_seq[r.key].get(position)
        if seq is not None:
            first_event[(r.key, seq)] = i
            by_position[(r.key, position)] = i
    return Workload(ordered, len(streams), [_is_chunk(r) for r in ordered], first_event, by_position)


# -- processes, metrics -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus series, ``name{labels}`` -> value (empty when unreachable)."""
    status, text = _http(port, "/metrics")
    values: dict[str, float] = {}
    if status != 200:
        return values
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _total(metrics: dict[str, float], name: str) -> float:
    """A counter summed over its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@contextlib.contextmanager
def running_worker(settings: Settings, log: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(settings, log).start()
    try:
        yield worker
    finally:
        worker.stop(timeout=5)


def wait_worker_ready(worker: WorkerProcess, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Group stable with this one member, and /readyz says partitions are assigned and recovered."""
    wait_group_stable(worker.settings, 1, timeout)
    deadline = time.monotonic() + timeout
    while _http(worker.settings.web_port, "/readyz")[0] != 200:
        if not worker.alive or time.monotonic() > deadline:
            raise RuntimeError(f"worker not ready:\n{worker.log_tail()}")
        time.sleep(0.2)


@dataclass
class PipeProcess:
    """``python -m tests.bench.kafka_procs pipe`` from ``source`` to ``sink``."""

    servers: str
    source: str
    sink: str
    group: str
    commit_interval: float
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"pipe-{self.group}.ready"

    def start(self) -> PipeProcess:
        with (self.workdir / f"pipe-{self.group}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "tests.bench.kafka_procs", "pipe"),
                    *("--bootstrap-servers", self.servers, "--source", self.source, "--sink", self.sink),
                    *("--group", self.group, "--commit-interval", str(self.commit_interval)),
                    *("--ready", str(self.ready_file)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aiokafka pipe did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / f"pipe-{self.group}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def _assigned_consumer(servers: str, topics: list[str]) -> AIOKafkaConsumer:
    """A group-less consumer of every partition of ``topics`` from the beginning, positioned; it
    reads committed records only (as a consumer of an ``exactly_once`` worker must)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    partitions = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    return consumer


# -- throughput -------------------------------------------------------------------------------


@dataclass
class Throughput:
    name: str
    chunks: int
    span: float
    cpu: float
    load: float
    complete: bool
    note: str = ""
    completion_bytes: list[int] = field(default_factory=list)
    done_keys: set[bytes] = field(default_factory=set)

    @property
    def rate(self) -> float:
        return self.chunks / self.span if self.span > 0 else math.nan

    @property
    def per_cpu(self) -> float:
        return self.chunks / self.cpu if self.cpu > 0 else math.nan


@dataclass
class _Drained:
    first_ts: float = math.inf
    last_ts: float = 0.0
    first_wall: float | None = None
    cpu_at_first: float = math.nan
    outputs: int = 0
    done: int = 0
    completion_bytes: list[int] = field(default_factory=list)
    done_keys: set[bytes] = field(default_factory=set)


async def _drain(
    servers: str,
    topics: list[str],
    done_topic: str | None,
    expected: int,
    proc: subprocess.Popen[bytes],
    cap: float,
) -> _Drained:
    """Read the consumer's outputs until ``expected`` completion-done (worker) or output records
    (pipe) arrived, or ``cap`` s after the first one. Times are output CreateTimes."""
    consumer = await _assigned_consumer(servers, topics)
    got = _Drained()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for tp, messages in batch.items():
                for m in messages:
                    ts = m.timestamp / 1000
                    if got.first_wall is None:
                        got.first_wall = time.time()
                        got.cpu_at_first = cpu_seconds(proc.pid)
                        deadline = time.monotonic() + cap
                    got.first_ts = min(got.first_ts, ts)
                    got.outputs += 1
                    if done_topic is None:
                        got.last_ts = max(got.last_ts, ts)
                    elif tp.topic == done_topic:
                        got.last_ts = max(got.last_ts, ts)
                        got.done += 1
                        got.done_keys.add(m.key)
                        got.completion_bytes.append(len(orjson.dumps(orjson.loads(m.value)["completion"])))
            if (got.done if done_topic else got.outputs) >= expected:
                break
    finally:
        await consumer.stop()
    return got


def worker_throughput(
    servers: str,
    workload: Workload,
    cap: float,
    workdir: Path,
    driver: str = Settings().driver,
    guarantee: str = Settings().processing_guarantee,
    *,
    settings_overrides: Mapping[str, Any] = NO_OVERRIDES,
    during: During = nothing_during,
) -> tuple[Throughput, Changelog]:
    """The worker draining ``workload`` from a backlog; ``settings_overrides`` add to (or
    replace) its settings, ``during`` runs alongside it from its start until it is stopped."""
    settings = fresh_settings(
        servers,
        **{
            "partitions": PARTITIONS,
            "web_port": free_port(),
            "commit_interval_s": Settings().commit_interval_s,
            "driver": driver,
            "processing_guarantee": guarantee,
            **settings_overrides,
        },
    )
    default = driver == Settings().driver and guarantee == Settings().processing_guarantee
    topics = [settings.input_topic, settings.events_topic, settings.done_topic, settings.deadletter_topic]
    asyncio.run(ensure_topics(servers, topics, PARTITIONS))
    asyncio.run(publish(settings, workload.records))
    with (
        running_worker(settings, workdir / f"worker-throughput-{driver}-{guarantee}.log") as worker,
        during(settings),
    ):
        assert worker.proc is not None
        pid = worker.proc.pid
        got = asyncio.run(
            _drain(
                servers,
                [settings.events_topic, settings.done_topic],
                settings.done_topic,
                workload.completions,
                worker.proc,
                cap,
            )
        )
        if got.first_wall is None:
            raise RuntimeError(f"the worker published nothing:\n{worker.log_tail()}")
        complete = got.done >= workload.completions
        if complete:
            chunks, span, cpu = (
                workload.chunks,
                got.last_ts - got.first_ts,
                cpu_seconds(pid) - got.cpu_at_first,
            )
            metrics = _settled_metrics(settings.web_port)
        else:
            time.sleep(settings.commit_interval_s + 0.5)  # finished completions' last writes
            metrics = scrape(settings.web_port)
            now = time.time()
            cpu = cpu_seconds(pid) - got.cpu_at_first
            chunks, span = int(_total(metrics, "chunkfold_chunks_in_total")), now - got.first_ts
        result = Throughput(
            "chunkfold worker"
            if default
            else f"worker ({driver if driver != Settings().driver else guarantee})",
            chunks,
            span,
            cpu,
            load_average(),
            complete,
            ""
            if complete
            else f"stopped after {cap:.0f} s: {got.done}/{workload.completions} completions done",
            got.completion_bytes,
            got.done_keys,
        )
    changelog = asyncio.run(_changelog(servers, f"{settings.app_id}-state-changelog", got.done_keys))
    changelog.metric_bytes = _total(metrics, "chunkfold_state_written_bytes_total")
    changelog.metric_completions = _total(metrics, "chunkfold_completions_out_total")
    changelog.complete = complete
    changelog.completion_bytes = got.completion_bytes
    return result, changelog


def _settled_metrics(port: int, timeout: float = 10.0) -> dict[str, float]:
    """The metrics once the write-behind has flushed everything (state writes stop changing)."""
    deadline = time.monotonic() + timeout
    last = scrape(port)
    while time.monotonic() < deadline:
        time.sleep(0.7)
        now = scrape(port)
        if now.get("chunkfold_state_writes_total") == last.get("chunkfold_state_writes_total") and (
            now.get("chunkfold_open_completions") == 0
        ):
            return now
        last = now
    return last


def pipe_throughput(servers: str, workload: Workload, cap: float, workdir: Path) -> Throughput:
    settings = fresh_settings(servers, partitions=PARTITIONS)
    sink = settings.events_topic
    asyncio.run(ensure_topics(servers, [settings.input_topic, sink], PARTITIONS))
    asyncio.run(publish(settings, workload.records))
    pipe = PipeProcess(
        servers, settings.input_topic, sink, settings.app_id, Settings().commit_interval_s, workdir
    ).start()
    try:
        assert pipe.proc is not None
        got = asyncio.run(_drain(servers, [sink], None, len(workload.records), pipe.proc, cap))
        cpu = cpu_seconds(pipe.proc.pid) - got.cpu_at_first
        if got.first_wall is None:
            raise RuntimeError(f"the aiokafka pipe published nothing:\n{pipe.log_tail()}")
    finally:
        pipe.stop()
    complete = got.outputs >= len(workload.records)
    chunks = workload.chunks if complete else round(workload.chunks * got.outputs / len(workload.records))
    return Throughput(
        "aiokafka pipe",
        chunks,
        got.last_ts - got.first_ts,
        cpu,
        load_average(),
        complete,
        "" if complete else f"stopped after {cap:.0f} s",
    )


# -- changelog --------------------------------------------------------------------------------


@dataclass
class Changelog:
    """What the worker wrote to its state changelog: per finished completion (read back from
    the changelog topic) and in all (its ``chunkfold_state_written_bytes_total``)."""

    per_completion: list[int] = field(default_factory=list)
    records: int = 0
    metric_bytes: float = math.nan
    metric_completions: float = math.nan
    complete: bool = False
    completion_bytes: list[int] = field(default_factory=list)

    @property
    def completion_mean(self) -> float:
        return sum(self.completion_bytes) / len(self.completion_bytes) if self.completion_bytes else math.nan

    @property
    def topic_mean(self) -> float:
        return sum(self.per_completion) / len(self.per_completion) if self.per_completion else math.nan

    @property
    def metric_mean(self) -> float:
        return self.metric_bytes / self.metric_completions if self.metric_completions else math.nan

    @property
    def ratio(self) -> float:
        """Metric-based when every completion finished, else from the changelog topic."""
        mean = self.metric_mean if self.complete else self.topic_mean
        return mean / self.completion_mean


async def _changelog(servers: str, topic: str, finished: set[bytes]) -> Changelog:
    """Bytes (key + value, as the worker's metric counts them) written to ``topic`` for each
    completion in ``finished``."""
    consumer = await _assigned_consumer(servers, [topic])
    ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    sizes: dict[str, int] = {}
    out = Changelog()
    try:
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for messages in batch.values():
                for m in messages:
                    out.records += 1
                    key = completion_of(m.key.decode("utf-8"))
                    sizes[key] = sizes.get(key, 0) + len(m.key) + len(m.value or b"")
    finally:
        await consumer.stop()
    out.per_completion = [sizes.get(k.decode(), 0) for k in finished]
    return out


# -- latency ----------------------------------------------------------------------------------


@dataclass
class Latency:
    name: str
    rate: float
    offered: float
    chunks: int
    delivered: int
    latencies_ms: list[float]
    kept_up: bool
    processed_rate: float
    window: float
    load: float
    cpu_share: float = math.nan
    """CPU time of the consumer process / wall time, over the whole run (1.0: one core)."""
    inside: tuple[float, float] | None = None
    """The worker's own chunkfold_end_to_end_latency_seconds p50/p99 (bucket bounds, ms)."""

    @property
    def offered_ok(self) -> bool:
        """The load generator reached the target rate (on a busy machine it may not)."""
        return self.offered >= OFFERED_SHARE * self.rate

    @property
    def sustained(self) -> bool:
        return self.kept_up and self.offered_ok

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def send_schedule(workload: Workload, rate: float) -> list[float]:
    """When the load generator sends each record of ``workload``, in s after its start: chunks
    at ``rate`` per second, any other record with the chunk after it."""
    due: list[float] = []
    chunks = 0
    for is_chunk in workload.chunk:
        due.append(chunks / rate)
        chunks += is_chunk
    return due


async def _measure_latency(
    servers: str,
    out_topic: str,
    workload: Workload,
    rate: float,
    source: str,
    is_worker: bool,
    workdir: Path,
) -> tuple[list[float], list[float], float]:
    """Run the load generator against ``source`` while reading ``out_topic``; returns per record
    (send time, first-event arrival time, nan if none) and the time reading stopped."""
    expected = workload.first_event if is_worker else workload.by_position
    arrival = [math.nan] * len(workload.records)
    due = send_schedule(workload, rate)
    plan_file, times_file = workdir / f"plan-{out_topic}.pickle", workdir / f"sent-{out_topic}.f64"
    LoadPlan([(r.key, r.value, r.headers) for r in workload.records], due).dump(plan_file)
    consumer = await _assigned_consumer(servers, [out_topic])
    # Arrival is stamped in this process: a full collection walking the bench's own data (the
    # workloads, the plan) would stall the stamping by up to ~150 ms (measured) and be counted as
    # latency of whichever process is measured. Freeze what exists; young collections stay.
    gc.collect()
    gc.freeze()
    load = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.bench.kafka_procs", "load", "--bootstrap-servers", servers),
        *("--topic", source, "--plan", str(plan_file), "--out", str(times_file)),
        cwd=ROOT,
    )
    finished = asyncio.create_task(load.wait())
    remaining = len(expected)
    ended: float | None = None
    deadline = time.time() + STARTUP_TIMEOUT_S + 4 * (due[-1] if due else 0.0)
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=20_000)
            now = time.time()
            for messages in batch.values():
                for m in messages:
                    if is_worker:
                        seq = orjson.loads(m.value)["seq"]
                    else:
                        raw = next((v for k, v in m.headers if k == SEQ_HEADER), b"-1")
                        seq = int(raw)
                    i = expected.get((m.key, seq))
                    if i is not None and math.isnan(arrival[i]):
                        arrival[i] = now
                        remaining -= 1
            if finished.done():
                ended = ended or time.time()
                if remaining == 0 or time.time() > ended + GRACE_S:
                    break
            elif now > deadline:
                break
    finally:
        gc.unfreeze()
        await consumer.stop()
        if not finished.done():
            load.kill()
        await finished
    if load.returncode != 0:
        raise RuntimeError(f"load generator failed (exit {load.returncode})")
    return read_times(times_file), arrival, time.time()


def latency_run(
    servers: str,
    workload: Workload,
    rate: float,
    *,
    worker: bool,
    workdir: Path,
    guarantee: str = Settings().processing_guarantee,
    settings_overrides: Mapping[str, Any] = NO_OVERRIDES,
    during: During = nothing_during,
) -> Latency:
    """``workload`` offered at ``rate`` to a worker (or the pipe); for a worker,
    ``settings_overrides`` add to (or replace) its settings and ``during`` runs alongside it
    from when it is ready to the end of the measurement."""
    settings = fresh_settings(
        servers,
        **{
            "partitions": PARTITIONS,
            "web_port": free_port(),
            "commit_interval_s": Settings().commit_interval_s,
            "processing_guarantee": guarantee,
            **settings_overrides,
        },
    )
    exactly_once = guarantee == "exactly_once"
    topics = [settings.input_topic, settings.events_topic, settings.done_topic, settings.deadletter_topic]
    asyncio.run(ensure_topics(servers, topics, PARTITIONS))
    processed = math.nan
    inside: tuple[float, float] | None = None

    def measure(pid: int) -> tuple[list[float], list[float], float, float]:
        """The latency run against the consumer process ``pid``, plus that process's CPU share."""
        cpu, wall = cpu_seconds(pid), time.time()
        sent, arrival, stopped = asyncio.run(
            _measure_latency(
                servers, settings.events_topic, workload, rate, settings.input_topic, worker, workdir
            )
        )
        return sent, arrival, stopped, (cpu_seconds(pid) - cpu) / (time.time() - wall)

    if worker:
        with running_worker(settings, workdir / f"worker-latency-{rate:.0f}-{guarantee}.log") as process:
            wait_worker_ready(process)
            assert process.proc is not None
            with during(settings):
                sent, arrival, stopped, cpu_share = measure(process.proc.pid)
            metrics = scrape(settings.web_port)
            processed = _total(metrics, "chunkfold_chunks_in_total") / (time.time() - min(sent))
            inside = _histogram_quantiles(metrics, "chunkfold_end_to_end_latency_seconds")
    else:
        pipe = PipeProcess(
            servers,
            settings.input_topic,
            settings.events_topic,
            settings.app_id,
            settings.commit_interval_s,
            workdir,
        ).start()
        try:
            pipe.wait_ready()
            assert pipe.proc is not None
            sent, arrival, stopped, cpu_share = measure(pipe.proc.pid)
        finally:
            pipe.stop()
    expected = workload.first_event if worker else workload.by_position
    start = min(sent)
    last_sent = max(sent)
    measured = sorted(i for i in expected.values() if sent[i] - start >= WARMUP_S)
    latencies = [(arrival[i] - sent[i]) * 1000 if not math.isnan(arrival[i]) else math.inf for i in measured]
    delivered = sum(1 for i in expected.values() if not math.isnan(arrival[i]))
    last_arrival = max((a for a in arrival if not math.isnan(a)), default=math.inf)
    offered = workload.chunks / (last_sent - start)
    allowed = KEPT_UP_S + (settings.commit_interval_s if exactly_once else 0.0)
    kept_up = delivered == len(expected) and last_arrival <= last_sent + allowed
    if not worker:
        processed = delivered / (last_arrival - start) * workload.chunks / max(1, len(expected))
    return Latency(
        ("worker (exactly_once)" if exactly_once else "chunkfold worker") if worker else "aiokafka pipe",
        rate,
        offered,
        len(measured),
        sum(1 for x in latencies if math.isfinite(x)),
        latencies,
        kept_up,
        processed,
        stopped - start,
        load_average(),
        cpu_share,
        inside,
    )


def _histogram_quantiles(metrics: dict[str, float], name: str) -> tuple[float, float] | None:
    """p50 and p99 (upper bounds of their buckets, in ms) of a Prometheus histogram."""
    buckets = sorted(
        (float(key.split('le="', 1)[1].split('"', 1)[0]), count)
        for key, count in metrics.items()
        if key.startswith(name + "_bucket{")
    )
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return None
    p50, p99 = (next(bound for bound, count in buckets if count >= q * total) * 1000 for q in (0.5, 0.99))
    return p50, p99


# -- output -----------------------------------------------------------------------------------


def _ms(value: float, window: float, unit: str = "") -> str:
    """Milliseconds; an event that never arrived shows as more than the measured window."""
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return f">{window:.0f} s"
    return f"{value:,.1f}{unit}"


def _bound(ms: float) -> str:
    """A histogram bucket's upper bound in ms (the +Inf bucket: more than the largest, 10 s)."""
    if math.isinf(ms):
        return "> 10 s"
    return f"<= {ms / 1000:g} s" if ms >= 1000 else f"<= {ms:g} ms"


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _nice_rate(rate: float) -> float:
    """``rate`` rounded down to two significant digits."""
    if rate <= 0 or not math.isfinite(rate):
        return 0.0
    step = 10 ** max(0, math.floor(math.log10(rate)) - 1)
    return float(max(step, math.floor(rate / step) * step))


def _throughput_table(ctx: BenchContext, rows: list[Throughput]) -> None:
    ctx.out(
        f"{'consumer':<18}{'chunks':>8}  {'span s':>7}  {'chunks/s':>9}  {'CPU s':>6}  {'CPU %':>5}  "
        f"{'chunks/CPU-s':>12}  {'load 1m':>7}"
    )
    for row in rows:
        ctx.out(
            f"{row.name:<18}{row.chunks:>8,}  {row.span:>7.2f}  {_num(row.rate):>9}  {row.cpu:>6.2f}  "
            f"{_num(100 * row.cpu / row.span):>5}  {_num(row.per_cpu):>12}  {row.load:>7.2f}"
            + (f"  ({row.note})" if row.note else "")
        )


def _latency_table(ctx: BenchContext, rows: list[Latency]) -> None:
    ctx.out(
        f"{'consumer':<18}{'target/s':>9}  {'offered/s':>9}  {'chunks':>7}  {'got':>7}  {'p50 ms':>8}"
        f"  {'p99 ms':>8}  {'max ms':>8}  {'kept up':>7}  {'done/s':>6}  {'CPU %':>5}  {'load 1m':>7}"
    )
    for row in rows:
        ctx.out(
            f"{row.name:<18}{row.rate:>9,.0f}  {row.offered:>9,.0f}  {row.chunks:>7,}  {row.delivered:>7,}"
            f"  {_ms(row.quantile(0.5), row.window):>8}  {_ms(row.quantile(0.99), row.window):>8}"
            f"  {_ms(row.quantile(1.0), row.window):>8}  {'yes' if row.kept_up else 'NO':>7}"
            f"  {_num(row.processed_rate):>6}  {_num(100 * row.cpu_share):>5}  {row.load:>7.2f}"
        )


def _intro(ctx: BenchContext, servers: str, started_broker: bool) -> None:
    ctx.out("\n== kafka: end to end through a real broker ==")
    where = (
        "started from the Maven jars by deploy/kafka/kafka.py"
        if started_broker
        else "KAFKA_BOOTSTRAP_SERVERS"
    )
    ctx.out(
        f"broker    : single node at {servers} ({where});\n"
        f"            fresh topics per measurement, {PARTITIONS} partitions each"
    )
    mix = ", ".join(f"{k} {v}%" for k, v in KIND_WEIGHTS.items())
    ctx.out(
        f"workload  : synthetic completions ({mix}; {CHUNK_RANGE[0]}-{CHUNK_RANGE[1]} chunks each) as gateway\n"
        f"            records (request context, chunks, [DONE]; chunkfold.seq headers), {CONCURRENCY} completions\n"
        f"            interleaved at a time; about {POOL_CHUNKS:,} chunks of distinct completions, repeated under new ids"
    )
    ctx.out(
        f"worker    : one `python -m chunkfold.cli worker` process ({Settings().driver} driver, memory store, "
        f"{Settings().processing_guarantee}, write-behind\n"
        f"            every {Settings().commit_interval_s:g} s, web port on for /metrics and /readyz)"
    )
    ctx.out(
        "pipe      : one `python -m tests.bench.kafka_procs pipe` process: aiokafka getmany, producer.send of every\n"
        "            record (key, value, headers) to an output topic, offsets committed every "
        f"{Settings().commit_interval_s:g} s after producer.flush();\n"
        "            producer acks=all, linger 2 ms, as the worker's. The ceiling for any Python Kafka consumer."
    )
    ctx.out(
        f"cpu       : {os.cpu_count()} cores shared by the broker, the consumer under test, the load generator and\n"
        "            this reader (and whatever else runs): 'load 1m' is the 1-minute load average after each run"
    )


@contextlib.contextmanager
def bench_broker() -> Iterator[tuple[str, bool]]:
    """(bootstrap servers, whether started here): ``KAFKA_BOOTSTRAP_SERVERS``, else a single-node
    broker started from the Maven jars and stopped on exit."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    if configured:
        yield configured, False
        return
    from tests.conftest import kafka_module

    broker: Any = kafka_module().Broker()
    try:
        yield broker.start(), True
    finally:
        broker.close()


def run(ctx: BenchContext) -> SectionResult:
    started = time.perf_counter()
    # aiokafka's retried NotLeaderForPartition warnings right after topic creation are noise here
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    throughput_chunks = THROUGHPUT_CHUNKS // 3 if ctx.quick else THROUGHPUT_CHUNKS
    cap = THROUGHPUT_CAP_S / 2 if ctx.quick else THROUGHPUT_CAP_S
    seconds = LATENCY_S / 2 if ctx.quick else LATENCY_S
    templates = completion_templates(ctx.seed)
    thr = build_workload(templates, throughput_chunks, "t", ctx.seed)
    lat = build_workload(templates, int(LATENCY_RATE * seconds), "l", ctx.seed + 1)
    with (
        tempfile.TemporaryDirectory(prefix="chunkfold-bench-") as tmp,
        bench_broker() as (servers, started_broker),
    ):
        _intro(ctx, servers, started_broker)
        verdicts = _measure(ctx, servers, thr, lat, cap, seconds, Path(tmp))
    ctx.out(
        f"\nkafka section: {time.perf_counter() - started:.0f} s; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} after"
    )
    return SectionResult("kafka", verdicts)


def _measure(
    ctx: BenchContext, servers: str, thr: Workload, lat: Workload, cap: float, seconds: float, workdir: Path
) -> list[Verdict]:
    # Latency first, on a broker that has not yet taken the throughput runs' backlogs: their
    # segments, compaction and cleanup had put 150-250 ms stalls into whichever latency run came
    # after them (the worker's p99 measured alone on the same broker: 19-20 ms).
    ctx.out(f"\n== kafka: latency, produce -> first event on completion-events, {seconds:g} s runs ==")
    ctx.out(
        "method: a separate load-generator process (aiokafka producer, acks=all, linger 5 ms, batches built as in the worker) sends\n"
        f"        the interleaved records on a fixed schedule of the target rate in chunks/s, each with its send\n"
        "        time as the record timestamp, into an idle, ready consumer (worker: group stable and /readyz\n"
        "        200). This process reads the output topic; a chunk's latency is from its send to the arrival\n"
        "        here of the first event it yields (matched by completion id and event seq, known from folding\n"
        "        the same records offline; chunks that yield no event, e.g. usage chunks, are left out). The\n"
        "        pipe: send to arrival of the piped copy of the same chunks. The first "
        f"{WARMUP_S:g} s are warm-up and not\n"
        f"        counted; events still missing {GRACE_S:g} s after the last send count as infinitely late ('>Ns').\n"
        f"        offered/s: chunks / send span actually achieved by the load generator. kept up: every event\n"
        f"        arrived, the last within {KEPT_UP_S:g} s of the last send. done/s: chunks the consumer got through\n"
        "        per second from the first send to the end of reading (worker: chunkfold_chunks_in_total; pipe:\n"
        "        piped chunks). CPU %: the consumer process's CPU time over the run, of one core. A rate\n"
        f"        counts as sustained when the consumer kept up and the offered rate reached {OFFERED_SHARE:.0%} of it."
    )
    rows = [
        latency_run(servers, lat, LATENCY_RATE, worker=True, workdir=workdir),
        latency_run(servers, lat, LATENCY_RATE, worker=False, workdir=workdir),
    ]
    exactly_lat = latency_run(
        servers, lat, LATENCY_RATE, worker=True, workdir=workdir, guarantee="exactly_once"
    )
    at_target = rows[0]
    sustained: Latency | None = at_target if at_target.sustained else None
    if not at_target.sustained:
        ceiling = at_target.processed_rate
        for share in FALLBACK_SHARES:
            rate = _nice_rate(share * ceiling)
            if rate <= 0:
                break
            part = lat.prefix(int(rate * seconds))
            row = latency_run(servers, part, rate, worker=True, workdir=workdir)
            rows += [row, latency_run(servers, part, rate, worker=False, workdir=workdir)]
            if row.sustained:
                sustained = row
                break
    _latency_table(ctx, [*rows[:2], exactly_lat, *rows[2:]])
    ctx.out(
        f"worker (exactly_once): its events become visible to a read_committed reader when the checkpoint\n"
        f"  that holds them commits, every CHUNKFOLD_COMMIT_INTERVAL_S ({Settings().commit_interval_s:g} s): that interval bounds its\n"
        f"  latency (about half of it on average, all of it at worst, plus the commit's round trips); it\n"
        f"  counts as kept up when the last event arrived within {KEPT_UP_S:g} s of the last send plus that interval."
    )
    ctx.out(
        "worker-side view, its chunkfold_end_to_end_latency_seconds histogram (input record timestamp -> its\n"
        "outputs handed to the producer; every record of the run, warm-up included; bucket upper bounds):"
    )
    for row in rows:
        if row.inside is not None:
            p50, p99 = row.inside
            ctx.out(f"  at {row.rate:>7,.0f}/s: p50 {_bound(p50)}, p99 {_bound(p99)}")
    for row in rows:
        if not row.offered_ok:
            ctx.out(
                f"note: the load generator offered only {row.offered:,.0f} of {row.rate:,.0f} chunks/s in the "
                f"{row.name} run (CPU contention)"
            )
    if not at_target.sustained:
        ctx.out(
            f"THE WORKER DID NOT SUSTAIN {LATENCY_RATE:,.0f} chunks/s: it got through "
            f"{at_target.processed_rate:,.0f} chunks/s in that run; "
            + (
                f"it kept up at {sustained.rate:,.0f} chunks/s (rows below the first two)."
                if sustained is not None
                else "it kept up at none of the lower rates tried either."
            )
        )

    ctx.out(
        f"\n== kafka: throughput draining a backlog of {len(thr.records):,} records ({thr.chunks:,} chunks, "
        f"{thr.completions} completions) =="
    )
    ctx.out(
        "method: the records are published to a fresh input topic first; then the consumer process starts,\n"
        "        joins and drains them. The clock runs from the CreateTime of the first record it publishes to\n"
        "        that of its last (worker: the last completion-done), so process start, group join and table\n"
        "        recovery are excluded. chunks/s = chunk records / span. CPU s: the consumer process's user+sys\n"
        "        time over the span; CPU %: of one core (near 100: CPU-bound). A consumer still draining\n"
        f"        {cap:.0f} s after its first output is stopped and rated by what it consumed by then (worker:\n"
        "        chunkfold_chunks_in_total)."
    )
    # Worker and pipe alternate, twice each; each is rated by its better run (the machine is shared
    # with the broker, so single runs vary), and every run is printed.
    # Every consumer alternates with the others, THROUGHPUT_RUNS times; each is rated by its best run.
    worker_runs: list[tuple[Throughput, Changelog]] = []
    pipe_runs: list[Throughput] = []
    exactly_runs: list[Throughput] = []
    faust_runs: list[Throughput] = []
    for _ in range(THROUGHPUT_RUNS):
        worker_runs.append(worker_throughput(servers, thr, cap, workdir))
        pipe_runs.append(pipe_throughput(servers, thr, cap, workdir))
        exactly_runs.append(worker_throughput(servers, thr, cap, workdir, guarantee="exactly_once")[0])
        faust_runs.append(worker_throughput(servers, thr, cap, workdir, driver="faust")[0])
    _throughput_table(ctx, [*(w for w, _ in worker_runs), *pipe_runs, *exactly_runs, *faust_runs])
    worker_thr, changelog = max(worker_runs, key=lambda run: run[0].rate)
    pipe_thr = max(pipe_runs, key=lambda run: run.rate)
    exactly_thr = max(exactly_runs, key=lambda run: run.rate)
    faust_thr = max(faust_runs, key=lambda run: run.rate)
    ratio = worker_thr.rate / pipe_thr.rate
    cpu_ratio = worker_thr.per_cpu / pipe_thr.per_cpu
    exactly_ratio = exactly_thr.rate / worker_thr.rate
    faust_ratio = faust_thr.rate / pipe_thr.rate
    ctx.out(
        f"worker / pipe (best runs): {ratio:.2f}x chunks/s, {cpu_ratio:.2f}x chunks per CPU-second "
        f"(target >= {THROUGHPUT_TARGET:g}x chunks/s)\n"
        f"exactly_once / at-least-once worker: {exactly_ratio:.2f}x (target >= {EXACTLY_ONCE_TARGET:g}x); "
        f"exactly_once / pipe: {exactly_thr.rate / pipe_thr.rate:.2f}x\n"
        f"Faust driver / pipe: {faust_ratio:.2f}x (target >= {FAUST_TARGET:g}x)"
    )

    ctx.out("\n== kafka: state changelog bytes per completion vs the final completion ==")
    ctx.out(
        "final completion: len(JSON) of completion-done's \"completion\" (orjson). Changelog: the worker's\n"
        "chunkfold_state_written_bytes_total / completions published (key + value bytes of every table write),\n"
        "scraped from /metrics after the throughput run once the write-behind settled; cross-checked by reading\n"
        "the changelog topic back and summing per finished completion."
    )
    ctx.out(
        f"completions finished {len(changelog.completion_bytes)}; mean final completion "
        f"{changelog.completion_mean:,.0f} B"
    )
    ctx.out(
        f"metric : {_num(changelog.metric_bytes)} B / {_num(changelog.metric_completions)} completions = "
        f"{_num(changelog.metric_mean)} B per completion ({changelog.metric_mean / changelog.completion_mean:.2f}x)"
        + ("" if changelog.complete else " (includes unfinished completions' writes)")
    )
    ctx.out(
        f"topic  : {changelog.records:,} changelog records; {_num(changelog.topic_mean)} B per finished completion "
        f"({changelog.topic_mean / changelog.completion_mean:.2f}x)"
    )
    if not changelog.complete:
        ctx.out(
            "the throughput run was stopped before every completion finished: the ratio judged is the topic's,\n"
            "over the completions that did finish (the earliest, which skew short: fixed per-flush costs weigh more)"
        )

    p99 = at_target.quantile(0.99)
    verdicts = [
        Verdict(
            f"kafka throughput: worker {worker_thr.rate:,.0f} chunks/s = {ratio:.2f}x the bare aiokafka pipe's "
            f"{pipe_thr.rate:,.0f} (target >= {THROUGHPUT_TARGET:g}x)",
            ratio >= THROUGHPUT_TARGET,
        ),
        Verdict(
            f"kafka latency at {LATENCY_RATE:,.0f} chunks/s: worker p99 {_ms(p99, at_target.window, ' ms')}"
            + (
                ""
                if at_target.sustained
                else f", not sustained (got through {at_target.processed_rate:,.0f}/s)"
            )
            + (
                f"; at {sustained.rate:,.0f}/s p99 {_ms(sustained.quantile(0.99), sustained.window, ' ms')}"
                if sustained is not None and sustained is not at_target
                else ""
            )
            + f" (target < {P99_TARGET_MS:g} ms at {LATENCY_RATE:,.0f}/s)",
            at_target.sustained and p99 < P99_TARGET_MS,
        ),
        Verdict(
            f"kafka exactly_once: {exactly_thr.rate:,.0f} chunks/s = {exactly_ratio:.2f}x the at-least-once "
            f"worker's {worker_thr.rate:,.0f} (target >= {EXACTLY_ONCE_TARGET:g}x); at {LATENCY_RATE:,.0f} chunks/s "
            f"p50 {_ms(exactly_lat.quantile(0.5), exactly_lat.window, ' ms')}, "
            f"p99 {_ms(exactly_lat.quantile(0.99), exactly_lat.window, ' ms')}"
            + ("" if exactly_lat.sustained else " (not sustained)"),
            exactly_ratio >= EXACTLY_ONCE_TARGET,
        ),
        Verdict(
            f"kafka Faust driver: {faust_thr.rate:,.0f} chunks/s = {faust_ratio:.2f}x the pipe "
            f"(target >= {FAUST_TARGET:g}x)",
            faust_ratio >= FAUST_TARGET,
        ),
        Verdict(
            f"kafka changelog: {changelog.ratio:.2f}x the final completion's bytes per completion "
            f"(target <= {CHANGELOG_TARGET:g}x)",
            changelog.ratio <= CHANGELOG_TARGET,
        ),
    ]
    return verdicts
