"""``chunkfold replay``: the engine over a capture, with no Kafka, read as it comes.

Memory is bounded by the open completions, not by the input: frames are read one at a time
(``inputs``), a finished completion leaves only its tombstone, and tombstones beyond
``MAX_TOMBSTONES`` are dropped oldest first (the worker drops them after
``CHUNKFOLD_TOMBSTONE_S`` of stream time; a capture has no clock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jiter

from chunkfold.core import codec, completion, engine, fit, outputs
from chunkfold.core.inputs import (
    Frame,
    FrameKeys,
    InputError,
    Lines,
    chunk_frame,
    frames_to_keys,
    is_envelope,
    iter_frames,
    jsonl_frame,
    open_lines,
    sse_frames,
)
from chunkfold.core.records import (
    KIND_HEADER,
    SEQ_HEADER,
    InputRecord,
    InvalidRecord,
    RecordKind,
    chunk_record,
    key_too_large,
    make_record,
    max_key_bytes,
    oversized,
)
from chunkfold.core.state import AnyState, ClosedCompletion, CompletionState

if TYPE_CHECKING:
    # for annotations only: pydantic-settings imports asyncio, and replay stays free of I/O
    # modules like the core (tests/unit/test_purity.py)
    from chunkfold.config import Settings

_CHUNK = RecordKind.CHUNK
MAX_TOMBSTONES = 100_000
"""Finished completions whose tombstones replay keeps (to recognise records after their end)."""


class Published(NamedTuple):
    """One record the worker would publish: its topic, key and value (the value's JSON, cut to
    fit the topic as the worker cuts it)."""

    topic: str
    key: str
    value: bytes


@dataclass(slots=True)
class ReplayCounts:
    """What a replay read and published, for its summary line."""

    records: int = 0
    completions: int = 0
    events: int = 0
    deadletters: dict[str, int] = field(default_factory=dict)


def replay_sdk(source: Lines, request: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """What openai-python's ``ChatCompletionStreamState`` gives for one completion: its events
    (without ``chunk`` events), then ``{"type": "completion"}`` or ``{"type": "error"}``.
    An input that holds a second completion raises ``InputError`` when it gets there."""
    completion_id: str | None = None
    state: AnyState | None = None
    for key, frame in frames_to_keys(iter_frames(source)):
        if completion_id is None:
            completion_id = key
            if request is not None:
                state = _fold(state, key, Frame(0, RecordKind.REQUEST, request), engine.SDK_OPTIONS).state
        elif key != completion_id and key:
            raise InputError(
                f"line {frame.line}: --format sdk takes one completion; this is another ({key!r})"
            )
        if frame.kind is RecordKind.DONE:
            break
        if frame.kind is not RecordKind.CHUNK:
            continue
        result = _fold(state, completion_id, frame, engine.SDK_OPTIONS)
        state = result.state
        yield from (outputs.sdk_event(event) for event in result.events)
        if result.stream_error is not None:
            yield {"type": "error", "error": result.stream_error}
            return
    if not isinstance(state, CompletionState):
        yield {"type": "error", "error": "AssertionError"}
        return
    kind, value = completion.sdk_final(state)
    yield (
        {"type": "completion", "completion": value}
        if kind == "completion"
        else {"type": "error", "error": value}
    )


def replay_kafka(
    source: Lines, request: dict[str, Any] | None, settings: Settings, *, strict: bool = True
) -> Iterator[dict[str, Any]]:
    """``{"topic", "key", "value"}`` for every record the worker would publish for this input,
    the value as plain JSON (see ``published``)."""
    for record in published(source, request, settings, strict=strict):
        yield {"topic": record.topic, "key": record.key, "value": jiter.from_json(record.value)}


def published(
    source: Lines,
    request: dict[str, Any] | None,
    settings: Settings,
    *,
    strict: bool = True,
    counts: ReplayCounts | None = None,
) -> Iterator[Published]:
    """Every record the worker would publish for this input, in order. The end of the input
    ends every completion still open, as ``[DONE]`` would.

    A record the worker would dead-letter raises ``InputError`` when ``strict``; otherwise it
    is published to the dead-letter topic as the worker would (the source's ``offset`` is its
    line, ``partition`` and ``timestamp_ms`` null) and the replay goes on.

    JSON Lines go through ``_Replay.jsonl``, whose loop folds a plain chunk line itself and
    hands every other line to the per-frame path; SSE goes through ``published_from_frames``.
    Both publish the same bytes (``tests/unit/test_replay_paths.py``)."""
    opened = open_lines(source)
    if opened is None:
        return
    replay = _Replay(request, settings, strict, counts if counts is not None else ReplayCounts())
    if opened.format == "jsonl":
        yield from replay.jsonl(opened.lines, opened.first_number)
    else:
        yield from replay.frames(frames_to_keys(sse_frames(opened, strict)))
    yield from replay.end()


def published_from_frames(
    keyed: Iterable[tuple[str, Frame]],
    request: dict[str, Any] | None,
    settings: Settings,
    *,
    strict: bool = True,
    counts: ReplayCounts | None = None,
) -> Iterator[Published]:
    """``published`` over frames already keyed (``frames_to_keys``), each by the per-frame path."""
    replay = _Replay(request, settings, strict, counts if counts is not None else ReplayCounts())
    yield from replay.frames(keyed)
    yield from replay.end()


class _Replay:
    """One replay's open completions, tombstones and counts, and the step of one frame."""

    def __init__(
        self, request: dict[str, Any] | None, settings: Settings, strict: bool, counts: ReplayCounts
    ) -> None:
        self.request = request
        self.settings = settings
        self.strict = strict
        self.counts = counts
        self.options = engine.FoldOptions(snapshots=settings.snapshots, partial_parse=settings.partial_parse)
        self.limit = settings.max_message_bytes
        self.max_key = max_key_bytes(settings.max_message_bytes)
        self.states: dict[str, AnyState] = {}
        self.closed: deque[str] = deque()

    def frames(self, keyed: Iterable[tuple[str, Frame]]) -> Iterator[Published]:
        for key, frame in keyed:
            yield from self.frame(key, frame)

    def frame(self, key: str, frame: Frame) -> Iterator[Published]:
        """The records of one keyed frame: the per-frame path, which every rule goes through."""
        self.counts.records += 1
        state = self.states.get(key)
        outcome: engine.FoldResult | InvalidRecord
        if frame.problem is not None:
            outcome = frame.problem
        elif (problem := _size_problem(key, frame, self.settings.max_record_bytes, self.max_key)) is not None:
            outcome = problem
        else:
            if state is None and self.request is not None and frame.kind is not RecordKind.REQUEST:
                request = Frame(0, RecordKind.REQUEST, self.request)
                state = self.states[key] = _fold(None, key, request, self.options).state  # type: ignore[assignment]
                self.counts.completions += 1
            outcome = _try_fold(state, key, frame, self.options)
        yield from self.settle(key, frame, state, outcome)

    def settle(
        self, key: str, frame: Frame, state: AnyState | None, outcome: engine.FoldResult | InvalidRecord
    ) -> Iterator[Published]:
        """What the fold of ``frame`` (from ``state``) publishes, and the completion's new state."""
        if isinstance(outcome, InvalidRecord):
            if self.strict:
                raise InputError(f"line {frame.line}: {outcome}")
            reasons = self.counts.deadletters
            reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
            yield _deadletter(outcome, key, frame, self.settings)
            return
        if state is None and outcome.state is not None:
            self.counts.completions += 1
        yield from _outputs(key, outcome, self.settings, self.limit, self.counts)
        if outcome.state is state:  # folded in place: most records
            return
        if outcome.state is None:
            self.states.pop(key, None)
            return
        self.states[key] = outcome.state
        if isinstance(outcome.state, ClosedCompletion) and not isinstance(state, ClosedCompletion):
            self.closed.append(key)
            if len(self.closed) > MAX_TOMBSTONES:
                self.states.pop(self.closed.popleft(), None)

    def jsonl(self, lines: Iterable[str], first_number: int) -> Iterator[Published]:
        """The lines of a JSON Lines capture. A plain chunk line (most lines: an object with a
        non-empty ``id``, of an open completion, short enough for the size rules to pass at a
        glance, with no frame waiting for its key) is keyed by its id and folded here, without
        the frame and key layers, and a fold in place published by ``_outputs`` (what ``settle``
        does with it); any other fold goes on to ``settle``, and every other line through
        ``jsonl_frame``, ``FrameKeys`` and ``frame``. A line has one parse: the frame of a
        parsed line is made from its payload."""
        keys = FrameKeys()
        states, counts, options, limit = self.states, self.counts, self.options, self.limit
        # a value or key this short cannot break a size rule (a character is at most 4 bytes)
        short_line, short_key = self.settings.max_record_bytes // 4, self.max_key // 4
        loads, decode_error, fold = codec.loads_raw, codec.RawDecodeError, engine.fold
        for number, raw in enumerate(lines, start=first_number):
            frame: Frame | None = None
            if raw[:1] == "{":
                try:
                    payload = loads(raw)
                except decode_error:
                    payload = None
                if payload is not None and not is_envelope(payload):
                    key = payload.get("id")
                    state = states.get(key) if type(key) is str else None
                    if (
                        state is not None
                        and key
                        and len(raw) <= short_line
                        and len(key) <= short_key
                        and not keys.waiting
                    ):
                        counts.records += 1
                        keys.last_key = key
                        outcome: engine.FoldResult | InvalidRecord
                        try:
                            outcome = fold(state, key, chunk_record(payload, number, None, None), options)
                        except InvalidRecord as exc:
                            outcome = exc
                        if type(outcome) is engine.FoldResult and outcome.state is state:
                            yield from _outputs(key, outcome, self.settings, limit, counts)
                        else:
                            yield from self.settle(key, chunk_frame(number, payload, raw), state, outcome)
                        continue
                    frame = chunk_frame(number, payload, raw)
            if frame is None:
                frame = jsonl_frame(number, raw, self.strict)
                if frame is None:
                    continue
            for keyed_frame in keys.assign(frame):
                yield from self.frame(*keyed_frame)
        for keyed_frame in keys.end():
            yield from self.frame(*keyed_frame)

    def end(self) -> Iterator[Published]:
        """The end of the input: every completion still open ends as ``[DONE]`` would end it."""
        for key, state in self.states.items():
            if isinstance(state, CompletionState):
                end = engine.fold(state, key, InputRecord(RecordKind.DONE), self.options)
                yield from _outputs(key, end, self.settings, self.limit, self.counts)


def _outputs(
    key: str, result: engine.FoldResult, settings: Settings, limit: int, counts: ReplayCounts
) -> Iterator[Published]:
    """The records of one fold, each value's JSON cut to fit as the worker cuts it (``fit.encode``)."""
    raw_key = key.encode("utf-8")
    for event in result.events:
        yield Published(
            settings.events_topic, key, fit.encode(outputs.event_value(key, event), limit, raw_key)[0]
        )
    counts.events += len(result.events)
    if result.done is not None:
        yield Published(settings.done_topic, key, fit.encode(result.done, limit, raw_key)[0])


def _size_problem(key: str, frame: Frame, max_bytes: int, max_key: int) -> InvalidRecord | None:
    """The worker's size rules (``decode_record``): a key over ``max_key`` (``max_key_bytes``),
    a value over ``CHUNKFOLD_MAX_RECORD_BYTES``. A character is at most 4 UTF-8 bytes: the exact sizes are
    computed only for the rare text long enough to break a rule."""
    if len(key) * 4 > max_key and len(raw := key.encode("utf-8")) > max_key:
        return key_too_large(len(raw), max_key)
    if len(frame.raw) * 4 > max_bytes and len(value := _record_value(frame)) > max_bytes:
        return oversized(len(value), max_bytes)
    return None


def _is_envelope(frame: Frame) -> bool:
    return frame.key is not None or frame.seq is not None


def _record_value(frame: Frame) -> bytes:
    """The value of the Kafka record a gateway would publish for ``frame``: an envelope's value,
    else the record's text."""
    if _is_envelope(frame):
        return b"[DONE]" if frame.kind is RecordKind.DONE else codec.dumps(frame.payload)
    return frame.text.encode("utf-8")


def _deadletter(problem: InvalidRecord, key: str, frame: Frame, settings: Settings) -> Published:
    """The dead letter the worker would publish for ``frame``, read as a gateway publishes it
    (an envelope's value and headers, else the record's text). Its key is cut to
    the key limit (``max_key_bytes``), as the worker cuts it."""
    headers: list[tuple[str, bytes]] = []
    if _is_envelope(frame):
        if frame.kind is not RecordKind.CHUNK and frame.kind is not RecordKind.DONE:
            headers.append((KIND_HEADER, frame.kind.value.encode()))
        if frame.seq is not None:
            headers.append((SEQ_HEADER, str(frame.seq).encode()))
    value = _record_value(frame)
    raw_key = key.encode("utf-8")
    dead_key = raw_key[: max_key_bytes(settings.max_message_bytes)]
    dead = outputs.deadletter_value(
        reason=problem.reason,
        detail=problem.detail,
        key=raw_key,
        value=value,
        headers=headers,
        topic=settings.input_topic,
        partition=None,
        offset=frame.line,
        timestamp_ms=None,
    )
    value_json = fit.encode(dead, settings.max_message_bytes, dead_key)[0]
    return Published(settings.deadletter_topic, dead_key.decode("utf-8", "ignore"), value_json)


def _try_fold(
    state: AnyState | None, key: str, frame: Frame, options: engine.FoldOptions
) -> engine.FoldResult | InvalidRecord:
    """The fold of ``frame``, or why the worker would dead-letter it (the state is untouched)."""
    try:
        if frame.kind is _CHUNK:
            record = chunk_record(frame.payload, frame.line, frame.seq, None)
        else:
            record = make_record(key, frame.kind, frame.payload, offset=frame.line, seq=frame.seq)
        return engine.fold(state, key, record, options)
    except InvalidRecord as exc:
        return exc


def _fold(state: AnyState | None, key: str, frame: Frame, options: engine.FoldOptions) -> engine.FoldResult:
    """The fold of ``frame``; a record the worker would dead-letter is an ``InputError``."""
    outcome = _try_fold(state, key, frame, options)
    if isinstance(outcome, InvalidRecord):
        raise InputError(f"line {frame.line}: {outcome}")
    return outcome
