"""A barrage of more than 10,000 malformed records interleaved with good streams: every bad
record is dead-lettered with its bytes and a reason (or counted on its completion), every good
completion is exactly what a clean run gives, and the worker never restarts."""

from __future__ import annotations

import base64
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, cast

import orjson
import pytest

from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.gateway import GatewayRecord
from tests.fault.test_faults import SHAPES, write_report
from tests.harness import (
    TIMING_FREE,
    BackgroundProducer,
    WorkerProcess,
    collect,
    fresh_settings,
    offline_reference,
    recorded_records,
    start_workers,
)

pytestmark = pytest.mark.fault
MAX_BYTES = 16_384
BAD_PER_KIND = 1_000


Bad = list[tuple[GatewayRecord, str]]
"""Malformed records, each with the dead-letter reason it must get."""


def _bad_records(rng: random.Random, good: list[GatewayRecord]) -> Bad:
    """Eleven kinds of malformed record, BAD_PER_KIND of each, with their expected reasons; the
    wrong-type and unknown-kind records of every other round carry the key of a good completion
    (they must not disturb it). Late chunks for every good completion go after its end."""
    bad: Bad = []
    big = orjson.dumps({"id": "x", "choices": [], "pad": "x" * (MAX_BYTES + 100)})
    done_keys = [r.key for r in good if r.value == b"[DONE]"]
    for n in range(BAD_PER_KIND):
        key = f"bad-{n}".encode()
        shared = done_keys[n % len(done_keys)] if n % 2 else key
        bad += [
            (GatewayRecord(key, b"{not json" + str(n).encode(), []), "invalid_json"),
            (GatewayRecord(key, rng.choice([b"[1, 2, 3]", b"42", b'"text"', b"null"]), []), "not_an_object"),
            (
                GatewayRecord(
                    shared,
                    orjson.dumps({"id": shared.decode(), "choices": [{"index": "zero", "delta": {}}]}),
                    [],
                ),
                "wrong_type",
            ),
            (
                GatewayRecord(
                    shared,
                    orjson.dumps({"id": shared.decode(), "choices": [{"index": 0, "delta": {"content": 7}}]}),
                    [],
                ),
                "wrong_type",
            ),
            (GatewayRecord(key, big.replace(b'"x"', b'"' + key + b'"', 1), []), "oversized"),
            (GatewayRecord(key, b'{"id": "\xff\xfe\xfd"}', []), "invalid_json"),
            # No key: an empty one, or none at all (a null Kafka key).
            (
                GatewayRecord(
                    b"" if n % 2 else cast(bytes, None), orjson.dumps({"id": "", "choices": []}), []
                ),
                "missing_key",
            ),
            (
                GatewayRecord(
                    key, orjson.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": [7]}}]}), []
                ),
                "wrong_type",
            ),
            (
                GatewayRecord(shared, b"{}", [(KIND_HEADER, rng.choice([b"mystery", b"DONE", b"\xff"]))]),
                "unknown_kind",
            ),
            (GatewayRecord(f"unknown-{n}".encode(), b"[DONE]", []), "unknown_completion"),
        ]
    for key in done_keys:
        late = orjson.dumps({"id": key.decode(), "object": "chat.completion.chunk", "choices": []})
        bad.append((GatewayRecord(key, late, [(SEQ_HEADER, b"999")]), "after_end"))
    return bad


class SeqAnomalies(NamedTuple):
    records: list[GatewayRecord]
    repeats: int
    gaps: int
    missing: int


def _with_seq_anomalies(rng: random.Random, good: list[GatewayRecord]) -> SeqAnomalies:
    """Repeat some records (same seq) and renumber some streams with a jump of 5 from seq 3 on
    (nothing lost); counts what it injected."""
    out: list[GatewayRecord] = []
    jumped = {r.key for r in good if rng.random() < 0.05}
    repeats = 0
    gapped: set[bytes] = set()
    for r in good:
        headers = r.headers
        if r.key in jumped:
            seq = int(dict(r.headers)[SEQ_HEADER])
            if seq >= 3:
                gapped.add(r.key)
            headers = [
                (k, str(seq + 5 if seq >= 3 else seq).encode() if k == SEQ_HEADER else v)
                for k, v in r.headers
            ]
        record = GatewayRecord(r.key, r.value, headers)
        out.append(record)
        if rng.random() < 0.02 and r.value != b"[DONE]":
            out.append(record)
            repeats += 1
    return SeqAnomalies(out, repeats, len(gapped), 5 * len(gapped))


def _mix(rng: random.Random, good: list[GatewayRecord], bad: list[GatewayRecord]) -> list[GatewayRecord]:
    """Bad records at random places, except that late chunks go after their completion's end
    and a bad record with a good completion's key goes inside that completion's stream."""
    late = [r for r in bad if dict(r.headers).get(SEQ_HEADER) == b"999"]
    rest = [r for r in bad if dict(r.headers).get(SEQ_HEADER) != b"999"]
    mixed = list(good)
    good_keys = {r.key for r in good}
    for r in rest:
        if r.key in good_keys:
            span = [i for i, m in enumerate(mixed) if m.key == r.key]
            mixed.insert(rng.randrange(span[0] + 1, span[-1] + 1), r)
        else:
            mixed.insert(rng.randrange(len(mixed) + 1), r)
    for r in late:
        end = max(i for i, m in enumerate(mixed) if m.key == r.key and m.value == b"[DONE]")
        mixed.insert(rng.randrange(end + 1, len(mixed) + 1), r)
    return mixed


def test_malformed_barrage(kafka: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    rng = random.Random(11)
    clean, completions = recorded_records(repeat=4, shapes=SHAPES)
    anomalous = _with_seq_anomalies(rng, clean)
    bad = _bad_records(rng, clean)
    records = _mix(rng, anomalous.records, [r for r, _ in bad])
    settings = fresh_settings(kafka, max_record_bytes=MAX_BYTES)
    want_events, want_done = offline_reference(clean, settings)
    assert len(want_done) == completions and len(bad) >= 10_000
    start_workers(settings, 1, tmp_path, workers)
    pid = workers[0].proc.pid if workers[0].proc else None
    producer = BackgroundProducer(settings, records, rate=4_000)
    producer.start()
    moments = [time.time() for _ in _every(0.5, producer)]
    producer.finish()
    good_keys = {r.key for r in clean}
    in_flight = max((producer.in_flight_at(t, good_keys) for t in moments), default=0)
    got = collect(
        settings, lambda c: len(c.done) >= completions and len(c.deadletters) >= len(bad), timeout=300
    )

    # The worker never restarted and never failed.
    assert workers[0].alive and workers[0].proc is not None and workers[0].proc.pid == pid
    assert "Traceback" not in workers[0].log_tail(400)
    # Every bad record is dead-lettered once, with its own key and value bytes and its reason.
    assert Counter(d["reason"] for d in got.deadletters) == Counter(reason for _, reason in bad)
    sent = Counter((r.key or b"", r.value, reason) for r, reason in bad)
    received = Counter(
        (
            base64.b64decode(d["key_b64"]) if d["key_b64"] is not None else b"",
            base64.b64decode(d["value_b64"]) if d["value_b64"] is not None else b"",
            d["reason"],
        )
        for d in got.deadletters
    )
    assert received == sent
    # Every good completion is what a run of the good streams alone gives; the seq repeats and
    # jumps are dropped / reported on their completions, exactly as many as were injected.
    done, events = got.done_by_id(), got.events_by_id()
    assert set(done) == set(want_done)
    for completion_id, want in want_done.items():
        for field in TIMING_FREE:
            if field != "anomalies":
                assert done[completion_id][field] == want[field], (completion_id, field)
        assert events[completion_id] == want_events[completion_id]
    anomalies: Counter[str] = Counter()
    for d in done.values():
        anomalies.update({k: v for k, v in d["anomalies"].items() if v})
    # the generated streams carry gateway retries of their own: what the clean run counts
    inherent: Counter[str] = Counter()
    for d in want_done.values():
        inherent.update({k: v for k, v in d["anomalies"].items() if v})
    assert anomalies == inherent + Counter(
        duplicates_dropped=anomalous.repeats, seq_gaps=anomalous.gaps, missing_records=anomalous.missing
    )
    write_report(
        "malformed barrage",
        completions=completions,
        in_flight=in_flight,
        bad_records=len(bad) + anomalous.repeats + anomalous.gaps,
        dead_lettered=len(got.deadletters),
        dead_letter_reasons=dict(Counter(d["reason"] for d in got.deadletters)),
        counted_as_anomalies=dict(anomalies),
        lost=completions - len(done),
        repeated_done_before_dedup=got.repeats()[0],
        duplicated_after_dedup=got.duplicates_after_dedup(),
        worker_restarts=0,
    )


def _every(seconds: float, producer: BackgroundProducer) -> Iterator[None]:
    """Yields every ``seconds`` while ``producer`` runs."""
    while producer.is_alive():
        yield
        time.sleep(seconds)
