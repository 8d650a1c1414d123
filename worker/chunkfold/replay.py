"""``chunkfold replay``: the engine over a capture file, with no Kafka."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from chunkfold.core import codec, completion, engine, outputs
from chunkfold.core.inputs import Frame, InputError, frames_to_keys, iter_frames
from chunkfold.core.records import InputRecord, InvalidRecord, RecordKind, make_record
from chunkfold.core.state import AnyState, CompletionState

if TYPE_CHECKING:
    # for annotations only: pydantic-settings imports asyncio, and replay stays free of I/O
    # modules like the core (tests/unit/test_purity.py)
    from chunkfold.config import Settings


def replay_sdk(text: str, request: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """What openai-python's ``ChatCompletionStreamState`` gives for one completion: its events
    (without ``chunk`` events), then ``{"type": "completion"}`` or ``{"type": "error"}``."""
    keyed = list(frames_to_keys(iter_frames(text)))
    keys = {key for key, frame in keyed if frame.kind is RecordKind.CHUNK and frame.payload.get("id")}
    if len(keys) > 1:
        raise InputError(f"--format sdk takes one completion; the input holds {len(keys)}")
    completion_id = next(iter(keys), "")
    state: AnyState | None = None
    if request is not None:
        state = _fold(state, completion_id, Frame(0, RecordKind.REQUEST, request), engine.SDK_OPTIONS).state
    for _, frame in keyed:
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


def replay_kafka(text: str, request: dict[str, Any] | None, settings: Settings) -> Iterator[dict[str, Any]]:
    """``{"topic", "key", "value"}`` for every record the worker would publish for this input.

    The end of the input ends every completion still open, as ``[DONE]`` would.
    """
    options = engine.FoldOptions(snapshots=settings.snapshots, partial_parse=settings.partial_parse)
    states: dict[str, AnyState] = {}
    for key, frame in frames_to_keys(iter_frames(text)):
        if key not in states and request is not None and frame.kind is not RecordKind.REQUEST:
            states[key] = _fold(None, key, Frame(0, RecordKind.REQUEST, request), options).state  # type: ignore[assignment]
        result = _fold(states.get(key), key, frame, options)
        yield from _published(key, result, settings)
        if result.state is not None:
            states[key] = result.state
    for key, state in states.items():
        if isinstance(state, CompletionState):
            yield from _published(
                key, engine.fold(state, key, InputRecord(RecordKind.DONE), options), settings
            )


def _published(key: str, result: engine.FoldResult, settings: Settings) -> Iterator[dict[str, Any]]:
    """Plain JSON values (the engine's embedded logprob JSON parsed), exactly what the worker
    publishes once decoded."""
    for event in result.events:
        value = outputs.event_value(key, event)
        yield {"topic": settings.events_topic, "key": key, "value": codec.plain(value)}
    if result.done is not None:
        yield {"topic": settings.done_topic, "key": key, "value": codec.plain(result.done)}


def _fold(state: AnyState | None, key: str, frame: Frame, options: engine.FoldOptions) -> engine.FoldResult:
    try:
        record = make_record(key, frame.kind, frame.payload, offset=frame.line, seq=frame.seq)
        return engine.fold(state, key, record, options)
    except InvalidRecord as exc:
        raise InputError(f"line {frame.line}: {exc}") from None
