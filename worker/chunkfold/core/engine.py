"""The accumulation engine: a pure step ``fold(state, record) -> FoldResult``.

Semantics follow openai-python's ``ChatCompletionStreamState`` event for event on every stream
that class handles; where real providers break it (out-of-order choices, repeated ids, missing
tool-call indexes, usage in the middle) the engine stays correct instead. Per-chunk work is
O(size of the chunk): text is appended to buffers and only parsed whole once, at ``*.done``.
Snapshots and partial parses on delta events (what the SDK recomputes per chunk) are opt-in.

This module is the step and its API (``fold``, ``expire``, ``fail``, ``idle_since_ms``,
``expiry_preview``, ``FoldOptions``, ``FoldResult``): which records apply, the two phases of a
chunk, and the close that publishes the one done record. It delegates to modules that only the engine calls
(``completion.sdk_final`` excepted, for replays in SDK mode):

- ``accumulate``: a chunk's deltas folded into the state (the one-choice fast path included);
- ``events``: the semantic events of an accumulated chunk;
- ``completion``: the final ``ParsedChatCompletion``, and the parsing and validation of text;
- ``logprobs``: the buffers that hold a choice's logprob entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chunkfold.core.accumulate import (
    Step,
    accumulate_choice,
    chunk_tail,
    count_chunk,
    fold_plain_chunk,
    resolve_tool_indexes,
)
from chunkfold.core.completion import StreamError, build_completion
from chunkfold.core.events import choice_events, number_events
from chunkfold.core.records import (
    InputRecord,
    InvalidRecord,
    RecordKind,
    is_non_chunk_frame,
    validate_request,
)
from chunkfold.core.state import MAX_OTHER_IDS, AnyState, ClosedCompletion, CompletionState, RequestSpec
from chunkfold_schemas.done import Status

DONE_RECORD_VERSION = 1
MAX_SEQ_JUMP = 1024
"""The furthest ``chunkfold.seq`` may jump ahead of the next expected one and still be taken as
records lost in between (``seq_gaps``). A larger jump is a bogus header: taken at its word it
would make every later record of the completion a "duplicate". It is counted (``seq_invalid``)
and the record is folded as one without the header."""
_SKIP_HEADER_KEYS = frozenset({"choices", "usage", "obfuscation", "system_fingerprint", "moderation"})
# Enum member lookups cost about 0.1 us each on CPython 3.11; ``fold`` compares against these.
_CHUNK, _REQUEST, _DONE, _ABORT = RecordKind.CHUNK, RecordKind.REQUEST, RecordKind.DONE, RecordKind.ABORT


@dataclass(frozen=True, slots=True)
class FoldOptions:
    """``snapshots``: accumulated text/lists on delta events. ``partial_parse``: ``parsed`` /
    ``parsed_arguments`` on delta events (a partial JSON parse per chunk: O(n) each). ``sdk``:
    exactly openai-python: only its event types, and its exceptions where it raises."""

    snapshots: bool = False
    partial_parse: bool = False
    sdk: bool = False


KAFKA_OPTIONS = FoldOptions()
SDK_OPTIONS = FoldOptions(snapshots=True, partial_parse=True, sdk=True)


@dataclass(slots=True)
class FoldResult:
    """``state`` replaces the stored state (``None``: delete it). ``stream_error`` names the SDK
    exception the SDK would have raised on this record. ``skipped`` says why a record was not
    applied (``replayed``: at or below the stored offset; ``duplicate``: a seq already seen;
    ``after_error``: the ``[DONE]`` that follows an error frame).
    ``events`` and ``done`` are values for ``codec.dumps``: outside ``sdk`` mode, logprob lists
    in them (done events, snapshots, the final completion) are embedded JSON (``codec.embedded``)."""

    state: AnyState | None
    events: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    stream_error: str | None = None
    skipped: str | None = None


def fold(
    state: AnyState | None, completion_id: str, record: InputRecord, options: FoldOptions = KAFKA_OPTIONS
) -> FoldResult:
    """Fold one record into the completion's state.

    Invariants: a record at or below ``state.last_offset`` or with a ``seq`` already seen is
    skipped without any output; a record that cannot be applied raises ``InvalidRecord`` and
    leaves ``state`` untouched; a completion produces exactly one ``done`` record, after which
    its state becomes a ``ClosedCompletion`` tombstone.
    """
    kind, payload, offset, seq, ts = record
    if state is not None:
        if offset is not None and state.last_offset is not None and offset <= state.last_offset:
            return FoldResult(state, skipped="replayed")
        if seq is not None and state.next_seq is not None and seq < state.next_seq:
            if isinstance(state, CompletionState):
                state.counters.duplicates_dropped += 1
                _touch(state, record)
                if offset is not None:
                    state.last_offset = offset
            return FoldResult(state, skipped="duplicate")
    if isinstance(state, ClosedCompletion):
        if kind is _DONE and state.awaits_done:
            state.awaits_done = False
            state.last_offset = offset if offset is not None else state.last_offset
            if seq is not None and (state.next_seq is None or seq >= state.next_seq):
                state.next_seq = seq + 1
            return FoldResult(state, skipped="after_error")
        raise InvalidRecord("after_end", f"{kind.value} record after the completion ended ({state.status})")
    if state is None:
        if kind in (_DONE, _ABORT):
            raise InvalidRecord(
                "unknown_completion", f"{kind.value} record for a completion with no open state"
            )
        state = CompletionState(completion_id)

    result = FoldResult(state, [])
    if kind is _CHUNK:
        plain = not (options.snapshots or options.partial_parse or options.sdk)
        if not (plain and fold_plain_chunk(state, payload, ts, result.events)):
            _fold_chunk(state, payload, ts, options, result)
    elif kind is _REQUEST:
        if state.request is not None:
            raise InvalidRecord("duplicate_request", "a second request context for one completion")
        validate_request(payload)
        state.request = payload
        state.spec = RequestSpec.from_request(payload)
        state.request_ms = ts
    _advance(state, offset, seq, ts)
    if kind is _DONE:
        _close(state, None, ts, result)
    elif result.stream_error == "APIError":
        _close(state, None, ts, result)
        assert isinstance(result.state, ClosedCompletion)
        result.state.awaits_done = True
    elif kind is _ABORT:
        reason = (payload or {}).get("reason")
        _close(state, Status.ABORTED, ts, result, abort_reason=reason)
    return result


def expire(state: AnyState, now_ms: int | None) -> FoldResult:
    """Close an idle open completion (status ``expired``, leaving a tombstone); drop a tombstone."""
    if isinstance(state, ClosedCompletion):
        return FoldResult(None)
    result = FoldResult(state)
    _close(state, Status.EXPIRED, now_ms, result)
    return result


def fail(state: CompletionState, error_type: str, message: str, now_ms: int | None) -> FoldResult:
    """Close an open completion that a record could not be folded into for a reason no input
    check foresaw (status ``failed``, the error in its done record), so its consumers get an
    answer instead of waiting for it to expire. Its state may be half-updated by the failed
    fold: when even its partial completion cannot be built, the done record carries none."""
    error = {"type": error_type, "message": message}
    state.status, state.error = Status.FAILED, error
    result = FoldResult(state)
    try:
        _close(state, Status.FAILED, now_ms, result)
    except Exception:  # the state is what broke: report the failure without its completion
        result.done = _done_record(state, Status.FAILED, error, None)
        result.state = _tombstone(state, Status.FAILED, now_ms)
    return result


def idle_since_ms(state: AnyState) -> int | None:
    """Time of the last record folded into ``state`` (or of its end, for a tombstone)."""
    if isinstance(state, ClosedCompletion):
        return state.closed_at_ms if state.closed_at_ms is not None else state.last_activity_ms
    return state.last_activity_ms


def _touch(state: CompletionState, record: InputRecord) -> None:
    if record.timestamp_ms is not None:
        state.last_activity_ms = record.timestamp_ms


def _advance(state: CompletionState, offset: int | None, seq: int | None, ts: int | None) -> None:
    if offset is not None:
        state.last_offset = offset
    if seq is not None:
        expected = state.next_seq if state.next_seq is not None else 0
        if seq - expected > MAX_SEQ_JUMP:
            state.counters.seq_invalid += 1
        else:
            if seq > expected:
                state.counters.seq_gaps += 1
                state.counters.missing_records += seq - expected
            state.next_seq = seq + 1
    if ts is not None:
        state.last_activity_ms = ts


def _fold_chunk(
    state: CompletionState, chunk: dict[str, Any], ts: int | None, options: FoldOptions, result: FoldResult
) -> None:
    """Any chunk, in openai-python's two phases: accumulate every choice, then build the events."""
    error = chunk.get("error")
    if error:
        # openai-python raises APIError(message, body=error) here; the usage the frame may carry
        # (OpenRouter reports the tokens spent) is kept, and so is the body (code, param,
        # Groq's failed_generation), as the SDK's exception keeps it
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"
        if state.status is None:
            state.status = Status.FAILED
            state.error = {"type": "APIError", "message": message, "body": error}
        usage = chunk.get("usage")  # the rest of an error frame is not checked: this is
        if isinstance(usage, dict):
            state.usage = usage
        result.stream_error = "APIError"
        return
    if is_non_chunk_frame(chunk):
        state.counters.skipped_frames += 1
        return
    chunk_id = chunk.get("id")
    if chunk_id and chunk_id != state.completion_id:
        _other_id(state, chunk_id)
    choices: list[dict[str, Any]] = chunk.get("choices") or []
    tool_indexes = [resolve_tool_indexes(state, choice) for choice in choices]

    count_chunk(state, ts)
    first_chunk = state.header is None
    if first_chunk:
        header = {k: v for k, v in chunk.items() if k not in _SKIP_HEADER_KEYS}
        header["object"] = "chat.completion"
        state.header = header

    # openai-python accumulates every choice of a chunk, then builds the chunk's events: an
    # error in either phase discards all of the chunk's events, and accumulation errors win.
    emitting = state.status is None
    sdk_first = options.sdk and first_chunk
    steps: list[Step] = []
    for choice, indexes in zip(choices, tool_indexes, strict=True):
        try:
            steps.append(accumulate_choice(state, choice, indexes, options, ts, sdk_first))
        except StreamError as exc:
            _fail(state, result, exc)
    events: list[dict[str, Any]] = []
    if emitting and state.status is None:
        try:
            for step in steps:
                choice_events(state, step, options, events, sdk_first)
        except StreamError as exc:
            _fail(state, result, exc)
            events = []

    chunk_tail(state, chunk)
    if events:
        result.events.extend(number_events(state, events))


def _other_id(state: CompletionState, chunk_id: str) -> None:
    """A chunk whose id is not its completion's (the key): folded in all the same, counted,
    and its id listed while the list is short."""
    state.counters.id_mismatches += 1
    if len(state.other_ids) < MAX_OTHER_IDS and chunk_id not in state.other_ids:
        state.other_ids.append(chunk_id)


def _fail(state: CompletionState, result: FoldResult, exc: StreamError) -> None:
    if state.status is None:
        state.status = _status_for(exc.error_type)
        state.error = {"type": exc.error_type, "message": exc.message}
        result.stream_error = exc.error_type


def _status_for(error_type: str) -> Status:
    if error_type == "LengthFinishReasonError":
        return Status.LENGTH
    if error_type == "ContentFilterFinishReasonError":
        return Status.CONTENT_FILTER
    return Status.FAILED


def _status_of_error(error: dict[str, Any] | None) -> Status:
    return Status.COMPLETED if error is None else _status_for(error["type"])


def _close(
    state: CompletionState,
    status: str | None,
    now_ms: int | None,
    result: FoldResult,
    abort_reason: Any = None,
) -> None:
    """Publish the one ``completion-done`` record and leave a tombstone. ``status`` None: the
    stream ended (``[DONE]`` or an error frame); else ``aborted`` / ``expired`` / ``failed``.
    Statuses are ``Status`` members, or their plain strings when kept in a restored state."""
    result.done = _final_record(state, status, abort_reason)
    result.state = _tombstone(state, result.done["status"], now_ms)


def expiry_preview(state: CompletionState) -> dict[str, Any]:
    """The done record ``expire`` would publish for ``state`` now, leaving ``state`` exactly as
    it was: parsing spends from the completion's validation budget, which is given back (an
    expiry would spend it from the same remainder, so the record is the same)."""
    spent = state.counters.validation_steps
    try:
        return _final_record(state, Status.EXPIRED, None)
    finally:
        state.counters.validation_steps = spent


def _final_record(state: CompletionState, status: str | None, abort_reason: Any) -> dict[str, Any]:
    """The done record of ``_close`` (which see); changes nothing in ``state`` but the
    validation budget its parses spend."""
    error: dict[str, Any] | None = state.error
    if status is None and state.status is not None:
        status = state.status
    if status is None:
        completion, error = build_completion(state, parse_unfinished=True, embed=True)
        status = _status_of_error(error)
        if completion is None:
            status, error = (
                Status.FAILED,
                {"type": "EmptyStream", "message": "the stream ended before its first chunk"},
            )
    else:
        completion, _ = build_completion(state, parse_unfinished=False, embed=True)
        if status == Status.ABORTED and abort_reason is not None:
            error = {"type": "Aborted", "message": str(abort_reason)}
    if error is None and state.spec.schema_problem is not None:
        error = {"type": "SchemaError", "message": state.spec.schema_problem}
    return _done_record(state, status, error, completion)


def _tombstone(state: CompletionState, status: str, now_ms: int | None) -> ClosedCompletion:
    """What a finished completion leaves: enough to recognise its late and replayed records."""
    return ClosedCompletion(
        state.completion_id,
        status,
        state.last_offset,
        state.next_seq,
        now_ms,
        state.last_activity_ms,
        events_from=state.events_from,
        event_count=state.event_seq,
    )


def _done_record(
    state: CompletionState, status: str, error: dict[str, Any] | None, completion: dict[str, Any] | None
) -> dict[str, Any]:
    usage = completion["usage"] if completion else None
    first_ms = state.request_ms if state.request_ms is not None else state.first_chunk_ms
    ttft = None if state.first_token_ms is None or first_ms is None else state.first_token_ms - first_ms
    tokens_per_second = None
    completion_tokens = usage.get("completion_tokens") if usage else None
    if (
        isinstance(completion_tokens, int)
        and state.first_token_ms is not None
        and state.last_chunk_ms is not None
    ):
        span_ms = state.last_chunk_ms - state.first_token_ms
        if span_ms > 0:
            tokens_per_second = round(completion_tokens * 1000 / span_ms, 3)
    c = state.counters
    return {
        "version": DONE_RECORD_VERSION,
        "completion_id": state.completion_id,
        "status": status,
        "error": error,
        "completion": completion,
        "usage": usage,
        "usage_reported": usage is not None,
        "request": state.request,
        "timing": {
            "request_at_ms": state.request_ms,
            "first_chunk_at_ms": state.first_chunk_ms,
            "last_chunk_at_ms": state.last_chunk_ms,
            "time_to_first_token_ms": ttft,
            "duration_ms": None
            if state.first_chunk_ms is None or state.last_chunk_ms is None
            else state.last_chunk_ms - state.first_chunk_ms,
            "tokens_per_second": tokens_per_second,
        },
        "chunk_count": c.chunks,
        "event_count": state.event_seq,
        "anomalies": {
            "duplicates_dropped": c.duplicates_dropped,
            "seq_gaps": c.seq_gaps,
            "missing_records": c.missing_records,
            "skipped_frames": c.skipped_frames,
            "seq_invalid": c.seq_invalid,
            "id_mismatches": c.id_mismatches,
            "unknown_content_parts": c.unknown_content_parts,
        },
        "other_chunk_ids": list(state.other_ids),
    }
