"""Write-behind persistence of completion state as an append-only log of small records.

An open completion is stored as segments ``<id>\\x1f0``, ``<id>\\x1f1`` ...: segment ``n``
holds what changed since segment ``n-1``: the bytes appended to each text buffer, the fields
of the state that changed (usually a few positions and counters), and the request context
once. A finished completion is a small tombstone under ``<id>`` that recognises late and
replayed records; its segments are deleted.

So a completion costs its text once plus a few dozen bytes per flush, one write per
completion per flush, and a flush costs O(what changed), never O(the whole snapshot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from worker.core import codec
from worker.core.state import AnyState, ClosedCompletion, state_from_dict, state_to_dict

SEGMENT_SEPARATOR = "\x1f"

Write = tuple[str, bytes | None]
"""A store write: ``(key, value)``; value None deletes the key."""


def segment_key(completion_id: str, n: int) -> str:
    return f"{completion_id}{SEGMENT_SEPARATOR}{n}"


def completion_of(key: str) -> str:
    """The completion id a stored key belongs to."""
    return key.split(SEGMENT_SEPARATOR, 1)[0]


class CorruptState(ValueError):
    """Stored segments do not add up to what the head says."""


@dataclass(slots=True)
class Cursor:
    """What has been persisted of one completion: segment count and buffer lengths."""

    segments: int = 0
    lengths: dict[str, int] = field(default_factory=dict)
    request_written: bool = False
    head: dict[str, Any] = field(default_factory=dict)


class _SegmentWriter:
    """Records what each buffer gained since the cursor; the head keeps only lengths."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self.appended: dict[str, str] = {}
        self.lengths: dict[str, int] = {}

    def dump(self, buffer_id: str, buf: bytearray | None) -> Any:
        if buf is None:
            return None
        size = len(buf)
        done = self.cursor.lengths.get(buffer_id, 0)
        if size > done:
            self.appended[buffer_id] = buf[done:].decode("utf-8")
        self.lengths[buffer_id] = size
        return size

    def load(self, buffer_id: str, value: Any) -> bytearray | None:
        raise NotImplementedError


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in new.items() if old.get(k, _MISSING) != v}


_MISSING = object()


def flush_writes(state: AnyState, cursor: Cursor, partition: int) -> list[Write]:
    """The store writes that persist ``state`` given what ``cursor`` says is stored; updates
    ``cursor``. An open completion: one segment with what changed (nothing when nothing did).
    A closed one: the tombstone under its id, then deletion of every segment."""
    completion_id = state.completion_id
    if isinstance(state, ClosedCompletion):
        writes: list[Write] = [(completion_id, codec.dumps({**state_to_dict(state), "p": partition}))]
        writes += [(segment_key(completion_id, n), None) for n in range(cursor.segments)]
        cursor.segments = 0
        cursor.lengths.clear()
        cursor.head = {}
        return writes
    writer = _SegmentWriter(cursor)
    head = state_to_dict(state, writer, compact=True)
    head["p"] = partition
    choices = {str(c["index"]): c for c in head.pop("choices")}
    old_choices = cursor.head.get("choices", {})
    segment: dict[str, Any] = {}
    top = _diff(cursor.head, head)
    if top:
        segment["d"] = top
    changed = {i: _diff(old_choices.get(i, {}), c) for i, c in choices.items()}
    changed = {i: d for i, d in changed.items() if d}
    if changed:
        segment["c"] = changed
    if writer.appended:
        segment["b"] = writer.appended
    if state.request is not None and not cursor.request_written:
        segment["request"] = state.request
        cursor.request_written = True
    cursor.lengths = writer.lengths
    head["choices"] = choices
    cursor.head = head
    if not segment:
        return []
    cursor.segments += 1
    return [(segment_key(completion_id, cursor.segments - 1), codec.dumps(segment))]


def delete_writes(completion_id: str, cursor: Cursor | None) -> list[Write]:
    """Remove every trace of a completion (its tombstone expired)."""
    writes: list[Write] = [(completion_id, None)]
    if cursor is not None:
        writes += [(segment_key(completion_id, n), None) for n in range(cursor.segments)]
    return writes


class _SegmentReader:
    def __init__(self, buffers: dict[str, bytearray], lengths: dict[str, int]) -> None:
        self.buffers = buffers
        self.lengths = lengths

    def dump(self, buffer_id: str, buf: bytearray | None) -> Any:
        raise NotImplementedError

    def load(self, buffer_id: str, value: Any) -> bytearray | None:
        if value is None:
            return None
        buf = self.buffers.get(buffer_id, bytearray())
        if len(buf) != value:
            raise CorruptState(f"buffer {buffer_id}: segments hold {len(buf)} bytes, head says {value}")
        self.lengths[buffer_id] = value
        return buf


class Restored(NamedTuple):
    state: AnyState
    cursor: Cursor
    partition: int | None


def restore(completion_id: str, read: Callable[[str], bytes | None]) -> Restored | None:
    """Rebuild a completion's state, cursor and input partition from the store
    (``read(key)``), or None when nothing is stored for it."""
    tombstone = read(completion_id)
    if tombstone is not None:
        data = codec.loads(tombstone)
        return Restored(state_from_dict(data), Cursor(), data.get("p"))
    head: dict[str, Any] = {}
    choices: dict[str, dict[str, Any]] = {}
    buffers: dict[str, bytearray] = {}
    request = None
    n = 0
    while (raw := read(segment_key(completion_id, n))) is not None:
        segment = codec.loads(raw)
        head.update(segment.get("d", {}))
        for index, delta in segment.get("c", {}).items():
            choices.setdefault(index, {}).update(delta)
        request = segment.get("request", request)
        for buffer_id, text in segment.get("b", {}).items():
            buffers.setdefault(buffer_id, bytearray()).extend(text.encode("utf-8"))
        n += 1
    if n == 0:
        return None
    cursor = Cursor(segments=n, request_written=request is not None)
    state = state_from_dict(
        {**head, "choices": list(choices.values())}, _SegmentReader(buffers, cursor.lengths), request=request
    )
    cursor.head = {**head, "choices": choices}
    return Restored(state, cursor, head.get("p"))
