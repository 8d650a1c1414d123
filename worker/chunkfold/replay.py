"""``chunkfold replay``: the engine over a capture, with no Kafka, read as it comes.

Memory is bounded by the open completions, not by the input: frames are read one at a time
(``inputs``), a finished completion leaves only its tombstone, and tombstones beyond
``MAX_TOMBSTONES`` are dropped oldest first (the worker drops them after
``CHUNKFOLD_TOMBSTONE_S`` of stream time; a capture has no clock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jiter

from chunkfold.core import codec, completion, engine, fit, outputs
from chunkfold.core.inputs import Frame, InputError, Lines, frames_to_keys, iter_frames
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
    line, ``partition`` and ``timestamp_ms`` null) and the replay goes on."""
    options = engine.FoldOptions(snapshots=settings.snapshots, partial_parse=settings.partial_parse)
    counts = counts if counts is not None else ReplayCounts()
    states: dict[str, AnyState] = {}
    closed: deque[str] = deque()
    limit = settings.max_message_bytes
    max_key = max_key_bytes(limit)
    for key, frame in frames_to_keys(iter_frames(source, strict=strict)):
        counts.records += 1
        state = states.get(key)
        outcome: engine.FoldResult | InvalidRecord
        if frame.problem is not None:
            outcome = frame.problem
        elif (problem := _size_problem(key, frame, settings.max_record_bytes, max_key)) is not None:
            outcome = problem
        else:
            if state is None and request is not None and frame.kind is not RecordKind.REQUEST:
                state = states[key] = _fold(None, key, Frame(0, RecordKind.REQUEST, request), options).state  # type: ignore[assignment]
                counts.completions += 1
            outcome = _try_fold(state, key, frame, options)
        if isinstance(outcome, InvalidRecord):
            if strict:
                raise InputError(f"line {frame.line}: {outcome}")
            counts.deadletters[outcome.reason] = counts.deadletters.get(outcome.reason, 0) + 1
            yield _deadletter(outcome, key, frame, settings)
            continue
        if state is None and outcome.state is not None:
            counts.completions += 1
        yield from _outputs(key, outcome, settings, limit, counts)
        if outcome.state is state:  # folded in place: most records
            continue
        if outcome.state is None:
            states.pop(key, None)
            continue
        states[key] = outcome.state
        if isinstance(outcome.state, ClosedCompletion) and not isinstance(state, ClosedCompletion):
            closed.append(key)
            if len(closed) > MAX_TOMBSTONES:
                states.pop(closed.popleft(), None)
    for key, state in states.items():
        if isinstance(state, CompletionState):
            end = engine.fold(state, key, InputRecord(RecordKind.DONE), options)
            yield from _outputs(key, end, settings, limit, counts)


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
