"""No record can stop the worker or change another completion: unexpected failures are contained
in the record's own completion, and stream time moves only for records that fold."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from chunkfold import processor as processor_module
from chunkfold.config import Settings
from chunkfold.core import engine
from chunkfold.core.records import InputRecord
from chunkfold.processor import Output, Processor
from chunkfold.state.memory import MemoryStore
from chunkfold_schemas.deadletter import parse_deadletter
from chunkfold_schemas.done import parse_done
from tests.streams import USAGE, choice, chunk

pytestmark = pytest.mark.unit
NOW_MS = 1_800_000_000_000
MINUTE_MS = 60_000


Record = tuple[bytes, bytes, int]


def stream(cid: str, words: list[str]) -> list[Record]:
    """A completion's records with their timestamps (one ms apart)."""
    key = cid.encode()
    values = [orjson.dumps(chunk(choice(0, role="assistant", content=""), cid=cid))]
    values += [orjson.dumps(chunk(choice(0, content=w), cid=cid)) for w in words]
    values += [
        orjson.dumps(chunk(choice(0, finish_reason="stop"), cid=cid)),
        orjson.dumps(chunk(usage=USAGE, cid=cid)),
    ]
    values.append(b"[DONE]")
    return [(key, v, NOW_MS + n) for n, v in enumerate(values)]


def interleave(*streams: list[Record]) -> list[Record]:
    out: list[Record] = []
    for n in range(max(len(s) for s in streams)):
        out += [s[n] for s in streams if n < len(s)]
    return out


class Feeder:
    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.offset = 0
        self.out: list[Output] = []

    def feed(self, key: bytes, value: bytes, ts: int) -> list[Output]:
        got, _ = self.processor.process(
            partition=0, offset=self.offset, key=key, value=value, headers=None, timestamp_ms=ts, handle=None
        )
        self.offset += 1
        self.out += got
        return got

    def outputs_of(self, cid: str) -> list[bytes]:
        return [o.value for o in self.out if o.key == cid.encode() and o.topic != "completion-deadletter"]


def make(fold: Any = engine.fold, clock_ms: int = NOW_MS) -> Feeder:
    processor = Processor(Settings(partitions=1), MemoryStore(), clock=lambda: clock_ms / 1000, fold=fold)
    processor.assign([0])
    return Feeder(processor)


def clean_run(records: list[Record], cid: str) -> list[bytes]:
    feeder = make()
    for record in records:
        feeder.feed(*record)
    return feeder.outputs_of(cid)


def test_a_fold_that_raises_fails_its_own_completion_only() -> None:
    victim, bystander = stream("victim", ["a", "b", "c"]), stream("bystander", ["x", "y", "z"])
    calls = {"n": 0}

    def faulty_fold(
        state: Any, cid: str, record: InputRecord, options: engine.FoldOptions
    ) -> engine.FoldResult:
        if cid == "victim":
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected fault")
        return engine.fold(state, cid, record, options)

    feeder = make(faulty_fold)
    for record in interleave(victim, bystander):
        feeder.feed(*record)  # never raises
    dead = [parse_deadletter(o.value) for o in feeder.out if o.topic == "completion-deadletter"]
    assert next(d.reason for d in dead if d.key == "victim") == "internal_error"
    assert "RuntimeError: injected fault" in dead[0].detail
    assert {d.reason for d in dead[1:]} == {"after_end"}  # the victim's later records: it ended
    [done] = [parse_done(o.value) for o in feeder.out if o.topic == "completion-done" and o.key == b"victim"]
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "InternalError" and "injected fault" in done.error.message
    assert feeder.outputs_of("bystander") == clean_run(bystander, "bystander")
    assert feeder.processor.stats.deadletters["internal_error"] == 1


def test_a_decoder_that_raises_dead_letters_the_record_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    real = processor_module.decode_record

    def faulty_decode(key: bytes | None, value: bytes | None, *args: Any, **kwargs: Any) -> Any:
        if value == b"boom":
            raise MemoryError("injected")
        return real(key, value, *args, **kwargs)

    monkeypatch.setattr(processor_module, "decode_record", faulty_decode)
    records = stream("calm", ["a", "b"])
    feeder = make()
    for record in [*records[:2], (b"calm", b"boom", NOW_MS + 1), *records[2:]]:
        feeder.feed(*record)
    [dead] = [parse_deadletter(o.value) for o in feeder.out if o.topic == "completion-deadletter"]
    assert dead.reason == "internal_error" and dead.detail.startswith("MemoryError")
    # nothing of the record was folded: its completion goes on as if it had not been there
    assert feeder.outputs_of("calm") == clean_run(records, "calm")


def test_a_record_stamped_far_ahead_does_not_expire_other_completions() -> None:
    feeder = make()
    victim = stream("victim", ["a", "b", "c"])
    for record in victim[:3]:
        feeder.feed(*record)
    # invalid JSON under another key, and a valid chunk of another completion, both 30 min ahead
    feeder.feed(b"other", b"not json", NOW_MS + 30 * MINUTE_MS)
    feeder.feed(b"ahead", orjson.dumps(chunk(choice(0, content="hi"), cid="ahead")), NOW_MS + 30 * MINUTE_MS)
    assert feeder.processor.stream_time[0] <= NOW_MS + 10_000  # at most the skew allowance ahead
    assert feeder.processor.sweep(NOW_MS + 5) == []
    for record in victim[3:]:
        feeder.feed(*record)
    dead = [parse_deadletter(o.value) for o in feeder.out if o.topic == "completion-deadletter"]
    assert [d.reason for d in dead] == ["invalid_json"]
    [done] = [parse_done(v) for v in feeder.outputs_of("victim") if b'"status"' in v]
    assert done.status == "completed"


def test_stream_time_moves_only_for_records_that_fold() -> None:
    feeder = make()
    feeder.feed(b"a", orjson.dumps(chunk(choice(0, content="x"), cid="a")), NOW_MS - 5)
    feeder.feed(b"b", b"{broken", NOW_MS)
    assert feeder.processor.stream_time[0] == NOW_MS - 5


def test_a_completion_that_cannot_be_expired_ends_failed_and_the_sweep_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feeder = make()
    for record in [*stream("broken", ["a"])[:2], *stream("fine", ["b"])[:2]]:
        feeder.feed(*record)
    real_expire = engine.expire

    def faulty_expire(state: Any, now_ms: int | None) -> engine.FoldResult:
        if state.completion_id == "broken":
            raise KeyError("injected")
        return real_expire(state, now_ms)

    monkeypatch.setattr(engine, "expire", faulty_expire)
    out = feeder.processor.sweep(NOW_MS + 3_600_000)
    statuses = {o.key: parse_done(o.value).status for o in out if o.topic == "completion-done"}
    assert statuses == {b"broken": "failed", b"fine": "expired"}
