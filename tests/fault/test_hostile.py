"""Poison records on a real broker: a seeded barrage of hostile records (huge, binary, deeply
nested, big integers, invalid and hostile schemas, timestamps far ahead and behind, colliding
and odd keys, a bogus seq, completions larger than a record may be) interleaved with good
completions, for both drivers and both guarantees. The worker never exits, every good completion
equals a run of the good streams alone, every hostile record is accounted for (a dead letter or
its own completion's outcome, exactly as the engine alone decides), and every output record is
within its topic's limit."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from chunkfold.config import Settings
from chunkfold.core import fit
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.gateway import GatewayRecord
from chunkfold.kafka_io import ensure_topics, make_producer
from tests.fault.test_faults import SHAPES, write_report
from tests.harness import (
    TIMING_FREE,
    WorkerProcess,
    collect,
    fresh_settings,
    offline_reference,
    offline_run,
    recorded_records,
    start_workers,
)
from tests.streams import USAGE, choice, chunk

pytestmark = pytest.mark.fault
Stamped = tuple[GatewayRecord, int]
"""A record and the timestamp (epoch ms) it is published with."""
MINUTE_MS = 60_000
COMBINATIONS = [("direct", "at_least_once"), ("direct", "exactly_once"), ("faust", "at_least_once")]


def _stream(cid: str, parts: list[str], request: dict[str, Any] | None = None) -> list[GatewayRecord]:
    """A plain content stream, with a request context first when given, numbered by seq."""
    key = cid.encode()
    values: list[tuple[bytes, list[tuple[str, bytes]]]] = []
    if request is not None:
        values.append((orjson.dumps(request), [(KIND_HEADER, b"request")]))
    values.append((orjson.dumps(chunk(choice(0, role="assistant", content=""), cid=cid)), []))
    values += [(orjson.dumps(chunk(choice(0, content=p), cid=cid)), []) for p in parts]
    values.append((orjson.dumps(chunk(choice(0, finish_reason="stop"), cid=cid)), []))
    values.append((orjson.dumps(chunk(usage=USAGE, cid=cid)), []))
    values.append((b"[DONE]", []))
    return [GatewayRecord(key, v, [*h, (SEQ_HEADER, str(n).encode())]) for n, (v, h) in enumerate(values)]


def _schema_request(schema: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "S", "schema": schema, "strict": True},
        },
    }


def hostile_streams(rng: random.Random) -> list[list[GatewayRecord]]:
    """Whole completions that are hostile by content; each must end with its own outcome."""
    schemas: dict[str, tuple[Any, list[str]]] = {
        "schema-typo": ({"type": "strnig"}, ['"text"']),
        "schema-bad-pattern": ({"type": "string", "pattern": "["}, ['"x"']),
        "schema-self-ref": ({"$ref": "#"}, ['{"a":', "1}"]),
        "schema-remote-ref": ({"$ref": "http://127.0.0.1:9/schema.json"}, ['{"a": 1}']),
        "schema-redos": ({"type": "string", "pattern": "^(a+)+$"}, ['"' + "a" * 40, '!"']),
        "big-integer": ({"type": "object"}, ['{"a": 1234567890123456789', "01234567890}"]),
    }
    streams = [
        _stream(f"hostile-{name}", parts, _schema_request(schema))
        for name, (schema, parts) in schemas.items()
    ]
    parts = ["".join(rng.choices("abcdefghij ", k=400_000)) for _ in range(3)]
    streams.append(_stream("hostile-oversized-completion", parts))
    random_text = "".join(
        rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=1_600_000)
    )
    streams.append(
        _stream("hostile-random-text", [random_text[i : i + 400_000] for i in range(0, 1_600_000, 400_000)])
    )
    nested = orjson.dumps(chunk(choice(0, content="deep"), cid="hostile-nested"))
    deep = b'{"nest": ' + b"[" * 300 + b"]" * 300 + b", " + nested[1:]
    stream = _stream("hostile-nested", ["a"])
    streams.append(
        [*stream[:2], GatewayRecord(stream[0].key, deep, [(SEQ_HEADER, b"2")]), *_renumber(stream[2:], 3)]
    )
    for name in ("victim", "victim\x1f0", "victim\x1f1x", "nul\x00key", "new\nline", "k" * 100_000):
        streams.append(_stream(name, ["one ", "two"]))
    bogus = _stream("hostile-bogus-seq", ["a", "b", "c", "d"])
    bogus[1] = GatewayRecord(bogus[1].key, bogus[1].value, [(SEQ_HEADER, b"999999999999999999")])
    streams.append(bogus)
    return streams


def _renumber(records: list[GatewayRecord], start: int) -> list[GatewayRecord]:
    return [
        GatewayRecord(r.key, r.value, [(SEQ_HEADER, str(start + n).encode())]) for n, r in enumerate(records)
    ]


def hostile_singles(rng: random.Random) -> list[GatewayRecord]:
    """Single records that must each become a dead letter, whatever their size or bytes."""
    return [
        GatewayRecord(b"amp-control", b"\x01" * 150_000, []),
        GatewayRecord(b"amp-ascii", b"a" * 600_000, []),
        GatewayRecord(b"amp-random", rng.randbytes(900_000), []),
        GatewayRecord(b"k" * 200_000, b"{}", []),
        GatewayRecord(b"\xff\xfe-not-utf8", b"{}", []),
        GatewayRecord(b"future-invalid", b"{not json", []),
    ]


def barrage(
    rng: random.Random, now_ms: int
) -> tuple[list[Stamped], list[GatewayRecord], list[GatewayRecord]]:
    """The good records, the hostile ones, and all of them mixed with their timestamps: good
    completions one ms a record from ``now_ms``, a few hostile records 30 minutes ahead or an
    hour behind."""
    good, _ = recorded_records(repeat=2, shapes=SHAPES)
    hostile_records = [r for s in hostile_streams(rng) for r in s]
    singles = hostile_singles(rng)
    mixed: list[GatewayRecord] = list(good)
    for record in [*hostile_records, *singles]:
        mixed.insert(rng.randrange(len(mixed) + 1), record)
    _keep_stream_order(mixed, hostile_records)
    stamped: list[Stamped] = []
    for n, record in enumerate(mixed):
        ts = now_ms + n
        if record.key == b"future-invalid":
            ts = now_ms + 30 * MINUTE_MS
        elif record.key == b"amp-control":
            ts = now_ms - 60 * MINUTE_MS
        stamped.append((record, ts))
    # a chunk stamped 30 minutes ahead folds into its own completion only, which a [DONE] stamped
    # now then ends
    future_chunk = orjson.dumps(chunk(choice(0, content="from the future"), cid="future-chunk"))
    future = [GatewayRecord(b"future-chunk", future_chunk, []), GatewayRecord(b"future-chunk", b"[DONE]", [])]
    third = len(stamped) // 3
    stamped[third:third] = [(future[0], now_ms + 30 * MINUTE_MS), (future[1], now_ms + third)]
    return stamped, good, [*hostile_records, *singles, *future]


def _keep_stream_order(mixed: list[GatewayRecord], streams: list[GatewayRecord]) -> None:
    """Random insertion scrambled each hostile stream's order: put its records back in order at
    the places they took."""
    by_key: dict[bytes, list[GatewayRecord]] = {}
    for r in streams:
        by_key.setdefault(r.key, []).append(r)
    cursors = dict.fromkeys(by_key, 0)
    for i, r in enumerate(mixed):
        if r.key in by_key and any(r is s for s in by_key[r.key]):
            mixed[i] = by_key[r.key][cursors[r.key]]
            cursors[r.key] += 1


def offline(
    stamped: list[Stamped], settings: Settings
) -> tuple[dict[str, Any], dict[str, list[Any]], Counter[Any]]:
    """What the engine alone gives for the same records and timestamps (one partition, no
    faults): done records and events per completion, and the dead letters."""
    events, done, dead = offline_run(
        [r for r, _ in stamped],
        settings,
        timestamps=[ts for _, ts in stamped],
        clock=lambda: stamped[0][1] / 1000,
    )
    return done, events, Counter(_dead_identity(letter) for letter in dead)


def _dead_identity(letter: dict[str, Any]) -> tuple[Any, ...]:
    return (letter["key_b64"], letter["value_sha256"], letter["reason"])


async def publish_stamped(settings: Settings, stamped: list[Stamped]) -> None:
    await ensure_topics(settings.bootstrap_servers, [settings.input_topic], settings.partitions)
    producer = make_producer(settings.bootstrap_servers, enable_idempotence=True, max_request_size=2 << 20)
    await producer.start()
    try:
        for n, (r, ts) in enumerate(stamped):
            await producer.send(settings.input_topic, r.value, key=r.key, headers=r.headers, timestamp_ms=ts)
            if n % 200 == 0:
                await asyncio.sleep(0.01)
        await producer.flush()
    finally:
        await producer.stop()


@pytest.mark.parametrize(("driver", "guarantee"), COMBINATIONS)
def test_hostile_records_never_stop_the_worker(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str, guarantee: str
) -> None:
    rng = random.Random(23)
    now_ms = int(time.time() * 1000)
    stamped, good, hostile = barrage(rng, now_ms)
    settings = fresh_settings(kafka, driver=driver, processing_guarantee=guarantee)
    want_done, want_events, want_dead = offline(stamped, settings)
    clean_events, clean_done = offline_reference(good, settings)
    start_workers(settings, 1, tmp_path, workers)
    pid = workers[0].proc.pid if workers[0].proc else None
    asyncio.run(publish_stamped(settings, stamped))
    got = collect(
        settings,
        lambda c: (
            len({k for k, _, _ in c.done}) >= len(want_done) and len(c.deadletters) >= sum(want_dead.values())
        ),
        timeout=240,
    )

    assert workers[0].alive and workers[0].proc is not None and workers[0].proc.pid == pid, workers[
        0
    ].log_tail()
    # Good completions are exactly what the good streams alone give.
    done, events = got.done_by_id(), got.events_by_id()
    for completion_id, want in clean_done.items():
        assert {k: done[completion_id][k] for k in TIMING_FREE} == {k: want[k] for k in TIMING_FREE}, (
            completion_id
        )
        assert events[completion_id] == clean_events[completion_id], completion_id
    # Every completion, hostile ones included, is byte for byte what the engine alone gives for
    # the same records and timestamps: none lost, none extra.
    assert set(done) == set(want_done), sorted(set(want_done) ^ set(done))[:5]
    assert done == want_done
    assert events == want_events
    # Every hostile record that did not fold is dead-lettered once, identified by key and hash,
    # and only hostile records are.
    assert Counter(_dead_identity(d) for d in got.deadletters) == want_dead
    hostile_hashes = {hashlib.sha256(r.value).hexdigest() for r in hostile}
    assert {d["value_sha256"] for d in got.deadletters} <= hostile_hashes
    # Every output record fits its topic.
    for topic, largest in got.largest.items():
        assert largest <= settings.max_message_bytes - fit.RECORD_OVERHEAD_BYTES, (topic, largest)
    statuses = Counter(done[c]["status"] for c in want_done if c not in clean_done)
    write_report(
        f"hostile records ({driver}, {guarantee})",
        completions=len(want_done),
        hostile_records=len(hostile),
        dead_lettered=len(got.deadletters),
        dead_letter_reasons=dict(Counter(d["reason"] for d in got.deadletters)),
        hostile_completion_statuses=dict(statuses),
        truncated_outputs=sum(1 for v in done.values() if v.get("truncated")),
        largest_output_bytes=max(got.largest.values()),
        lost=len(want_done) - len(done),
        worker_restarts=0,
    )
