"""The accumulation engine: a pure step ``fold(state, record) -> FoldResult``.

Semantics follow openai-python's ``ChatCompletionStreamState`` event for event on every stream
that class handles; where real providers break it (out-of-order choices, repeated ids, missing
tool-call indexes, usage in the middle) the engine stays correct instead. Per-chunk work is
O(size of the chunk): text is appended to buffers and only parsed whole once, at ``*.done``.
Snapshots and partial parses on delta events (what the SDK recomputes per chunk) are opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from chunkfold.core import codec, shape
from chunkfold.core.records import CHUNK_OBJECT, InputRecord, InvalidRecord, RecordKind, validate_request
from chunkfold.core.state import (
    REASONING_FIELDS,
    TEXT_FIELDS,
    AnyState,
    ChoiceState,
    ClosedCompletion,
    CompletionState,
    RequestSpec,
    ToolCallState,
)
from chunkfold.core.validation import VALIDATION_STEPS, Budget, SchemaValidationError, parse_and_validate

DONE_RECORD_VERSION = 1
MAX_SEQ_JUMP = 1024
"""The furthest ``chunkfold.seq`` may jump ahead of the next expected one and still be taken as
records lost in between (``seq_gaps``). A larger jump is a bogus header: taken at its word it
would make every later record of the completion a "duplicate". It is counted (``seq_invalid``)
and the record is folded as one without the header."""
TRUNCATING_FINISH_REASONS = ("length", "content_filter")
_TEXT_KEYS = frozenset({*TEXT_FIELDS, *REASONING_FIELDS})
_SKIP_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
_SKIP_HEADER_KEYS = frozenset({"choices", "usage", "obfuscation", "system_fingerprint", "moderation"})
# Enum member lookups cost about 0.1 us each on CPython 3.11; ``fold`` compares against these.
_CHUNK, _REQUEST, _DONE, _ABORT = RecordKind.CHUNK, RecordKind.REQUEST, RecordKind.DONE, RecordKind.ABORT


class Status:
    COMPLETED = "completed"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    ABORTED = "aborted"
    EXPIRED = "expired"
    FAILED = "failed"


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
    applied (``replayed``: at or below the stored offset; ``duplicate``: a seq already seen).
    ``events`` and ``done`` are values for ``codec.dumps``: outside ``sdk`` mode, logprob lists
    in them (done events, snapshots, the final completion) are embedded JSON (``codec.embedded``)."""

    state: AnyState | None
    events: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    stream_error: str | None = None
    skipped: str | None = None


class _StreamError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


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
        if not (plain and _fold_plain_chunk(state, payload, ts, result.events)):
            _fold_chunk(state, payload, ts, options, result)
    elif kind is _REQUEST:
        if state.request is not None:
            raise InvalidRecord("duplicate_request", "a second request context for one completion")
        validate_request(payload)
        state.request = payload
        state.spec = RequestSpec.from_request(payload)
        state.request_ms = ts
    _advance(state, offset, seq, ts)
    if kind is _DONE or result.stream_error == "APIError":
        _close(state, None, ts, result)
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
        result.state = ClosedCompletion(
            state.completion_id,
            Status.FAILED,
            state.last_offset,
            state.next_seq,
            now_ms,
            state.last_activity_ms,
        )
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


# ---------------------------------------------------------------------------------------------
# chunks


def _fold_chunk(
    state: CompletionState, chunk: dict[str, Any], ts: int | None, options: FoldOptions, result: FoldResult
) -> None:
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"
        if state.status is None:
            state.status, state.error = Status.FAILED, {"type": "APIError", "message": message}
        result.stream_error = "APIError"
        return
    obj = chunk.get("object")
    if obj is not None and obj != CHUNK_OBJECT:
        state.counters.skipped_frames += 1
        return
    choices: list[dict[str, Any]] = chunk.get("choices") or []
    tool_indexes = [_resolve_tool_indexes(state, choice) for choice in choices]

    _count_chunk(state, ts)
    first_chunk = state.header is None
    if first_chunk:
        header = {k: v for k, v in chunk.items() if k not in _SKIP_HEADER_KEYS}
        header["object"] = "chat.completion"
        state.header = header

    # openai-python accumulates every choice of a chunk, then builds the chunk's events: an
    # error in either phase discards all of the chunk's events, and accumulation errors win.
    emitting = state.status is None
    sdk_first = options.sdk and first_chunk
    steps: list[_Step] = []
    for choice, indexes in zip(choices, tool_indexes, strict=True):
        try:
            steps.append(_accumulate_choice(state, choice, indexes, options, ts, sdk_first))
        except _StreamError as exc:
            _fail(state, result, exc)
    events: list[dict[str, Any]] = []
    if emitting and state.status is None:
        try:
            for step in steps:
                _choice_events(state, step, options, events, sdk_first)
        except _StreamError as exc:
            _fail(state, result, exc)
            events = []

    _chunk_tail(state, chunk)
    if events:
        result.events.extend(_number(state, events))


def _count_chunk(state: CompletionState, ts: int | None) -> None:
    state.counters.chunks += 1
    if ts is not None:
        if state.first_chunk_ms is None:
            state.first_chunk_ms = ts
        state.last_chunk_ms = ts


def _chunk_tail(state: CompletionState, chunk: dict[str, Any]) -> None:
    """The chunk-level fields that replace what earlier chunks said (last non-null wins)."""
    usage = chunk.get("usage")
    if usage is not None:
        state.usage = usage
    fingerprint = chunk.get("system_fingerprint")
    if fingerprint is not None:
        state.system_fingerprint = fingerprint
    moderation = chunk.get("moderation")
    if moderation is not None:
        state.moderation = moderation


def _fold_plain_chunk(
    state: CompletionState, chunk: dict[str, Any], ts: int | None, events: list[dict[str, Any]]
) -> bool:
    """The fast path for the chunks that make up most of a stream: one choice, already seen,
    whose delta is only ``content`` or only the arguments of the tool call already open, without
    finish reason or logprobs, after the first chunk and before any error (the caller checks
    that no snapshots, partial parses or SDK events are asked for).

    It folds the chunk and numbers its one event exactly as ``_fold_chunk`` would (this shape
    has no done events and no stream errors) and returns True; for any other chunk it returns
    False having changed nothing.
    """
    choices = chunk.get("choices")
    if (
        type(choices) is not list  # unchecked in error and non-chunk frames: no len() before this
        or len(choices) != 1
        or state.header is None
        or state.status is not None
        or chunk.get("error")
        or chunk.get("object") not in (None, CHUNK_OBJECT)
    ):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if not delta or len(delta) != 1 or choice.get("finish_reason") or choice.get("logprobs") is not None:
        return False
    cs = state.choices.get(choice["index"])
    if cs is None or cs.finish_reason:
        return False
    text = delta.get("content")
    if type(text) is str:
        buf = cs.text.get("content")
        if buf is None:
            cs.text["content"] = bytearray(text.encode("utf-8"))
        else:
            buf += text.encode("utf-8")
        event = {"type": "content.delta", "choice_index": cs.index, "delta": text}
    else:  # the arguments of the open tool call, and nothing else
        calls = delta.get("tool_calls")
        if not calls or len(calls) != 1 or len(calls[0]) != 2:
            return False
        tool = cs.tools.get(calls[0].get("index"))
        function = calls[0].get("function")
        if tool is None or tool.index != cs.current_tool or type(function) is not dict or len(function) != 1:
            return False
        text = function.get("arguments")
        if type(text) is not str:
            return False
        tool.arguments_seen = True
        if text:
            tool.arguments += text.encode("utf-8")
        event = {
            "type": "tool_calls.function.arguments.delta",
            "choice_index": cs.index,
            "name": tool.name,
            "index": tool.index,
            "arguments_delta": text,
        }
    _count_chunk(state, ts)
    if text and state.first_token_ms is None:
        state.first_token_ms = ts
    event["seq"] = state.event_seq
    state.event_seq += 1
    events.append(event)
    _chunk_tail(state, chunk)
    return True


def _fail(state: CompletionState, result: FoldResult, exc: _StreamError) -> None:
    if state.status is None:
        state.status = _status_for(exc.error_type)
        state.error = {"type": exc.error_type, "message": exc.message}
        result.stream_error = exc.error_type


def _status_for(error_type: str) -> str:
    if error_type == "LengthFinishReasonError":
        return Status.LENGTH
    if error_type == "ContentFilterFinishReasonError":
        return Status.CONTENT_FILTER
    return Status.FAILED


def _number(state: CompletionState, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        event["seq"] = state.event_seq
        state.event_seq += 1
    return events


def _resolve_tool_indexes(state: CompletionState, choice: dict[str, Any]) -> list[int]:
    """The tool-call index of each tool-call delta of ``choice``, inferring missing ones.

    A delta without ``index`` continues the one open call, or starts a new call when it
    carries an ``id`` none of the open calls has; anything else is ambiguous and rejected.
    Nothing is mutated here, so a rejected chunk leaves the state as it was.
    """
    delta = choice.get("delta")
    calls = delta.get("tool_calls") if delta else None
    if not calls:
        return []
    indexes = [call.get("index") for call in calls]
    if None not in indexes:
        return indexes
    existing = state.choices.get(choice["index"])
    known = {i: t for i, t in existing.tools.items()} if existing else {}
    open_calls = [i for i, t in known.items() if not t.done]
    current = existing.current_tool if existing else None
    out: list[int] = []
    for call in calls:
        index = call.get("index")
        if index is None:
            call_id = call.get("id")
            known_ids = {t.id: i for i, t in known.items() if t.id}
            if call_id and call_id in known_ids:
                index = known_ids[call_id]
            elif call_id:
                index = max([*known, *out, -1]) + 1
            elif len(open_calls) == 1:
                index = open_calls[0]
            elif not open_calls and current is not None:
                index = current
            else:
                raise InvalidRecord(
                    "ambiguous_tool_call",
                    f"tool-call delta without index while {len(open_calls)} calls are open",
                )
        if index not in known and index not in out:
            if current is not None and current in open_calls:
                open_calls.remove(current)
            open_calls.append(index)
            current = index
        out.append(index)
    return out


def _merge_identity(old: str | None, new: str) -> str:
    """Ids, names and roles are identities: a repeated value is kept once, not concatenated."""
    if not old or new == old or new.startswith(old):
        return new
    if old.endswith(new):
        return old
    return old + new


class _Step(NamedTuple):
    """One choice entry of a chunk, accumulated, waiting for its events to be built."""

    cs: ChoiceState
    delta: dict[str, Any]
    tool_indexes: list[int]
    touched: list[tuple[ToolCallState, str]]
    logprobs: _LogprobsDelta | None


class _LogprobsDelta(NamedTuple):
    """A chunk's logprob entries, normalized (as openai-python's ``model_dump`` has them)."""

    content: list[Any] | None
    refusal: list[Any] | None


def _accumulate_choice(
    state: CompletionState,
    choice: dict[str, Any],
    tool_indexes: list[int],
    options: FoldOptions,
    ts: int | None,
    sdk_first: bool,
) -> _Step:
    """Fold one choice entry into the state (openai-python's ``_accumulate_chunk`` for it).
    ``sdk_first``: the SDK builds its snapshot from the stream's first chunk without its
    per-chunk partial parses and finish-reason check."""
    index: int = choice["index"]
    cs = state.choices.get(index)
    if cs is None:
        cs = state.choice(index)
        cs.choice_extra = {k: v for k, v in choice.items() if k not in _SKIP_CHOICE_KEYS}
    delta: dict[str, Any] = choice.get("delta") or {}
    got_token = False
    text = cs.text
    for key, value in delta.items():
        if key in _TEXT_KEYS:
            buf = text.get(key)
            if value is None:
                if key not in text:
                    text[key] = None
            elif buf is None:
                text[key] = bytearray(value.encode("utf-8"))
                got_token = got_token or bool(value)
            else:
                buf += value.encode("utf-8")
                got_token = got_token or bool(value)
        elif key == "role":
            if value is not None and cs.role is None:
                cs.role = value
        elif key != "tool_calls":
            _accumulate_value(cs.message_extra, key, value)

    touched: list[tuple[ToolCallState, str]] = []
    if tool_indexes:
        for call, tool_index in zip(delta["tool_calls"], tool_indexes, strict=True):
            touched.append(_accumulate_tool_call(cs, call, tool_index))
        got_token = got_token or any(args for _, args in touched)
    if got_token and state.first_token_ms is None:
        state.first_token_ms = ts

    wire_logprobs = choice.get("logprobs")
    logprobs = None if wire_logprobs is None else _fold_logprobs(cs, wire_logprobs)
    finish_reason = choice.get("finish_reason")
    if finish_reason:
        cs.finish_reason = finish_reason
        if (
            state.status is None
            and not sdk_first
            and finish_reason in TRUNCATING_FINISH_REASONS
            and state.spec.parseable
        ):
            if finish_reason == "length":
                raise _StreamError("LengthFinishReasonError", "finish_reason length with parseable input")
            raise _StreamError(
                "ContentFilterFinishReasonError", "finish_reason content_filter with parseable input"
            )
    if options.partial_parse and not sdk_first and state.status is None:
        _partial_parse(state, cs, delta, touched, options)
    return _Step(cs, delta, tool_indexes, touched, logprobs)


def _accumulate_tool_call(
    cs: ChoiceState, call: dict[str, Any], tool_index: int
) -> tuple[ToolCallState, str]:
    tool = cs.tools.get(tool_index)
    if tool is None:
        tool = cs.tools[tool_index] = ToolCallState(tool_index)
    for key, value in call.items():
        if key == "function":
            if not value:
                continue
            for fkey, fvalue in value.items():
                if fkey == "arguments":
                    if isinstance(fvalue, str):
                        tool.arguments_seen = True
                        if fvalue:
                            tool.arguments += fvalue.encode("utf-8")
                elif fkey == "name":
                    if fvalue:
                        tool.name = _merge_identity(tool.name, fvalue)
                else:
                    _accumulate_value(tool.function_extra, fkey, fvalue)
        elif key == "id":
            if value:
                tool.id = _merge_identity(tool.id, value)
        elif key == "type":
            if value is not None:
                tool.type = value
        elif key != "index":
            _accumulate_value(tool.extra, key, value)
    function = call.get("function")
    return tool, (function.get("arguments") or "") if function else ""


def _choice_events(
    state: CompletionState, step: _Step, options: FoldOptions, events: list[dict[str, Any]], sdk_first: bool
) -> None:
    """openai-python's ``_build_events`` for one accumulated choice entry."""
    cs, delta, tool_indexes, touched, logprobs = step
    index = cs.index
    content_delta = delta.get("content")
    if content_delta is not None and cs.text.get("content") is not None:
        event: dict[str, Any] = {"type": "content.delta", "choice_index": index, "delta": content_delta}
        if options.snapshots:
            event["snapshot"] = cs.text_of("content")
        if options.partial_parse:
            event["parsed"] = cs.parsed_partial
        events.append(event)
    refusal_delta = delta.get("refusal")
    if refusal_delta is not None and cs.text.get("refusal") is not None:
        event = {"type": "refusal.delta", "choice_index": index, "delta": refusal_delta}
        if options.snapshots:
            event["snapshot"] = cs.text_of("refusal")
        events.append(event)
    if not options.sdk:
        for name in REASONING_FIELDS:
            if delta.get(name):
                events.append(_event("reasoning.delta", index, field=name, delta=delta[name]))
    for tool, args_delta in touched:
        event = {
            "type": "tool_calls.function.arguments.delta",
            "choice_index": index,
            "name": tool.name,
            "index": tool.index,
        }
        if options.snapshots:
            event["arguments"] = tool.arguments_text()
        if options.partial_parse:
            event["parsed_arguments"] = tool.parsed_partial
        event["arguments_delta"] = args_delta
        events.append(event)
    if logprobs is not None:
        _logprobs_events(cs, logprobs, options, events)
    if cs.finish_reason or tool_indexes:
        _done_events(state, cs, tool_indexes, options, events)


def _event(event_type: str, choice_index: int, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "choice_index": choice_index, **fields}


def _partial_parse(
    state: CompletionState,
    cs: ChoiceState,
    delta: dict[str, Any],
    touched: list[tuple[ToolCallState, str]],
    options: FoldOptions,
) -> None:
    """openai-python's per-chunk partial parses (O(text so far)); opt-in outside SDK mode."""
    if state.spec.structured and (options.sdk or delta.get("content")):
        content = cs.text.get("content")
        refusal = cs.text.get("refusal")
        if content and not refusal and content.lstrip():
            try:
                cs.parsed_partial = codec.loads_partial(content)
            except ValueError as exc:
                if options.sdk:
                    raise _StreamError("ValueError", str(exc)) from None
    for tool, _ in touched:
        spec = state.spec.tools.get(tool.name or "")
        if spec is not None and spec.strict and tool.arguments:
            try:
                tool.parsed_partial = codec.loads_partial(tool.arguments)
            except ValueError as exc:
                if options.sdk:
                    raise _StreamError("ValueError", str(exc)) from None


def _fold_logprobs(cs: ChoiceState, logprobs: dict[str, Any]) -> _LogprobsDelta:
    """Append the chunk's entries, normalized once, to the choice's buffers (which therefore
    hold exactly what the done event and the final completion carry)."""
    content, refusal = logprobs.get("content"), logprobs.get("refusal")
    step = _LogprobsDelta(
        None if content is None else _tokens(content), None if refusal is None else _tokens(refusal)
    )
    if not cs.logprobs_seen:
        cs.logprobs_seen = True
        cs.logprobs_content = None if step.content is None else _entries(step.content)
        cs.logprobs_refusal = None if step.refusal is None else _entries(step.refusal)
    else:
        if step.content:
            cs.logprobs_content = _append_entries(cs.logprobs_content, step.content)
        if step.refusal:
            cs.logprobs_refusal = _append_entries(cs.logprobs_refusal, step.refusal)
    return step


def _logprobs_events(
    cs: ChoiceState, logprobs: _LogprobsDelta, options: FoldOptions, events: list[dict[str, Any]]
) -> None:
    for kind, delta, buf in (
        ("content", logprobs.content, cs.logprobs_content),
        ("refusal", logprobs.refusal, cs.logprobs_refusal),
    ):
        if delta and buf:
            event = _event(f"logprobs.{kind}.delta", cs.index, **{kind: delta})
            if options.snapshots:
                event["snapshot"] = _logprobs_value(cs, buf, embed=not options.sdk)
            events.append(event)


def _entries(items: list[Any]) -> bytearray:
    return bytearray(b",".join(codec.dumps(item) for item in items))


def _append_entries(buf: bytearray | None, items: list[Any]) -> bytearray:
    if buf is None:
        return _entries(items)
    if buf:
        buf += b","
    buf += _entries(items)
    return buf


def _logprobs_value(cs: ChoiceState, buf: bytearray, *, embed: bool) -> Any:
    """The entries in ``buf`` as an output value: with ``embed``, the buffer's JSON as it is
    (``codec.embedded``: no parse, no objects; O(bytes) at the end of a stream instead of a
    parse and a normalizing copy of every entry), else a list."""
    data = b"[" + buf + b"]"
    if cs.logprobs_wire:
        return _tokens(codec.loads(data))
    return codec.embedded(data) if embed else codec.loads(data)


def _tokens(items: list[Any]) -> list[Any]:
    return [shape.token_logprob(item) for item in items]


def _done_events(
    state: CompletionState,
    cs: ChoiceState,
    tool_indexes: list[int],
    options: FoldOptions,
    events: list[dict[str, Any]],
) -> None:
    """openai-python's ``ChoiceEventState.get_done_events``: text is done at the choice's
    finish or when a tool call starts; a tool call is done when the next one starts or at finish."""
    if cs.finish_reason:
        _text_done_events(state, cs, options, events)
        if cs.current_tool is not None and not cs.tools[cs.current_tool].done:
            _tool_done_event(state, cs, cs.current_tool, options, events)
    for tool_index in tool_indexes:
        if cs.current_tool != tool_index:
            _text_done_events(state, cs, options, events)
            if cs.current_tool is not None:
                _tool_done_event(state, cs, cs.current_tool, options, events)
        cs.current_tool = tool_index


def _text_done_events(
    state: CompletionState, cs: ChoiceState, options: FoldOptions, events: list[dict[str, Any]]
) -> None:
    index = cs.index
    if not options.sdk and not cs.reasoning_done:
        for name in REASONING_FIELDS:
            if cs.text.get(name):
                cs.reasoning_done = True
                events.append(_event("reasoning.done", index, field=name, reasoning=cs.text_of(name)))
    content = cs.text_of("content")
    if content and not cs.content_done:
        cs.content_done = True
        parsed = _parse_content(state, cs, content)
        if options.partial_parse:
            cs.parsed_partial = parsed
        events.append(_event("content.done", index, content=content, parsed=parsed))
    if cs.has_text("refusal") and not cs.refusal_done:
        cs.refusal_done = True
        events.append(_event("refusal.done", index, refusal=cs.text_of("refusal")))
    embed = not options.sdk
    if cs.logprobs_seen and cs.logprobs_content is not None and not cs.logprobs_content_done:
        cs.logprobs_content_done = True
        content = _logprobs_value(cs, cs.logprobs_content, embed=embed)
        events.append(_event("logprobs.content.done", index, content=content))
    if cs.logprobs_seen and cs.logprobs_refusal is not None and not cs.logprobs_refusal_done:
        cs.logprobs_refusal_done = True
        refusal = _logprobs_value(cs, cs.logprobs_refusal, embed=embed)
        events.append(_event("logprobs.refusal.done", index, refusal=refusal))


def _tool_done_event(
    state: CompletionState,
    cs: ChoiceState,
    tool_index: int,
    options: FoldOptions,
    events: list[dict[str, Any]],
) -> None:
    tool = cs.tools[tool_index]
    if tool.done:
        return
    tool.done = True
    parsed = _parse_tool_arguments(state, tool)
    if options.partial_parse:
        tool.parsed_partial = parsed
    events.append(
        _event(
            "tool_calls.function.arguments.done",
            cs.index,
            index=tool_index,
            name=tool.name,
            arguments=tool.arguments_text(),
            parsed_arguments=parsed,
        )
    )


def _parse_content(state: CompletionState, cs: ChoiceState, content: str) -> Any:
    """The validated structured output of a choice, or None where the SDK gives None."""
    if not state.spec.structured or not content or cs.text.get("refusal"):
        return None
    try:
        return _validated(state, content, state.spec.response_schema_json)
    except SchemaValidationError as exc:
        raise _StreamError("ValidationError", f"choice {cs.index} content: {exc}") from None


def _parse_tool_arguments(state: CompletionState, tool: ToolCallState) -> Any:
    spec = state.spec.tools.get(tool.name or "")
    if spec is None or not spec.strict:
        return None
    try:
        return _validated(state, tool.arguments_text(), spec.schema_json)
    except SchemaValidationError as exc:
        raise _StreamError(
            "ValidationError", f"tool call {tool.index} ({tool.name}) arguments: {exc}"
        ) from None


def _validated(state: CompletionState, text: str | None, schema_json: bytes | None) -> Any:
    """``parse_and_validate`` spending from the completion's validation budget, whose count is
    kept in its state: a restored completion goes on with exactly the budget it had left."""
    budget = Budget(VALIDATION_STEPS - state.counters.validation_steps)
    try:
        return parse_and_validate(text, schema_json, budget)
    finally:
        state.counters.validation_steps += budget.spent


def _accumulate_value(acc: dict[str, Any], key: str, value: Any) -> None:
    """openai-python's ``accumulate_delta`` for one key of fields chunkfold has no buffer for
    (``function_call``, ``audio``, provider extras): strings and numbers add up, dicts merge,
    lists of indexed entries merge by ``index``, ``index``/``type`` are replaced."""
    if acc.get(key) is None:
        if isinstance(value, list) and any(isinstance(v, dict) and "index" in v for v in value):
            acc[key] = []
        else:
            acc[key] = value
            return
    current = acc[key]
    if key in ("index", "type"):
        acc[key] = value
    elif isinstance(current, str) and isinstance(value, str):
        acc[key] = current + value
    elif (
        isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool)
    ):
        acc[key] = current + value
    elif isinstance(current, dict) and isinstance(value, dict):
        merged = dict(current)
        for sub_key, sub_value in value.items():
            _accumulate_value(merged, sub_key, sub_value)
        acc[key] = merged
    elif isinstance(current, list) and isinstance(value, list):
        indexed = [v for v in value if isinstance(v, dict) and isinstance(v.get("index"), int)]
        if not indexed:
            acc[key] = current + value
            return
        merged_list = list(current)
        for entry in indexed:
            position = next(
                (
                    i
                    for i, e in enumerate(merged_list)
                    if isinstance(e, dict) and e.get("index") == entry["index"]
                ),
                None,
            )
            if position is None:
                merged_list.append(entry)
            else:
                holder = {"v": merged_list[position]}
                _accumulate_value(holder, "v", entry)
                merged_list[position] = holder["v"]
        acc[key] = merged_list


# ---------------------------------------------------------------------------------------------
# the end of a completion


def build_completion(
    state: CompletionState, *, parse_unfinished: bool, embed: bool = False
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The ``ParsedChatCompletion`` dump of ``state`` (None before the first chunk) and the
    first error ``get_final_completion`` would raise, in one pass over the choices.
    ``embed``: logprob lists are embedded JSON (``codec.embedded``), for output through ``codec.dumps``.

    Choices cut by ``length`` / ``content_filter`` are never parsed (their text is truncated),
    nor, unless ``parse_unfinished``, choices without a finish reason; a choice whose text
    does not parse or validate gets ``parsed`` null and the error is reported.
    """
    if state.header is None:
        return None, None
    errors: list[dict[str, str]] = []
    choices = [
        _choice_dump(state, cs, parse_unfinished, embed, errors) for _, cs in sorted(state.choices.items())
    ]
    completion = {
        **state.header,
        "choices": choices,
        "system_fingerprint": state.system_fingerprint,
        "usage": state.usage,
    }
    if state.moderation is not None:
        completion["moderation"] = state.moderation
    result: dict[str, Any] = shape.normalize(completion, shape.COMPLETION)
    return result, errors[0] if errors else None


def _choice_dump(
    state: CompletionState,
    cs: ChoiceState,
    parse_unfinished: bool,
    embed: bool,
    errors: list[dict[str, str]],
) -> dict[str, Any]:
    if cs.finish_reason == "length":
        errors.append(
            {"type": "LengthFinishReasonError", "message": f"choice {cs.index} hit the length limit"}
        )
    elif cs.finish_reason == "content_filter":
        errors.append(
            {
                "type": "ContentFilterFinishReasonError",
                "message": f"choice {cs.index} was stopped by the content filter",
            }
        )
    parse = cs.finish_reason not in TRUNCATING_FINISH_REASONS and (
        parse_unfinished or cs.finish_reason is not None
    )
    message: dict[str, Any] = dict(cs.message_extra)
    message["role"] = cs.role
    for name in cs.text:
        message[name] = cs.text_of(name)
    content = cs.text_of("content") or ""
    message["parsed"] = _guarded(lambda: _parse_content(state, cs, content), parse and bool(content), errors)
    if cs.tools:
        message["tool_calls"] = [_tool_dump(state, t, parse, errors) for _, t in sorted(cs.tools.items())]
    logprobs = None
    if cs.logprobs_seen:
        logprobs = {
            "content": None
            if cs.logprobs_content is None
            else _logprobs_value(cs, cs.logprobs_content, embed=embed),
            "refusal": None
            if cs.logprobs_refusal is None
            else _logprobs_value(cs, cs.logprobs_refusal, embed=embed),
        }
    return {
        **cs.choice_extra,
        "finish_reason": cs.finish_reason,
        "index": cs.index,
        "logprobs": logprobs,
        "message": message,
    }


def _tool_dump(
    state: CompletionState, tool: ToolCallState, parse: bool, errors: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        **tool.extra,
        "id": tool.id,
        "function": {
            **tool.function_extra,
            "arguments": tool.arguments_text(),
            "name": tool.name,
            "parsed_arguments": _guarded(lambda: _parse_tool_arguments(state, tool), parse, errors),
        },
        "type": tool.type or "function",
        "index": tool.index,
    }


def _guarded(compute: Callable[[], Any], enabled: bool, errors: list[dict[str, str]]) -> Any:
    if not enabled:
        return None
    try:
        return compute()
    except _StreamError as exc:
        errors.append({"type": exc.error_type, "message": exc.message})
        return None


def _status_of_error(error: dict[str, str] | None) -> str:
    return Status.COMPLETED if error is None else _status_for(error["type"])


def sdk_final(state: CompletionState) -> tuple[str, Any]:
    """What ``ChatCompletionStreamState.get_final_completion()`` gives: ``("completion", dump)``
    or ``("error", exception class name)``."""
    completion, error = build_completion(state, parse_unfinished=True)
    if completion is None:
        return "error", "AssertionError"
    if error is not None:
        return "error", error["type"]
    return "completion", completion


def _close(
    state: CompletionState,
    status: str | None,
    now_ms: int | None,
    result: FoldResult,
    abort_reason: Any = None,
) -> None:
    """Publish the one ``completion-done`` record and leave a tombstone. ``status`` None: the
    stream ended (``[DONE]`` or an error frame); else ``aborted`` / ``expired``."""
    error: dict[str, str] | None = state.error
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
    result.done = _done_record(state, status, error, completion)
    result.state = ClosedCompletion(
        state.completion_id, status, state.last_offset, state.next_seq, now_ms, state.last_activity_ms
    )


def _done_record(
    state: CompletionState, status: str, error: dict[str, str] | None, completion: dict[str, Any] | None
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
        },
    }
