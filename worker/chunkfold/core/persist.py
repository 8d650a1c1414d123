"""Write-behind persistence of completion state as an append-only log of small records.

An open completion is stored as segments ``<key>\\x1f0``, ``<key>\\x1f1`` ...: segment ``n``
holds what changed since segment ``n-1``: the bytes appended to each text buffer, the fields
of the state that changed (usually a few positions and counters), and the request context
once. A finished completion is a small tombstone under ``<key>`` that recognises late and
replayed records; its segments are deleted.

So a completion costs its text once plus a few dozen bytes per flush, one write per
completion per flush, and a flush costs O(what changed), never O(the whole snapshot).

Keys. ``<key>`` is the completion id with two characters escaped, so that any id (with
``\\x1f``, NUL, any code point, any length) has keys of its own and ``completion_of``
inverts them exactly: the separator ``\\x1f`` is written ``\\x10s`` and the escape character
``\\x10`` (DLE) is doubled. Every other id is its own key, unchanged from the releases that
joined keys unescaped, so their stored state still restores. (Keys those releases wrote for an
id containing ``\\x1f`` were ambiguous, and for one containing ``\\x10`` they now belong to
another id: such a completion starts afresh; its old entries either do not parse or hold
another id than the one they are read for, and ``restore`` refuses them as ``CorruptState``.)

The cursor remembers each field of the head as the JSON bytes last written, never the state's
own objects: the engine goes on changing some of those in place (``message_extra``:
``function_call``, ``audio``, annotations, unknown delta fields; a tool call's extra fields),
and a head that shared them would see no change to write. Comparing bytes also tells ``1``
from ``1.0`` and one key order from another, which ``==`` does not but the outputs do. A flush
serializes each field of the head once (text buffers are only lengths there, as before).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from chunkfold.core import codec
from chunkfold.core.state import (
    AnyState,
    ClosedCompletion,
    StateVersionError,
    state_from_dict,
    state_to_dict,
)

SEGMENT_SEPARATOR = "\x1f"
KEY_ESCAPE = "\x10"
_ESCAPED_SEPARATOR = KEY_ESCAPE + "s"
_ESCAPE_SEQUENCE = re.compile(f"{KEY_ESCAPE}(.?)", re.DOTALL)

SEGMENT_BYTES = 256 * 1024
"""The largest stored value: a changelog record is this plus its key (at most the 128 KiB of a
completion id, escaped), well within the 1 MiB most topics accept."""

Write = tuple[str, bytes | None]
"""A store write: ``(key, value)``; value None deletes the key."""


def tombstone_key(completion_id: str) -> str:
    """The key of a completion's tombstone, and the prefix of its segments' keys."""
    if KEY_ESCAPE not in completion_id and SEGMENT_SEPARATOR not in completion_id:
        return completion_id
    return completion_id.replace(KEY_ESCAPE, KEY_ESCAPE * 2).replace(SEGMENT_SEPARATOR, _ESCAPED_SEPARATOR)


def segment_key(completion_id: str, n: int) -> str:
    return f"{tombstone_key(completion_id)}{SEGMENT_SEPARATOR}{n}"


def completion_of(key: str) -> str:
    """The completion id a stored key belongs to; ``CorruptState`` for a key no completion
    has (an invalid escape, or a segment number that is not one)."""
    escaped, separator, n = key.partition(SEGMENT_SEPARATOR)
    if separator and not (n.isascii() and n.isdigit()):
        raise CorruptState(f"stored key {key[:80]!r}: segment number {n[:20]!r}")
    if KEY_ESCAPE not in escaped:
        return escaped
    return _ESCAPE_SEQUENCE.sub(lambda match: _unescape(match, key), escaped)


def _unescape(match: re.Match[str], key: str) -> str:
    code = match.group(1)
    if code == KEY_ESCAPE:
        return KEY_ESCAPE
    if code == "s":
        return SEGMENT_SEPARATOR
    raise CorruptState(f"stored key {key[:80]!r}: invalid escape {match.group(0)!r}")


class CorruptState(ValueError):
    """Stored entries that do not make up a completion's state (unparsable, inconsistent, or
    under a key no completion has)."""


@dataclass(slots=True)
class Cursor:
    """What has been persisted of one completion: segment count, buffer lengths, and every
    other field of the compact head as the JSON bytes last written (``head`` for the state,
    ``choice_heads`` per choice index): immutable, so a field the live state changes in place
    still differs from what was written, and comparing costs no copy of the state."""

    segments: int = 0
    lengths: dict[str, int] = field(default_factory=dict)
    request_written: bool = False
    head: dict[str, bytes] = field(default_factory=dict)
    choice_heads: dict[str, dict[str, bytes]] = field(default_factory=dict)


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


def _changed_fields(written: dict[str, bytes], fields: dict[str, Any]) -> dict[str, Any]:
    """The ``fields`` whose JSON differs from what ``written`` holds, as embedded JSON (each
    field serialized once); ``written`` is updated to them. Bytes, not ``==``: ``1`` and
    ``1.0``, or the same keys in another order, are different outputs."""
    changed: dict[str, Any] = {}
    for name, value in fields.items():
        encoded = codec.dumps(value)
        if written.get(name) != encoded:
            written[name] = encoded
            changed[name] = codec.embedded(encoded)
    return changed


def _encoded_fields(fields: dict[str, Any]) -> dict[str, bytes]:
    return {name: codec.dumps(value) for name, value in fields.items()}


def flush_writes(state: AnyState, cursor: Cursor, partition: int) -> list[Write]:
    """The store writes that persist ``state`` given what ``cursor`` says is stored; updates
    ``cursor``. An open completion: one segment with what changed (nothing when nothing did).
    A closed one: the tombstone under its key, then deletion of every segment."""
    completion_id = state.completion_id
    if isinstance(state, ClosedCompletion):
        tombstone = codec.dumps({**state_to_dict(state), "p": partition})
        writes: list[Write] = [(tombstone_key(completion_id), tombstone)]
        writes += [(segment_key(completion_id, n), None) for n in range(cursor.segments)]
        cursor.segments = 0
        cursor.lengths.clear()
        cursor.head = {}
        cursor.choice_heads = {}
        return writes
    writer = _SegmentWriter(cursor)
    head = state_to_dict(state, writer, compact=True)
    head["p"] = partition
    choices = head.pop("choices")
    segment: dict[str, Any] = {}
    top = _changed_fields(cursor.head, head)
    if top:
        segment["d"] = top
    changed = {}
    for choice in choices:
        index = str(choice["index"])
        delta = _changed_fields(cursor.choice_heads.setdefault(index, {}), choice)
        if delta:
            changed[index] = delta
    if changed:
        segment["c"] = changed
    if writer.appended:
        segment["b"] = writer.appended
    if state.request is not None and not cursor.request_written:
        segment["request"] = state.request
        cursor.request_written = True
    cursor.lengths = writer.lengths
    if not segment:
        return []
    writes = []
    for part in _parts(codec.dumps(segment)):
        writes.append((segment_key(completion_id, cursor.segments), part))
        cursor.segments += 1
    return writes


def _parts(data: bytes) -> list[bytes]:
    """A segment as stored: itself, or when over ``SEGMENT_BYTES`` (a flush can gather several
    large chunks, and a request context may be nearly as large as a record) its JSON text in
    pieces, each ``{"part": text}`` and the last ``{"part": text, "end": true}``, stored under
    consecutive segment numbers: every changelog record stays well within a topic's limit."""
    if len(data) <= SEGMENT_BYTES:
        return [data]
    text = data.decode("utf-8")
    parts: list[bytes] = []
    start, size = 0, SEGMENT_BYTES - 64
    while start < len(text):
        piece = codec.dumps({"part": text[start : start + size]})
        if len(piece) > SEGMENT_BYTES:
            size //= 2  # escapes doubled the piece: take less
            continue
        start += size
        parts.append(piece)
    parts[-1] = parts[-1][:-1] + b',"end":true}'
    return parts


def delete_writes(completion_id: str, cursor: Cursor | None) -> list[Write]:
    """Remove every trace of a completion (its tombstone expired)."""
    writes: list[Write] = [(tombstone_key(completion_id), None)]
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
    (``read(key)``), or None when nothing is stored for it.

    Raises ``StateVersionError`` for state of an unknown (newer) release and ``CorruptState``
    for anything else that does not read back (whatever the entries hold), so that a caller
    can skip one bad completion by catching those two."""
    try:
        restored = _restore(completion_id, read)
    except (CorruptState, StateVersionError):
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise CorruptState(f"stored state of {completion_id[:80]!r}: {type(exc).__name__}: {exc}") from exc
    if restored is not None:
        _check_restored(completion_id, restored)
    return restored


def _check_restored(completion_id: str, restored: Restored) -> None:
    if restored.state.completion_id != completion_id:
        raise CorruptState(
            f"stored state under the key of {completion_id[:80]!r} "
            f"belongs to {restored.state.completion_id[:80]!r}"
        )
    partition = restored.partition
    if partition is not None and (type(partition) is not int or partition < 0):
        raise CorruptState(f"stored state of {completion_id[:80]!r}: partition {partition!r}")


def _restore(completion_id: str, read: Callable[[str], bytes | None]) -> Restored | None:
    tombstone = read(tombstone_key(completion_id))
    if tombstone is not None:
        data = codec.loads(tombstone)
        return Restored(state_from_dict(data), Cursor(), data.get("p"))
    head: dict[str, Any] = {}
    choices: dict[str, dict[str, Any]] = {}
    buffers: dict[str, bytearray] = {}
    request = None
    n = 0
    pieces: list[str] = []
    while (raw := read(segment_key(completion_id, n))) is not None:
        n += 1
        segment = codec.loads(raw)
        if "part" in segment:
            pieces.append(segment["part"])
            if not segment.get("end"):
                continue
            segment, pieces = codec.loads("".join(pieces)), []
        head.update(segment.get("d", {}))
        for index, delta in segment.get("c", {}).items():
            choices.setdefault(index, {}).update(delta)
        request = segment.get("request", request)
        for buffer_id, text in segment.get("b", {}).items():
            buffers.setdefault(buffer_id, bytearray()).extend(text.encode("utf-8"))
    if n == 0:
        return None
    if pieces:
        raise CorruptState(f"stored state of {completion_id[:80]!r}: a segment's last part is missing")
    # the head as stored (not as the state would now write it: a state of an older version
    # is converted when read, and the next flush writes the fields that changed by it)
    cursor = Cursor(
        segments=n,
        request_written=request is not None,
        head=_encoded_fields(head),
        choice_heads={index: _encoded_fields(choice) for index, choice in choices.items()},
    )
    state = state_from_dict(
        {**head, "choices": list(choices.values())}, _SegmentReader(buffers, cursor.lengths), request=request
    )
    return Restored(state, cursor, head.get("p"))
