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
from itertools import chain
from typing import Any, NamedTuple

from chunkfold.core import codec
from chunkfold.core.records import InvalidRecord, RecordKind

_LINE_END = re.compile(r"\r\n|\r|\n")
_SSE_FIELD = re.compile(r"^(data|event|id|retry)(:|$)")
_CHUNK, _DONE = RecordKind.CHUNK, RecordKind.DONE

Lines = str | Iterable[str]
"""A whole capture as one string, or its lines (without or with their line ends, as a text
file iterates them with universal newlines): either way nothing here holds more than a line,
an SSE event or the frames waiting for their completion's id."""


class InputError(ValueError):
    """Malformed input; the message is one line and names the place (``line N``)."""


class Frame(NamedTuple):
    """One input record: ``key`` None means "the completion of the chunk" (its ``id``, or the
    first id of its SSE ``stream``: the streams of a response are numbered from 0). ``raw`` is
    the record's text as the input had it (the ``data`` of an SSE event, a JSON Lines line).
    ``problem``: why the record cannot be read (only when the reader is not ``strict``); its
    payload is then None, and a worker would dead-letter it with that reason."""

    line: int
    kind: RecordKind
    payload: Any
    key: str | None = None
    seq: int | None = None
    stream: int | None = None
    raw: str = ""
    problem: InvalidRecord | None = None

    @property
    def text(self) -> str:
        """``raw`` without the line end a JSON Lines line may keep."""
        return self.raw.rstrip("\r\n")


def split_lines(source: Lines) -> Iterator[str]:
    """The lines of ``source`` without their line ends (CR, LF or CRLF) and without a BOM."""
    lines = _LINE_END.split(source) if isinstance(source, str) else source
    first = True
    for line in lines:
        if first:
            line = line.lstrip("\ufeff")
            first = False
        yield line.rstrip("\r\n") if line.endswith(("\n", "\r")) else line


def detect_format(text: str) -> str:
    """``"sse"`` when the first meaningful line is an SSE field or comment, else ``"jsonl"``."""
    for line in split_lines(text):
        if line.strip():
            return _format_of(line)
    return "jsonl"


def _format_of(line: str) -> str:
    return "sse" if line.startswith(":") or _SSE_FIELD.match(line) else "jsonl"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A dispatched SSE event: ``line`` is its first ``data`` line, ``event`` its type field."""

    line: int
    data: str
    event: str = ""


def iter_sse_events(source: Lines, first_number: int = 1) -> Iterator[SseEvent]:
    """Every event a blank line dispatches; an event without ``data`` is none (the spec)."""
    data: list[str] = []
    event = ""
    first_line = 0
    for number, line in enumerate(split_lines(source), start=first_number):
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


def iter_frames(source: Lines, *, strict: bool = True) -> Iterator[Frame]:
    """Frames of an SSE or JSON Lines capture, read as they come (the format is told by the
    first meaningful line).

    A JSON Lines line is a chunk object, ``[DONE]``, or an envelope
    ``{"kind": "chunk|request|done|abort", "key": ..., "value": ..., "seq": ...}``. A record
    that cannot be read raises ``InputError`` when ``strict``; otherwise it is a frame with a
    ``problem`` (the reason the worker would dead-letter it for), and reading goes on.
    """
    opened = open_lines(source)
    if opened is None:
        return
    if opened.format == "sse":
        yield from sse_frames(opened, strict)
    else:
        yield from _jsonl_frames(opened.lines, opened.first_number, strict)


class OpenedLines(NamedTuple):
    """A capture's lines from its first meaningful one (numbered ``first_number``, BOM
    dropped), and the format that line tells."""

    format: str
    lines: Iterator[str]
    first_number: int


def open_lines(source: Lines) -> OpenedLines | None:
    """``source`` from its first meaningful line, with its format; None when it has none."""
    # JSON Lines need no line ends split off (JSON ignores them): only SSE gets split_lines
    lines = iter(_LINE_END.split(source) if isinstance(source, str) else source)
    for number, line in enumerate(lines, start=1):
        if number == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            return OpenedLines(_format_of(line), chain((line,), lines), number)
    return None


def sse_frames(opened: OpenedLines, strict: bool) -> Iterator[Frame]:
    """The frames of an SSE capture (``open_lines`` told its format)."""
    stream = 0
    for event in iter_sse_events(opened.lines, opened.first_number):
        if event.event == "error":
            frame = _error_event_frame(event)
        else:
            frame = _payload_frame(event.line, event.data, strict)
        yield frame._replace(stream=stream)
        if frame.kind is _DONE:
            stream += 1


def _jsonl_frames(lines: Iterable[str], first_number: int, strict: bool) -> Iterator[Frame]:
    for number, raw in enumerate(lines, start=first_number):
        frame = jsonl_frame(number, raw, strict)
        if frame is not None:
            yield frame


def jsonl_frame(number: int, raw: str, strict: bool) -> Frame | None:
    """The frame of JSON Lines line ``number`` (None: a blank line). A chunk object (most
    lines) keeps its line end in ``raw`` if it has one (JSON ignores it)."""
    if raw[:1] == "{":
        try:
            payload = codec.loads_raw(raw)
        except codec.RawDecodeError as exc:
            return _bad(number, raw.rstrip("\r\n"), InvalidRecord("invalid_json", codec.reason(exc)), strict)
        if is_envelope(payload):
            return _envelope(number, payload, raw.rstrip("\r\n"), strict)
        return chunk_frame(number, payload, raw)
    if raw and not raw.isspace():
        return _payload_frame(number, raw.rstrip("\r\n"), strict)
    return None


def is_envelope(obj: dict[str, Any]) -> bool:
    """A JSON Lines object that is an envelope, not a chunk."""
    return "kind" in obj and "choices" not in obj


def chunk_frame(number: int, payload: dict[str, Any], raw: str) -> Frame:
    """``Frame(number, CHUNK, payload, raw=raw)``, without the NamedTuple's ``__new__``: the
    frame of a chunk line."""
    return tuple.__new__(Frame, (number, _CHUNK, payload, None, None, None, raw, None))


def _bad(line: int, raw: str, problem: InvalidRecord, strict: bool, key: str | None = None) -> Frame:
    if strict:
        raise InputError(f"line {line}: {problem}")
    return Frame(line, _CHUNK, None, key=key, raw=raw, problem=problem)


def _payload_frame(line: int, raw: str, strict: bool = True) -> Frame:
    if raw.strip() == "[DONE]":
        return Frame(line, _DONE, None, raw=raw)
    try:
        payload = codec.loads_raw(raw)
    except codec.RawDecodeError as exc:
        return _bad(line, raw, InvalidRecord("invalid_json", codec.reason(exc)), strict)
    if not isinstance(payload, dict):
        detail = "chunk value must be a JSON object"  # as the worker says it
        return _bad(line, raw, InvalidRecord("not_an_object", detail), strict)
    return Frame(line, _CHUNK, payload, raw=raw)


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
    return Frame(event.line, _CHUNK, payload, raw=event.data)


def _envelope(line: int, obj: dict[str, Any], raw: str, strict: bool) -> Frame:
    key, seq, value = obj.get("key"), obj.get("seq"), obj.get("value")
    if key is not None and not isinstance(key, str):
        return _bad(line, raw, InvalidRecord("invalid_key", "key must be a string"), strict)
    try:
        kind = RecordKind(obj["kind"])
    except (ValueError, TypeError):
        detail = f"unknown kind {obj['kind']!r} (chunk|request|done|abort)"
        return _bad(line, raw, InvalidRecord("unknown_kind", detail), strict, key)
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        detail = "seq must be a non-negative integer"
        return _bad(line, raw, InvalidRecord("invalid_seq", detail), strict, key)
    if kind in (_CHUNK, RecordKind.REQUEST) and not isinstance(value, dict):
        detail = f"the value of a {kind.value} record must be a JSON object"
        return _bad(line, raw, InvalidRecord("not_an_object", detail), strict, key)
    return Frame(line, kind, value, key, seq, raw=raw)


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
    keys = FrameKeys()
    for frame in frames:
        yield from keys.assign(frame)
    yield from keys.end()


class FrameKeys:
    """``frames_to_keys`` one frame at a time. ``last_key`` and ``waiting`` are read and set
    by a caller that keys a JSON Lines chunk with an id itself: with nothing ``waiting``, that
    frame's key is its id, and ``last_key`` becomes it."""

    __slots__ = ("last_key", "stream", "stream_key", "waiting")

    def __init__(self) -> None:
        self.last_key: str | None = None
        self.stream: int | None = None  # the SSE stream being read, and its key once a chunk names it
        self.stream_key: str | None = None
        self.waiting: list[Frame] = []

    def assign(self, frame: Frame) -> list[tuple[str, Frame]]:
        """The frames keyed now: ``frame`` with the frames waiting for a key before it, or
        none while no frame of its stream has named its completion."""
        _, kind, payload, key, _, frame_stream, _, _ = frame  # one unpacking: the per-frame path
        keyed: list[tuple[str, Frame]] = []
        if frame_stream != self.stream:
            keyed = self.end()  # a stream ended without any id
            self.stream, self.stream_key = frame_stream, None
        if not key and kind is _CHUNK and payload is not None:
            key = payload.get("id")
            if type(key) is not str or not key:
                key = None
            elif frame_stream is not None:
                key = self.stream_key = self.stream_key or key
        if not key:
            key = self.last_key if frame_stream is None else self.stream_key
            if key is None:
                self.waiting.append(frame)
                return keyed
        if self.waiting:
            keyed.extend((key, early) for early in self.waiting)
            self.waiting.clear()
        self.last_key = key
        keyed.append((key, frame))
        return keyed

    def end(self) -> list[tuple[str, Frame]]:
        """The frames still waiting (their stream or the input ended without an id): keyed ``""``."""
        keyed = [("", early) for early in self.waiting]
        self.waiting.clear()
        return keyed
