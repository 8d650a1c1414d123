"""A barrage of more than 10,000 malformed records interleaved with good streams: every bad
record is dead-lettered with its bytes and a reason (or counted on its completion), every good
completion is exactly what a clean run gives, and the worker never restarts."""

from __future__ import annotations

import base64
import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.fault.test_faults import write_report
from tests.harness import (
    TIMING_FREE,
    BackgroundProducer,
    WorkerProcess,
    collect,
    fresh_settings,
    offline_run,
    recorded_records,
    start_workers,
)
from worker.core.records import KIND_HEADER, SEQ_HEADER
from worker.gateway import GatewayRecord

pytestmark = pytest.mark.fault
MAX_BYTES = 16_384
BAD_PER_KIND = 1_000


def _bad_records(rng: random.Random, good: list[GatewayRecord]) -> list[GatewayRecord]:
    """Ten kinds of malformed record, BAD_PER_KIND of each; keys never collide with good ones."""
    bad: list[GatewayRecord] = []
    big = orjson.dumps({"id": "x", "choices": [], "pad": "x" * (MAX_BYTES + 100)})
    done_keys = [r.key for r in good if r.value == b"[DONE]"]
    for n in range(BAD_PER_KIND):
        key = f"bad-{n}".encode()
        bad += [
            GatewayRecord(key, b"{not json" + str(n).encode(), []),
            GatewayRecord(key, rng.choice([b"[1, 2, 3]", b"42", b'"text"', b"null"]), []),
            GatewayRecord(
                key, orjson.dumps({"id": key.decode(), "choices": [{"index": "zero", "delta": {}}]}), []
            ),
            GatewayRecord(
                key,
                orjson.dumps({"id": key.decode(), "choices": [{"index": 0, "delta": {"content": 7}}]}),
                [],
            ),
            GatewayRecord(key, big.replace(b'"x"', b'"' + key + b'"', 1), []),
            GatewayRecord(key, b'{"id": "\xff\xfe\xfd"}', []),
            GatewayRecord(b"", orjson.dumps({"id": "", "choices": []}), []),
            GatewayRecord(key, orjson.dumps({"id": "someone-else", "choices": []}), []),
            GatewayRecord(key, b"{}", [(KIND_HEADER, rng.choice([b"mystery", b"DONE", b"\xff"]))]),
            GatewayRecord(f"unknown-{n}".encode(), b"[DONE]", []),
        ]
    for key in done_keys:
        late = orjson.dumps({"id": key.decode(), "object": "chat.completion.chunk", "choices": []})
        bad.append(GatewayRecord(key, late, [(SEQ_HEADER, b"999")]))
    return bad


def _with_seq_anomalies(rng: random.Random, good: list[GatewayRecord]) -> list[GatewayRecord]:
    """Repeat some records (same seq) and renumber some streams with a jump (nothing lost)."""
    out: list[GatewayRecord] = []
    jumped = {r.key for r in good if rng.random() < 0.05}
    for r in good:
        headers = r.headers
        if r.key in jumped:
            seq = int(dict(r.headers)[SEQ_HEADER])
            headers = [
                (k, str(seq + 5 if seq >= 3 else seq).encode() if k == SEQ_HEADER else v)
                for k, v in r.headers
            ]
        record = GatewayRecord(r.key, r.value, headers)
        out.append(record)
        if rng.random() < 0.02 and r.value != b"[DONE]":
            out.append(record)
    return out


def _mix(rng: random.Random, good: list[GatewayRecord], bad: list[GatewayRecord]) -> list[GatewayRecord]:
    """Bad records at random places, except that late chunks go after their completion's end."""
    late = [r for r in bad if dict(r.headers).get(SEQ_HEADER) == b"999"]
    rest = [r for r in bad if dict(r.headers).get(SEQ_HEADER) != b"999"]
    mixed = list(good)
    for r in rest:
        mixed.insert(rng.randrange(len(mixed) + 1), r)
    for r in late:
        end = max(i for i, m in enumerate(mixed) if m.key == r.key and m.value == b"[DONE]")
        mixed.insert(rng.randrange(end + 1, len(mixed) + 1), r)
    return mixed


def test_malformed_barrage(kafka: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    rng = random.Random(11)
    good, completions = recorded_records(repeat=4)
    good = _with_seq_anomalies(rng, good)
    bad = _bad_records(rng, good)
    records = _mix(rng, good, bad)
    settings = fresh_settings(kafka, max_record_bytes=MAX_BYTES)
    want_events, want_done, want_dead = offline_run(records, settings)
    assert len(want_done) == completions and len(want_dead) >= 10_000
    start_workers(settings, 1, tmp_path, workers)
    pid = workers[0].proc.pid if workers[0].proc else None
    producer = BackgroundProducer(settings, records, rate=4_000)
    producer.start()
    producer.finish()
    got = collect(
        settings, lambda c: len(c.done) >= completions and len(c.deadletters) >= len(want_dead), timeout=300
    )

    assert workers[0].alive and workers[0].proc is not None and workers[0].proc.pid == pid
    assert "Traceback" not in workers[0].log_tail(400)
    assert Counter(d["reason"] for d in got.deadletters) == Counter(d["reason"] for d in want_dead)
    for letter in got.deadletters:
        original = base64.b64decode(letter["value_b64"]) if letter["value_b64"] is not None else b""
        assert original in {r.value for r in bad}, letter["reason"]
    done, events = got.done_by_id(), got.events_by_id()
    assert set(done) == set(want_done)
    for completion_id, want in want_done.items():
        for field in (*TIMING_FREE, "anomalies"):
            assert done[completion_id][field] == want[field], (completion_id, field)
        assert events[completion_id] == want_events[completion_id]
    anomalies = Counter()
    for d in done.values():
        anomalies.update({k: v for k, v in d["anomalies"].items() if v})
    assert anomalies["duplicates_dropped"] > 0 and anomalies["seq_gaps"] > 0
    write_report(
        "malformed barrage",
        completions=completions,
        bad_records=len(bad) + anomalies["duplicates_dropped"] + anomalies["seq_gaps"],
        dead_lettered=len(got.deadletters),
        counted_as_anomalies=dict(anomalies),
        lost=completions - len(done),
        repeated_done_before_dedup=got.repeats()[0],
        worker_restarts=0,
    )
