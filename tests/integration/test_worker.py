"""The worker against a real Kafka broker: recorded streams, many completions over several
partitions with two workers, the replay equivalence, and dead letters."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord, capture_records
from chunkfold.replay import replay_kafka
from tests.harness import (
    TIMING_FREE,
    Collected,
    WorkerProcess,
    collect,
    done_count,
    fresh_settings,
    produce,
    recorded_records,
    start_workers,
)
from tests.recorded import recordings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("driver", ["direct", "faust"])
def test_recorded_streams_give_the_golden_completions_and_events(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str
) -> None:
    settings = fresh_settings(kafka, driver=driver)
    start_workers(settings, 1, tmp_path, workers)
    records, completions = recorded_records()
    produce(settings, records)
    got = collect(settings, done_count(completions))
    done, events = got.done_by_id(), got.events_by_id()
    assert len(got.done) == completions == 49
    assert got.deadletters == []
    for rec in recordings():
        golden = rec.golden
        completion_id = golden["final_completion"]["id"] if golden["final_completion"] else None
        completion_id = completion_id or next(iter(capture_records(rec.sse.read_text())))
        record = done[completion_id]
        if golden["outcome"] == "ok":
            assert record["status"] == "completed"
            assert record["completion"] == golden["final_completion"]
        else:
            assert record["status"] == "length"
            assert golden["stream_error"]["type"] == "LengthFinishReasonError"
        sdk_events = [e for step in golden["steps"] for e in step["events"] if e["type"] != "chunk"]
        got_events = events.get(completion_id, [])
        assert [e["type"] for e in got_events] == [e["type"] for e in sdk_events]
        for got_event, sdk_event in zip(got_events, sdk_events, strict=True):
            shared = {k: v for k, v in got_event.items() if k not in ("completion_id", "choice_index", "seq")}
            assert shared == {k: sdk_event[k] for k in shared}
        assert [e["seq"] for e in got_events] == list(range(len(sdk_events)))


def test_hundreds_of_interleaved_completions_two_workers(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    settings = fresh_settings(kafka, partitions=6)
    start_workers(settings, 2, tmp_path, workers)
    records, completions = recorded_records(repeat=6)
    produce(settings, records)
    got = collect(settings, done_count(completions), timeout=180)
    done = got.done_by_id()
    assert len(done) == completions == 294
    assert len(got.done) == completions, "each completion is finished exactly once"
    assert {d["status"] for d in done.values()} == {"completed", "length"}
    assert all(w.alive for w in workers)


def test_worker_output_equals_replay_kafka(kafka: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    settings = fresh_settings(kafka)
    start_workers(settings, 1, tmp_path, workers)
    records, completions = recorded_records()
    produce(settings, records)
    got = collect(settings, done_count(completions))
    events, done = got.events_by_id(), got.done_by_id()
    for rec in recordings():
        replayed = list(replay_kafka(rec.sse.read_text(), rec.request, Settings()))
        key = replayed[0]["key"]
        want_events = [r["value"] for r in replayed if r["topic"] == "completion-events"]
        want_done = next(r["value"] for r in replayed if r["topic"] == "completion-done")
        assert events.get(key, []) == want_events
        assert {k: done[key][k] for k in TIMING_FREE} == {k: want_done[k] for k in TIMING_FREE}
        assert done[key]["timing"]["first_chunk_at_ms"] is not None


BAD_VALUES: list[tuple[str, bytes, list[tuple[str, bytes]], str]] = [
    ("bad-json", b"{not json", [], "invalid_json"),
    ("bad-array", b"[1, 2, 3]", [], "not_an_object"),
    ("bad-type", orjson.dumps({"id": "bad-type", "choices": [{"index": "zero"}]}), [], "wrong_type"),
    ("bad-kind", b"{}", [("chunkfold.kind", b"mystery")], "unknown_kind"),
    (
        "bad-parts",
        orjson.dumps({"id": "bad-parts", "choices": [{"index": 0, "delta": {"content": [7]}}]}),
        [],
        "wrong_type",
    ),
    ("bad-utf8", b'{"id": "\xff\xfe"}', [], "invalid_json"),
    ("bad-seq", orjson.dumps({"id": "bad-seq", "choices": []}), [("chunkfold.seq", b"x1")], "invalid_seq"),
    ("bad-done", b"[DONE]", [], "unknown_completion"),
]


def test_bad_records_go_to_the_dead_letter_topic(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    settings = fresh_settings(kafka)
    start_workers(settings, 1, tmp_path, workers)
    good, completions = recorded_records()
    bad = [GatewayRecord(key.encode(), value, headers) for key, value, headers, _ in BAD_VALUES]
    bad.append(GatewayRecord(b"", b'{"id": ""}', []))
    mixed = good[: len(good) // 2] + bad + good[len(good) // 2 :]
    produce(settings, mixed)
    got = collect(settings, lambda c: done_count(completions)(c) and len(c.deadletters) >= len(bad))
    reasons = {d["key"]: d["reason"] for d in got.deadletters}
    for key, value, _, reason in BAD_VALUES:
        assert reasons[key] == reason
        letter = next(d for d in got.deadletters if d["key"] == key)
        assert base64.b64decode(letter["value_b64"]) == value
    assert reasons[""] == "missing_key"
    assert len(got.done_by_id()) == completions
    assert all(d["status"] in ("completed", "length") for d in got.done_by_id().values())
    assert isinstance(got, Collected)
