"""Reading captured streams: SSE text (``data:`` events) or JSON Lines, into framed records.

SSE follows the WHATWG event-stream rules (CR, LF and CRLF line ends, ``:`` comments,
multi-line ``data``, a BOM at the start), including the end of input: an event is dispatched
only by the blank line after it, so a last event the input ends without terminating is
discarded, as the spec and openai-python do. Those bytes may be an event cut mid-write, and
``--format sdk`` must give what the SDK gives; a missing final ``data: [DONE]`` costs nothing,
since replay ends every open completion at the end of the input anyway.

An ``event: error`` frame's data is an error payload, folded like ``{"error": ...}``.

Which completion a frame belongs to (``frames_to_keys``): an SSE capture is an HTTP response,
one stream after another, each ended by ``data: [DONE]``; every frame of a stream belongs to
its completion, named by the first non-empty chunk ``id`` in it, whatever ids later chunks carry
(Groq's ``groq/compound`` sends a new id with every chunk, the last one ``"stub"``). A JSON
Lines capture may interleave completions: an envelope's ``key`` names its completion, else the
chunk's ``id`` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from chunkfold.core import codec
from chunkfold.core.records import RecordKind

_LINE_END = re.compile(r"\r\n|\r|\n")
_SSE_FIELD = re.compile(r"^(data|event|id|retry)(:|$)")


class InputError(ValueError):
    """Malformed input; the message is one line and names the place (``line N``)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One input record: ``key`` None means "the completion of the chunk" (its ``id``, or the
    first id of its SSE ``stream``: the streams of a response are numbered from 0)."""

    line: int
    kind: RecordKind
    payload: Any
    key: str | None = None
    seq: int | None = None
    stream: int | None = None


def detect_format(text: str) -> str:
    """``"sse"`` when the first meaningful line is an SSE field or comment, else ``"jsonl"``."""
    for line in _LINE_END.split(text.lstrip("\ufeff")):
        if not line.strip():
            continue
        return "sse" if line.startswith(":") or _SSE_FIELD.match(line) else "jsonl"
    return "jsonl"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A dispatched SSE event: ``line`` is its first ``data`` line, ``event`` its type field."""

    line: int
    data: str
    event: str = ""


def iter_sse_events(text: str) -> Iterator[SseEvent]:
    """Every event a blank line dispatches; an event without ``data`` is none (the spec)."""
    data: list[str] = []
    event = ""
    first_line = 0
    for number, line in enumerate(_LINE_END.split(text.lstrip("\ufeff")), start=1):
        if not line:
            if data:
                yield SseEvent(first_line, "\n".join(data), event)
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            if not data:
                first_line = number
            data.append(value)
        elif name == "event":
            event = value


def _payload_frame(line: int, raw: str) -> Frame:
    if raw.strip() == "[DONE]":
        return Frame(line, RecordKind.DONE, None)
    try:
        payload = codec.loads(raw)
    except codec.DecodeError as exc:
        raise InputError(f"line {line}: not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise InputError(f"line {line}: expected a JSON object, got {type(payload).__name__}")
    return Frame(line, RecordKind.CHUNK, payload)


def iter_frames(text: str) -> Iterator[Frame]:
    """Frames of an SSE or JSON Lines capture.

    A JSON Lines line is a chunk object, ``[DONE]``, or an envelope
    ``{"kind": "chunk|request|done|abort", "key": ..., "value": ..., "seq": ...}``.
    """
    if detect_format(text) == "sse":
        stream = 0
        for event in iter_sse_events(text):
            frame = (
                _error_event_frame(event)
                if event.event == "error"
                else _payload_frame(event.line, event.data)
            )
            yield Frame(frame.line, frame.kind, frame.payload, stream=stream)
            if frame.kind is RecordKind.DONE:
                stream += 1
        return
    for number, raw in enumerate(_LINE_END.split(text.lstrip("\ufeff")), start=1):
        if not raw.strip():
            continue
        frame = _payload_frame(number, raw)
        if frame.kind is RecordKind.CHUNK and "kind" in frame.payload and "choices" not in frame.payload:
            frame = _envelope(number, frame.payload)
        yield frame


def _error_event_frame(event: SseEvent) -> Frame:
    """The error frame an ``event: error`` event is: its data already shaped ``{"error": ...}``
    is kept as it is (as the SDK reads it); any other JSON value, or text that is not JSON,
    becomes the ``error`` of the frame (text as its ``message``)."""
    try:
        payload = codec.loads(event.data)
    except codec.DecodeError:
        payload = {"message": event.data}
    if not (isinstance(payload, dict) and payload.get("error")):
        payload = {"error": payload}
    return Frame(event.line, RecordKind.CHUNK, payload)


def _envelope(line: int, obj: dict[str, Any]) -> Frame:
    try:
        kind = RecordKind(obj["kind"])
    except (ValueError, TypeError):
        raise InputError(f"line {line}: unknown kind {obj['kind']!r} (chunk|request|done|abort)") from None
    key, seq, value = obj.get("key"), obj.get("seq"), obj.get("value")
    if key is not None and not isinstance(key, str):
        raise InputError(f"line {line}: key must be a string")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise InputError(f"line {line}: seq must be a non-negative integer")
    if kind in (RecordKind.CHUNK, RecordKind.REQUEST) and not isinstance(value, dict):
        raise InputError(f"line {line}: the value of a {kind.value} record must be a JSON object")
    return Frame(line, kind, value, key, seq)


def read_text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 (byte {exc.start})") from None


def frames_to_keys(frames: Iterable[Frame]) -> Iterator[tuple[str, Frame]]:
    """Assign each frame its completion key: the envelope key, else the first chunk ``id`` of
    its SSE stream, else (JSON Lines) the chunk's ``id``.

    A ``[DONE]`` or a frame without id (missing or ``""``: an error frame, Azure's filter
    frames, Snowflake Cortex's every chunk) belongs to the completion of its stream, or in JSON
    Lines of the previous frame, or of the next one when it comes first. A stream (or input) in
    which no frame names a completion is one completion, keyed ``""``."""
    last_key: str | None = None
    stream_keys: dict[int, str] = {}
    waiting: list[Frame] = []
    for frame in frames:
        if waiting and frame.stream != waiting[0].stream:  # a stream ended without any id
            yield from (("", early) for early in waiting)
            waiting.clear()
        key = frame.key or None
        if key is None and frame.kind is RecordKind.CHUNK:
            chunk_id = frame.payload.get("id")
            if isinstance(chunk_id, str) and chunk_id:
                key = chunk_id if frame.stream is None else stream_keys.setdefault(frame.stream, chunk_id)
        if key is None:
            key = last_key if frame.stream is None else stream_keys.get(frame.stream)
        if key is None:
            waiting.append(frame)
            continue
        for early in waiting:
            yield key, early
        waiting.clear()
        last_key = key
        yield key, frame
    for early in waiting:
        yield "", early
