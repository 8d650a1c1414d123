"""Restore is exact: state written behind and read back at any point continues byte for byte.

The streams (``tests.shapes``) carry every field shape the engine accumulates. A run that
persists its state with ``flush_writes`` and replaces the live state with what ``restore``
reads back must publish exactly the bytes of an uninterrupted run: the live state is dropped
each time, so a field that reached the store incompletely (or not at all) shows in the outputs.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chunkfold.core import codec, engine
from chunkfold.core.persist import Cursor, flush_writes, restore
from chunkfold.core.records import InputRecord, InvalidRecord, decode_record
from chunkfold.core.state import AnyState
from tests.shapes import ShapeRecord, all_shapes_stream

pytestmark = pytest.mark.unit

CID = "chatcmpl-shapes"
PARTITION = 3
SETTINGS = settings(
    max_examples=int(os.environ.get("RESTORE_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
Store = dict[str, bytes]


def record_at(stream: list[ShapeRecord], offset: int, completion_id: str) -> InputRecord:
    """Record ``offset`` decoded from its bytes as the worker decodes it (fresh objects each
    time, as a redelivery would give)."""
    _, value, headers = stream[offset]
    key, record = decode_record(
        completion_id.encode(), value, headers, offset=offset, timestamp_ms=1_000_000 + 37 * offset
    )
    assert key == completion_id
    return record


def fold_published(
    state: AnyState | None, record: InputRecord, completion_id: str
) -> tuple[AnyState | None, list[bytes]]:
    """Fold one record; the new state and what the worker publishes for it (a rejected
    record leaves the state as it was and is dead-lettered)."""
    try:
        result = engine.fold(state, completion_id, record)
    except InvalidRecord as exc:
        return state, [f"deadletter {exc.reason}".encode()]
    published = [codec.dumps(event) for event in result.events]
    if result.done is not None:
        published.append(codec.dumps(result.done))
    return result.state, published


def uninterrupted(stream: list[ShapeRecord], completion_id: str = CID) -> list[bytes]:
    state: AnyState | None = None
    published: list[bytes] = []
    for offset in range(len(stream)):
        state, out = fold_published(state, record_at(stream, offset, completion_id), completion_id)
        published += out
    return published


def persist(state: AnyState | None, cursor: Cursor, store: Store) -> None:
    if state is None:
        return
    for key, value in flush_writes(state, cursor, PARTITION):
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value


def read_back(store: Store, completion_id: str) -> tuple[AnyState | None, Cursor]:
    """A fresh state and cursor from the store alone (the live ones are dropped)."""
    restored = restore(completion_id, store.get)
    if restored is None:
        return None, Cursor()
    assert restored.partition == PARTITION
    return restored.state, restored.cursor


def restored_after_every_record(stream: list[ShapeRecord], completion_id: str = CID) -> list[bytes]:
    state: AnyState | None = None
    cursor = Cursor()
    store: Store = {}
    published: list[bytes] = []
    for offset in range(len(stream)):
        state, out = fold_published(state, record_at(stream, offset, completion_id), completion_id)
        published += out
        persist(state, cursor, store)
        state, cursor = read_back(store, completion_id)
    return published


def crashing_after_every_record(stream: list[ShapeRecord], rng: random.Random) -> dict[bytes, bytes]:
    """Flush at random points; after every record, drop the live state, restore what the
    store holds and fold again the records it does not hold yet (a crash and the redelivery
    from the last committed offset). Returns what was published, by output identity; a
    repeated output must repeat the same bytes."""
    state: AnyState | None = None
    cursor = Cursor()
    store: Store = {}
    stored_up_to = 0
    published: dict[bytes, bytes] = {}
    for offset in range(len(stream)):
        for again in range(stored_up_to, offset + 1):
            state, out = fold_published(state, record_at(stream, again, CID), CID)
            for value in out:
                identity = _identity(value)
                assert published.setdefault(identity, value) == value, f"{identity!r} repeated differently"
        if rng.random() < 0.4:
            persist(state, cursor, store)
            stored_up_to = offset + 1
        state, cursor = read_back(store, CID)
    return published


def _identity(value: bytes) -> bytes:
    """Events by their seq, the done record as one."""
    if value.startswith(b"deadletter"):
        return value
    data = codec.loads(value)
    return b"done" if "completion_id" in data else str(data["seq"]).encode()


def by_identity(published: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for value in published:
        out.setdefault(_identity(value), value)
    return out


@SETTINGS
@given(st.integers(0, 2**32))
@example(seed=0)
def test_restoring_after_every_record_publishes_the_same_bytes(seed: int) -> None:
    stream = all_shapes_stream(seed, CID)
    assert restored_after_every_record(stream) == uninterrupted(stream)


@SETTINGS
@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_flushing_at_random_points_and_restoring_after_every_record_publishes_the_same_bytes(
    seed: int, crash_seed: int
) -> None:
    stream = all_shapes_stream(seed, CID)
    want = uninterrupted(stream)
    assert crashing_after_every_record(stream, random.Random(crash_seed)) == by_identity(want)


def test_the_generated_streams_cover_every_accumulated_field() -> None:
    """Over a few seeds the streams carry every shape the restore tests are meant to cover."""
    wanted = [
        b'"content":"',
        b'"refusal":"',
        b'"reasoning_content":',
        b'"reasoning":',
        b'"tool_calls":',
        b'"x_call":',
        b'"x_fn":',
        b'"function_call":',
        b'"audio":',
        b'"transcript":',
        b'"expires_at":60',
        b'"annotations":',
        b'"logprobs":{"content"',
        b'"logprobs":{"refusal"',
        b'"x_delta":',
        b'"x_count":',
        b'"x_obj":',
        b'"x_choice":',
        b'"x_chunk":',
        b'"moderation":',
        b'"choices":[]',
        b'"index":2',
        b'"response_format":',
        b'"strict":true',
        b'"finish_reason":"function_call"',
        b'"finish_reason":"length"',
        b"[DONE]",
        b"client_closed",
    ]
    blob = b"\n".join(value for seed in range(40) for _, value, _ in all_shapes_stream(seed, CID))
    assert [w for w in wanted if w not in blob] == []
    some = all_shapes_stream(1, CID)
    assert some == all_shapes_stream(1, CID), "a seed always gives the same bytes"
