"""The worker's record loop without a broker: a simulated partitioned log, offset commits that
follow acknowledgements, write-behind flushes and crashes at arbitrary points."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from chunkfold import processor as processor_module
from chunkfold.config import Settings
from chunkfold.core.inputs import frames_to_keys, iter_frames
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER, RecordKind
from chunkfold.processor import Output, Processor
from chunkfold.replay import replay_kafka
from chunkfold.state.memory import MemoryStore
from tests.harness import feed
from tests.recorded import recordings

pytestmark = pytest.mark.unit
PARTITIONS = 4


@dataclass
class Rec:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    ts: int


def gateway_records(with_request: bool = True, retries: bool = False) -> dict[int, list[Rec]]:
    """Every recording as a gateway would publish it, interleaved over PARTITIONS partitions;
    with ``retries`` about one record in twelve is published twice (same ``seq``)."""
    streams: list[list[Rec]] = []
    for n, rec in enumerate(recordings()):
        keyed = list(frames_to_keys(iter_frames(rec.sse.read_text())))
        key = keyed[0][0].encode()
        out: list[Rec] = []
        if with_request:
            out.append(Rec(key, orjson.dumps(rec.request), [(KIND_HEADER, b"request")], 1000 * n))
        for _, frame in keyed:
            value = b"[DONE]" if frame.kind is RecordKind.DONE else orjson.dumps(frame.payload)
            out.append(Rec(key, value, [], 1000 * n + len(out)))
        streams.append(
            [
                Rec(r.key, r.value, [*r.headers, (SEQ_HEADER, str(i).encode())], r.ts)
                for i, r in enumerate(out)
            ]
        )
    rng = random.Random(7)
    if retries:
        streams = [
            [r for rec in s for r in ([rec, rec] if rng.random() < 1 / 12 else [rec])] for s in streams
        ]
    logs: dict[int, list[Rec]] = {p: [] for p in range(PARTITIONS)}
    cursors = [0] * len(streams)
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        i = rng.choice([i for i, s in enumerate(streams) if cursors[i] < len(s)])
        logs[i % PARTITIONS].append(streams[i][cursors[i]])
        cursors[i] += 1
    return logs


@dataclass
class Run:
    """A consumer over the simulated log with Faust's commit rule: the contiguous acked prefix,
    committed on its own schedule (an interval), not at once when a record is acknowledged."""

    logs: dict[int, list[Rec]]
    settings: Settings = field(default_factory=lambda: Settings(partitions=PARTITIONS))
    store: MemoryStore = field(default_factory=MemoryStore)
    published: list[Output] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(PARTITIONS), 0))

    def start(self) -> tuple[Processor, dict[int, int], dict[int, set[int]]]:
        processor = Processor(self.settings, self.store)
        processor.assign(range(PARTITIONS))
        return processor, dict(self.committed), {p: set() for p in range(PARTITIONS)}

    def ack(self, acked: dict[int, set[int]], handles: list[Any]) -> None:
        for partition, offset in handles:
            acked[partition].add(offset)

    def commit(self, acked: dict[int, set[int]]) -> None:
        for p in acked:
            while self.committed[p] in acked[p]:
                self.committed[p] += 1

    def flush(self, processor: Processor, acked: dict[int, set[int]]) -> None:
        self.ack(acked, processor.apply(processor.capture()))

    def consume(
        self, crash_after: int | None, flush_every: int, rng: random.Random, commit_every: int = 1
    ) -> bool:
        """Process until the logs are exhausted (True) or ``crash_after`` records (False);
        acknowledged offsets are committed every ``commit_every`` records."""
        processor, position, acked = self.start()
        handled = 0
        while True:
            ready = [p for p in range(PARTITIONS) if position[p] < len(self.logs[p])]
            if not ready:
                self.flush(processor, acked)
                self.commit(acked)
                return True
            p = rng.choice(ready)
            r = self.logs[p][position[p]]
            out, ack_now = processor.process(
                partition=p,
                offset=position[p],
                key=r.key,
                value=r.value,
                headers=r.headers,
                timestamp_ms=r.ts,
                handle=(p, position[p]),
            )
            self.published += out
            if ack_now:
                self.ack(acked, [(p, position[p])])
            position[p] += 1
            handled += 1
            if handled % flush_every == 0:
                self.flush(processor, acked)
            if handled % commit_every == 0:
                self.commit(acked)
            if crash_after is not None and handled >= crash_after:
                return False


def dedupe(published: list[Output]) -> tuple[dict[tuple[bytes, int], bytes], dict[bytes, bytes]]:
    events: dict[tuple[bytes, int], bytes] = {}
    done: dict[bytes, bytes] = {}
    for o in published:
        if o.topic == "completion-events":
            k = (o.key, orjson.loads(o.value)["seq"])
            assert events.setdefault(k, o.value) == o.value, "a repeated event differs"
        elif o.topic == "completion-done":
            assert done.setdefault(o.key, o.value) == o.value, "a repeated completion-done differs"
    return events, done


def reference(retries: bool = False) -> tuple[dict[tuple[bytes, int], bytes], dict[bytes, bytes]]:
    run = Run(gateway_records(retries=retries))
    assert run.consume(None, 10, random.Random(1))
    return dedupe(run.published)


def test_one_engine_two_drivers() -> None:
    events, done = reference()
    assert len(done) == 49
    for rec in recordings():
        replayed = list(replay_kafka(rec.sse.read_text(), rec.request, Settings()))
        key = replayed[0]["key"].encode()
        worker_events = sorted((k[1], orjson.loads(v)) for k, v in events.items() if k[0] == key)
        assert [v for _, v in worker_events] == [
            r["value"] for r in replayed if r["topic"] == "completion-events"
        ]
        got = orjson.loads(done[key])
        want = next(r["value"] for r in replayed if r["topic"] == "completion-done")
        for field_name in ("completion", "status", "error", "usage", "event_count", "chunk_count", "request"):
            assert got[field_name] == want[field_name], field_name


@pytest.mark.parametrize("seed", range(12))
def test_crashes_repeat_outputs_but_never_lose_or_change_them(seed: int) -> None:
    """Crashes between a state flush and the offset commit redeliver records the restored state
    already holds; gateway retries repeat a ``seq``. Neither may change a published record."""
    retries = seed % 2 == 1
    want_events, want_done = reference(retries)
    rng = random.Random(seed)
    run = Run(gateway_records(retries=retries))
    crashes = 0
    while not run.consume(rng.randint(1, 400), rng.randint(1, 60), rng, commit_every=rng.randint(1, 90)):
        crashes += 1
    assert crashes > 0
    if retries:
        assert sum(orjson.loads(v)["anomalies"]["duplicates_dropped"] for v in want_done.values()) > 0
    events, done = dedupe(run.published)
    assert done == want_done
    assert events == want_events
    for key in {k for k, _ in events}:
        seqs = sorted(s for k, s in events if k == key)
        assert seqs == list(range(len(seqs)))


def test_changelog_bytes_stay_linear_in_the_completion() -> None:
    run = Run(gateway_records(with_request=False))
    assert run.consume(None, 500, random.Random(3))
    _, done = dedupe(run.published)
    written: dict[str, int] = {}
    for _, key, value in run.store.log:
        completion_id = key.split("\x1f")[0]
        written[completion_id] = written.get(completion_id, 0) + len(key) + len(value or b"")
    ratios = {
        k: written[k] / len(orjson.dumps(orjson.loads(v)["completion"]))
        for k, v in ((k.decode(), v) for k, v in done.items())
    }
    assert max(ratios.values()) <= 3.0, sorted(ratios.items(), key=lambda kv: -kv[1])[:3]


def abandoned_run() -> tuple[Run, Processor, dict[int, set[int]]]:
    """Every recording without its [DONE], consumed and committed, then a fresh processor (at
    wall time 10,000 s, far past the 60 s idle timeout) that has loaded all 49 from the store."""
    logs = gateway_records()
    cut = {p: [r for r in recs if r.value != b"[DONE]"] for p, recs in logs.items()}
    run = Run(cut, settings=Settings(partitions=PARTITIONS, idle_timeout_s=60, tombstone_s=30))
    assert run.consume(None, 5, random.Random(5))
    processor, _, acked = run.start()
    processor.clock = lambda: 10_000.0
    assert processor.scan() == 49
    return run, processor, acked


def test_idle_completions_expire_and_their_state_is_deleted() -> None:
    run, processor, acked = abandoned_run()
    assert processor.open_completions() == 49
    expired = processor.sweep()
    statuses = [orjson.loads(o.value)["status"] for o in expired if o.topic == "completion-done"]
    assert statuses == ["expired"] * 49
    run.flush(processor, acked)
    assert all("\x1f" not in k for k in run.store.data), "segments are deleted when a completion closes"
    assert processor.closed_tombstones() == 49
    processor.clock = lambda: 10_031.0
    processor.sweep()
    assert processor.closed_tombstones() == 0 and run.store.data == {}


def test_a_sweep_examines_a_bounded_slice_and_reaches_everything_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processor_module, "SWEEP_SLICE", 10)
    _, processor, _ = abandoned_run()
    expired_per_call = [sum(1 for o in processor.sweep() if o.topic == "completion-done") for _ in range(6)]
    assert expired_per_call == [10, 10, 10, 10, 9, 0]
    assert processor.open_completions() == 0


def test_a_flush_captured_before_a_rebalance_is_dropped() -> None:
    from chunkfold.core.persist import restore
    from chunkfold.core.state import encode_state

    records = [r for recs in gateway_records().values() for r in recs][:400]
    store = MemoryStore()
    processor = Processor(Settings(partitions=1), store)
    processor.assign([0])

    def feed_range(start: int, stop: int) -> None:
        for _ in feed(processor, records[start:stop], start, base_ms=0):
            pass

    feed_range(0, 100)
    processor.apply(processor.capture())
    feed_range(100, 200)
    stale = processor.capture()
    processor.revoke([0])
    processor.assign([0])
    feed_range(100, 300)
    assert processor.apply(processor.capture())
    assert processor.apply(stale) == []
    for completion_id, tracked in processor.tracked.items():
        restored = restore(completion_id, store.get)
        assert restored is not None
        assert encode_state(restored.state) == encode_state(tracked.state), completion_id


def test_a_backlog_does_not_expire_completions_whose_records_are_still_coming() -> None:
    wall = [1_000.0]
    processor = Processor(Settings(idle_timeout_s=60), MemoryStore(), clock=lambda: wall[0])
    processor.assign([0])
    log = next(iter(gateway_records().values()))
    first = log[0]
    second = next(r for r in log[1:] if r.key == first.key)
    processor.process(
        partition=0, offset=0, key=first.key, value=first.value, headers=[], timestamp_ms=0, handle=0
    )
    assert processor.sweep() == [], "records 1000 s old in a backlog being consumed are not idle"
    processor.process(
        partition=0, offset=1, key=second.key, value=second.value, headers=[], timestamp_ms=1_000, handle=1
    )
    wall[0] += 61
    expired = processor.sweep()
    assert [orjson.loads(o.value)["status"] for o in expired] == ["expired"]


def test_log_lines_about_a_completion_carry_its_id(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from chunkfold.logs import JsonFormatter

    processor = Processor(Settings(), MemoryStore())
    processor.assign([0])
    records = next(iter(gateway_records().values()))
    with caplog.at_level(logging.INFO, logger="chunkfold.worker"):
        for _ in feed(processor, records):
            pass
        processor.process(
            partition=0, offset=9999, key=b"k", value=b"{oops", headers=[], timestamp_ms=None, handle=None
        )
    lines = [orjson.loads(JsonFormatter().format(record)) for record in caplog.records]
    finished = [line for line in lines if line["msg"] == "completion finished"]
    assert finished and all(line["completion_id"] and line["status"] for line in finished)
    dead = [line for line in lines if line["level"] == "warning"]
    assert dead == [dead[0]] and dead[0]["completion_id"] == "k" and dead[0]["reason"] == "invalid_json"
    assert dead[0]["offset"] == 9999


def test_a_record_arriving_after_the_idle_timeout_finds_its_completion_expired() -> None:
    """Whether a late record is folded in or dead-lettered depends on its timestamp, not on when
    the sweep timer ran, so a redelivery after a crash repeats the same outputs."""
    log = next(iter(gateway_records(with_request=False).values()))
    first = log[0]
    second = next(r for r in log[1:] if r.key == first.key)

    processor = Processor(Settings(idle_timeout_s=60), MemoryStore(), clock=lambda: 0.0)
    processor.assign([0])
    out: list[Output] = []
    for offset, (r, ts) in enumerate([(first, 0), (second, 59_999), (second, 120_000)]):
        out += processor.process(
            partition=0, offset=offset, key=r.key, value=r.value, headers=[], timestamp_ms=ts, handle=offset
        )[0]
    outputs = [(o.topic, orjson.loads(o.value)) for o in out if o.topic != "completion-events"]
    assert [topic for topic, _ in outputs] == ["completion-done", "completion-deadletter"]
    assert outputs[0][1]["status"] == "expired" and outputs[0][1]["chunk_count"] == 2
    assert outputs[1][1]["reason"] == "after_end"
