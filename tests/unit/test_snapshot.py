"""Snapshots of completions while they stream: what ``completion-done`` would carry if the worker
closed the completion now, taken without changing anything; and ``events_from``, the
events-topic position a resuming reader starts at, kept with the state."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from chunkfold.config import Settings
from chunkfold.core import codec, engine
from chunkfold.core.persist import Cursor, flush_writes, restore
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.core.state import (
    STATE_VERSION,
    ClosedCompletion,
    CompletionState,
    decode_state,
    encode_state,
    state_to_dict,
)
from chunkfold.gateway import GatewayRecord
from chunkfold.processor import Processor
from chunkfold.state.memory import MemoryStore
from chunkfold_schemas import generate
from chunkfold_schemas.snapshot import IN_PROGRESS, parse_snapshot
from tests.harness import feed
from tests.shapes import gateway_records
from tests.streams import USAGE, choice, chunk

pytestmark = pytest.mark.unit

CID = "chatcmpl-snap"
SEEDS = range(40)
"""Streams that together carry every shape the engine accumulates (``test_restore_exact``)."""
BASE_MS = 1_700_000_000_000
SCHEMA = Draft202012Validator(json.loads((generate.JSON_DIR / "completion-snapshot.json").read_text()))
DONE_FIELDS = ("completion", "error", "usage", "request", "timing", "anomalies", "chunk_count", "event_count")
EVENTS_PARTITION = 2


def new_processor(store: MemoryStore | None = None, **kwargs: Any) -> Processor:
    processor = Processor(Settings(partitions=1), store if store is not None else MemoryStore(), **kwargs)
    processor.assign([0])
    return processor


def observable(processor: Processor) -> tuple[Any, ...]:
    """Everything a snapshot must leave as it was: the states held (as bytes), what is dirty,
    the cursors and every series the processor exports."""
    return (
        {cid: (encode_state(t.state), t.dirty, repr(t.cursor)) for cid, t in processor.tracked.items()},
        list(processor.dirty),
        processor.metric_families(),
    )


def cuts(seed: int) -> Iterator[tuple[int, Processor, list[bytes]]]:
    """The stream of ``seed`` cut after each record (and before the first): ``k``, the processor
    that has folded records 0..k-1, and the done records it published."""
    processor = new_processor()
    done: list[bytes] = []
    yield 0, processor, done
    for k, outputs in enumerate(feed(processor, gateway_records(seed, CID), base_ms=BASE_MS), start=1):
        done += [o.value for o in outputs if o.topic == processor.settings.done_topic]
        yield k, processor, done


def check_valid(snapshot: dict[str, Any]) -> None:
    """Valid against the generated JSON Schema and the pydantic model, as served (JSON)."""
    assert [error.message for error in SCHEMA.iter_errors(snapshot)] == []
    assert parse_snapshot(codec.dumps(snapshot)).completion_id == snapshot["completion_id"]


def expired_copy(state: CompletionState) -> tuple[CompletionState, dict[str, Any]]:
    """A copy of ``state`` closed by expiry, and the done record that published (plain JSON)."""
    closed = copy.deepcopy(state)
    result = engine.expire(closed, BASE_MS + 10**9)
    assert result.done is not None
    return closed, codec.plain(result.done)


# -- snapshots of every shape, at every cut ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_a_snapshot_at_every_cut_is_the_done_record_an_expiry_would_publish(seed: int) -> None:
    open_cuts = closed_cuts = 0
    for k, processor, done in cuts(seed):
        before = observable(processor)
        snapshot = processor.snapshot(CID)
        assert observable(processor) == before, f"cut {k}: the snapshot changed the processor"
        tracked = processor.tracked.get(CID)
        if tracked is None:
            assert (k, snapshot) == (0, None)
            continue
        assert snapshot is not None
        check_valid(snapshot)
        state = tracked.state
        assert snapshot["input"] == {"partition": 0, "last_offset": state.last_offset}
        if isinstance(state, CompletionState):
            open_cuts += 1
            _, want = expired_copy(state)
            assert {f: snapshot[f] for f in DONE_FIELDS} == {f: want[f] for f in DONE_FIELDS}, f"cut {k}"
            assert snapshot["status"] == IN_PROGRESS
            assert snapshot["last_seq"] == (state.event_seq - 1 if state.event_seq else None)
            assert snapshot["events_from"] is None  # no events partition given
        else:
            closed_cuts += 1
            (final,) = [orjson.loads(value) for value in done]
            assert snapshot == {
                "version": 1,
                "completion_id": CID,
                "status": final["status"],
                "completion": None,
                "error": None,
                "usage": None,
                "request": None,
                "last_seq": final["event_count"] - 1 if final["event_count"] else None,
                "event_count": final["event_count"],
                "chunk_count": None,
                "timing": None,
                "anomalies": None,
                "input": {"partition": 0, "last_offset": state.last_offset},
                "events_from": None,
            }
    assert open_cuts and closed_cuts


def test_a_snapshot_gives_back_the_validation_budget_its_parse_spent() -> None:
    """Validating output that does not match the request's schema spends from the completion's
    budget (kept in its state): a snapshot spends it, as an expiry would, and gives it back."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "W", "schema": schema, "strict": True}}
    request = {"model": "gpt-4o", "messages": [], "response_format": response_format}
    invalid = chunk(choice(0, role="assistant", content='{"city": 1}', finish_reason="stop"), cid=CID)
    processor = new_processor()
    list(feed(processor, [record(request, "request"), record(invalid)], base_ms=BASE_MS))
    state = processor.tracked[CID].state
    assert isinstance(state, CompletionState)
    spent = state.counters.validation_steps
    closed, want = expired_copy(state)
    assert closed.counters.validation_steps > spent, "the expiry's parse spent from the budget"
    before = encode_state(state)
    snapshot = processor.snapshot(CID)
    assert encode_state(state) == before
    assert snapshot is not None and snapshot["completion"] == want["completion"]
    assert snapshot["completion"]["choices"][0]["message"]["parsed"] is None
    assert (snapshot["status"], snapshot["error"]) == (IN_PROGRESS, want["error"])


def test_a_snapshot_shares_no_object_with_the_state() -> None:
    """The engine changes some of its objects in place (annotations, unknown delta fields):
    a snapshot taken earlier must not change with them."""
    records = [
        record(chunk(choice(0, role="assistant", content="a", annotations=[{"type": "x"}]), cid=CID)),
        record(chunk(choice(0, content="b", annotations=[{"type": "y"}]), cid=CID)),
    ]
    processor = new_processor()
    list(feed(processor, records[:1], base_ms=BASE_MS))
    first = processor.snapshot(CID)
    assert first is not None
    frozen = codec.dumps(first)
    list(feed(processor, records[1:], 1, base_ms=BASE_MS))
    assert codec.dumps(first) == frozen
    later = processor.snapshot(CID)
    assert later is not None and later["completion"] != first["completion"]


# -- which completions a processor answers for ----------------------------------------------------


def record(payload: dict[str, Any] | None, kind: str = "chunk", seq: int | None = None) -> GatewayRecord:
    headers = [(KIND_HEADER, kind.encode())]
    if seq is not None:
        headers.append((SEQ_HEADER, str(seq).encode()))
    value = b"[DONE]" if kind == "done" else codec.dumps(payload)
    return GatewayRecord(CID.encode(), value, headers)


REQUEST = record({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "request")
FIRST = record(chunk(choice(0, role="assistant", content="Hel"), cid=CID))
SECOND = record(chunk(choice(0, content="lo"), cid=CID))
LAST = record(chunk(choice(0, content="!", finish_reason="stop"), usage=USAGE, cid=CID))
DONE = record(None, "done")


def test_no_snapshot_for_an_unknown_completion_or_one_of_a_partition_not_assigned() -> None:
    store = MemoryStore()
    processor = new_processor(store)
    list(feed(processor, [FIRST, SECOND], base_ms=BASE_MS))
    processor.apply(processor.capture())
    assert processor.snapshot("chatcmpl-other") is None
    assert processor.snapshot("chatcmpl-other", committed=True) is None
    assert processor.snapshot(CID) is not None
    processor.revoke([0])
    assert processor.snapshot(CID) is None
    assert processor.snapshot(CID, committed=True) is None, "stored, but of a partition not assigned"
    elsewhere = Processor(Settings(partitions=2), store)
    elsewhere.assign([1])
    assert elsewhere.snapshot(CID, committed=True) is None


def test_a_committed_snapshot_reflects_only_what_was_written_and_keeps_nothing() -> None:
    store = MemoryStore()
    processor = new_processor(store)
    list(feed(processor, [REQUEST, FIRST], base_ms=BASE_MS))
    assert processor.snapshot(CID, committed=True) is None, "nothing written yet"
    processor.apply(processor.capture())
    list(feed(processor, [SECOND], 2, base_ms=BASE_MS))
    live, committed = processor.snapshot(CID), processor.snapshot(CID, committed=True)
    assert live is not None and committed is not None
    assert (live["chunk_count"], committed["chunk_count"]) == (2, 1)
    assert committed["completion"]["choices"][0]["message"]["content"] == "Hel"
    assert committed["input"] == {"partition": 0, "last_offset": 1}
    assert committed["request"] == orjson.loads(REQUEST.value)

    # a worker that has taken the partition over but not loaded it: decoded, not kept
    fresh = new_processor(store)
    before = observable(fresh)
    assert fresh.snapshot(CID, committed=True) == committed
    assert observable(fresh) == before and fresh.tracked == {}
    assert fresh.snapshot(CID) is None, "not in memory"

    outputs = [o for out in feed(processor, [LAST, DONE], 3, base_ms=BASE_MS) for o in out]
    (done,) = [orjson.loads(o.value) for o in outputs if o.topic == processor.settings.done_topic]
    assert processor.snapshot(CID, committed=True) == committed, "the tombstone is not written yet"
    processor.apply(processor.capture())
    ended = processor.snapshot(CID, committed=True)
    assert ended is not None and ended == processor.snapshot(CID)
    assert (ended["status"], ended["event_count"], ended["completion"]) == (
        "completed",
        done["event_count"],
        None,
    )


# -- events_from ----------------------------------------------------------------------------------


def test_events_from_is_the_events_position_known_when_the_first_events_were_produced() -> None:
    keys: list[bytes] = []

    def events_partition(key: bytes) -> int:
        keys.append(key)
        return EVENTS_PARTITION

    store = MemoryStore()
    processor = new_processor(store, events_partition=events_partition)
    processor.note_events_position(EVENTS_PARTITION, 40)
    processor.note_events_position(EVENTS_PARTITION, 35)  # a late delivery report: the max is kept
    processor.note_events_position(EVENTS_PARTITION + 1, 99)
    list(feed(processor, [REQUEST], base_ms=BASE_MS))
    snapshot = processor.snapshot(CID)
    assert snapshot is not None and (snapshot["events_from"], snapshot["event_count"]) == (None, 0)
    assert keys == [], "a record without events stamps nothing"

    list(feed(processor, [FIRST], 1, base_ms=BASE_MS))
    assert keys == [CID.encode()]
    snapshot = processor.snapshot(CID)
    assert snapshot is not None and snapshot["events_from"] == 40 and snapshot["event_count"] > 0

    processor.note_events_position(EVENTS_PARTITION, 70)
    list(feed(processor, [SECOND], 2, base_ms=BASE_MS))
    assert keys == [CID.encode()], "stamped once"
    processor.apply(processor.capture())

    # restored from the store (the compact head) by a worker that takes the partition over
    fresh = new_processor(store, events_partition=events_partition)
    assert fresh.scan() == 1
    restored = fresh.snapshot(CID)
    assert restored is not None and restored["events_from"] == 40
    assert fresh.snapshot(CID, committed=True) == restored == processor.snapshot(CID)

    list(feed(fresh, [LAST, DONE], 3, base_ms=BASE_MS))
    fresh.apply(fresh.capture())
    tombstone = fresh.snapshot(CID, committed=True)
    assert tombstone is not None and tombstone["status"] == "completed"
    assert tombstone["events_from"] == 40 and tombstone["event_count"] == 4  # three deltas, content.done
    check_valid(tombstone)


def test_events_from_when_no_position_is_known_or_kept() -> None:
    unknown = new_processor(events_partition=lambda key: EVENTS_PARTITION)
    unknown.note_events_position(EVENTS_PARTITION + 1, 10)
    ignored = new_processor()
    ignored.note_events_position(EVENTS_PARTITION, 10)
    for processor in (unknown, ignored):
        list(feed(processor, [FIRST, SECOND], base_ms=BASE_MS))
        snapshot = processor.snapshot(CID)
        assert snapshot is not None and snapshot["event_count"] > 0 and snapshot["events_from"] is None


# -- state v6 -------------------------------------------------------------------------------------


def open_state(events_from: int | None) -> CompletionState:
    processor = new_processor(events_partition=lambda key: EVENTS_PARTITION)
    if events_from is not None:
        processor.note_events_position(EVENTS_PARTITION, events_from)
    list(feed(processor, [REQUEST, FIRST, SECOND], base_ms=BASE_MS))
    state = processor.tracked[CID].state
    assert isinstance(state, CompletionState)
    return state


def stored_and_restored(state: CompletionState | ClosedCompletion) -> CompletionState | ClosedCompletion:
    store: dict[str, bytes] = {}
    for key, value in flush_writes(state, Cursor(), 0):
        assert value is not None
        store[key] = value
    restored = restore(state.completion_id, store.get)
    assert restored is not None
    return restored.state


def test_state_v6_keeps_events_from_and_the_event_count_in_both_forms() -> None:
    assert STATE_VERSION == 6
    state = open_state(events_from=12)
    tombstone = engine.expire(copy.deepcopy(state), BASE_MS)
    assert isinstance(tombstone.state, ClosedCompletion)
    assert (tombstone.state.events_from, tombstone.state.event_count) == (12, state.event_seq)
    for kept in (state, tombstone.state):
        assert decode_state(encode_state(kept)) == kept
        assert stored_and_restored(kept) == kept
        assert state_to_dict(kept, compact=True)["events_from"] == 12


def test_a_none_events_from_costs_no_bytes() -> None:
    state = open_state(events_from=None)
    assert state.events_from is None
    assert b"events_from" not in encode_state(state)
    tombstone = engine.expire(state, BASE_MS).state
    assert isinstance(tombstone, ClosedCompletion)
    data = encode_state(tombstone)
    assert b"events_from" not in data and f'"event_count":{tombstone.event_count}'.encode() in data


def test_version_5_states_still_read() -> None:
    state = open_state(events_from=None)
    v5 = {**orjson.loads(encode_state(state)), "v": 5}
    restored = decode_state(orjson.dumps(v5))
    assert restored == state and isinstance(restored, CompletionState) and restored.events_from is None

    tombstone = engine.expire(copy.deepcopy(state), BASE_MS).state
    assert tombstone is not None
    v5_tombstone = {**orjson.loads(encode_state(tombstone)), "v": 5}
    del v5_tombstone["event_count"]
    old = decode_state(orjson.dumps(v5_tombstone))
    assert isinstance(old, ClosedCompletion) and (old.events_from, old.event_count) == (None, None)

    # as a worker finds them in its store: segments and a tombstone written by v5
    store = MemoryStore()
    processor = new_processor(store)
    list(feed(processor, [REQUEST, FIRST], base_ms=BASE_MS))
    processor.apply(processor.capture())
    for key, value in list(store.data.items()):
        store.put(key, value.replace(f'"v":{STATE_VERSION}'.encode(), b'"v":5'))
    store.put("chatcmpl-v5-done", orjson.dumps({**v5_tombstone, "id": "chatcmpl-v5-done", "p": 0}))
    fresh = new_processor(store)
    assert fresh.scan() == 2
    assert fresh.snapshot(CID) == processor.snapshot(CID)
    ended = fresh.snapshot("chatcmpl-v5-done")
    assert ended is not None
    check_valid(ended)
    assert (ended["status"], ended["event_count"], ended["last_seq"]) == ("expired", None, None)
