"""Input records (chunk, request context, end of stream, abort): decoding and validation.

Everything here is pure. A record that cannot be folded raises ``InvalidRecord`` with a one-line
reason before any state is touched, so a bad record never corrupts a completion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.core import codec

KIND_HEADER = "chunkfold.kind"
SEQ_HEADER = "chunkfold.seq"
DEFAULT_MAX_RECORD_BYTES = 1 << 20
CHUNK_OBJECT = "chat.completion.chunk"


class RecordKind(StrEnum):
    CHUNK = "chunk"
    REQUEST = "request"
    DONE = "done"
    ABORT = "abort"


class InvalidRecord(ValueError):
    """A record that cannot be folded; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One record of one completion, as the engine sees it.

    ``offset`` is the record's position in its input (Kafka offset, or line number in replay);
    ``seq`` the gateway's ``chunkfold.seq`` header when present; ``timestamp_ms`` the time the
    gateway received it.
    """

    kind: RecordKind
    payload: Any = None
    offset: int | None = None
    seq: int | None = None
    timestamp_ms: int | None = None


def _is_done_marker(value: bytes) -> bool:
    return value.strip() == b"[DONE]"


def header_value(headers: Iterable[tuple[str, bytes]] | None, name: str) -> bytes | None:
    """The last value of header ``name``, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def decode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | None = None,
    *,
    offset: int | None = None,
    timestamp_ms: int | None = None,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[str, InputRecord]:
    """Turn one raw input record into ``(completion_id, InputRecord)`` or raise ``InvalidRecord``."""
    if not key:
        raise InvalidRecord("missing_key", "record has no key (the completion id)")
    try:
        completion_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("invalid_key", "key is not valid UTF-8") from None
    value = value or b""
    if len(value) > max_bytes:
        raise InvalidRecord("oversized", f"value is {len(value)} bytes, limit {max_bytes}")
    seq = _decode_seq(header_value(headers, SEQ_HEADER))
    kind = _decode_kind(header_value(headers, KIND_HEADER), value)
    payload: Any = None
    if kind is RecordKind.DONE:
        if value and not _is_done_marker(value):
            raise InvalidRecord("invalid_done", "a done record carries [DONE] or nothing")
    elif kind is not RecordKind.ABORT or value.strip():
        payload = _decode_json(value)
    return completion_id, make_record(
        completion_id, kind, payload, offset=offset, seq=seq, timestamp_ms=timestamp_ms
    )


def make_record(
    completion_id: str,
    kind: RecordKind,
    payload: Any,
    *,
    offset: int | None = None,
    seq: int | None = None,
    timestamp_ms: int | None = None,
) -> InputRecord:
    """An ``InputRecord`` whose payload has been checked for its kind, or ``InvalidRecord``."""
    if kind is RecordKind.ABORT:
        if payload is not None and not isinstance(payload, dict):
            raise InvalidRecord("invalid_abort", "abort value must be a JSON object")
    elif kind is not RecordKind.DONE:
        if not isinstance(payload, dict):
            raise InvalidRecord("not_an_object", f"{kind.value} value must be a JSON object")
        if kind is RecordKind.CHUNK:
            validate_chunk(payload)
            chunk_id = payload.get("id")
            if chunk_id and chunk_id != completion_id:
                raise InvalidRecord(
                    "key_mismatch", f"chunk id {chunk_id!r} differs from key {completion_id!r}"
                )
        else:
            validate_request(payload)
    return InputRecord(kind, payload, offset, seq, timestamp_ms)


def _decode_seq(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRecord("invalid_seq", f"{SEQ_HEADER} must be ASCII decimal, got {raw[:40]!r}")
    return int(raw)


def _decode_kind(raw: bytes | None, value: bytes) -> RecordKind:
    if raw is None or raw == b"":
        return RecordKind.DONE if _is_done_marker(value) else RecordKind.CHUNK
    try:
        return RecordKind(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidRecord(
            "unknown_kind", f"{KIND_HEADER} {raw[:40]!r} is not one of chunk|request|done|abort"
        ) from None


def _decode_json(value: bytes) -> Any:
    try:
        return codec.loads(value)
    except codec.DecodeError as exc:
        raise InvalidRecord("invalid_json", str(exc)) from None


def _expect(ok: bool, reason: str, detail: str) -> None:
    if not ok:
        raise InvalidRecord(reason, detail)


def _opt_str(obj: dict[str, Any], field: str, where: str) -> None:
    value = obj.get(field)
    _expect(
        value is None or isinstance(value, str), "wrong_type", f"{where}.{field} must be a string or null"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_list(value: Any, where: str) -> None:
    if value is None:
        return
    _expect(isinstance(value, list), "wrong_type", f"{where} must be a list or null")
    for entry in value:
        _expect(isinstance(entry, dict), "wrong_type", f"{where}[] must be objects")


def validate_chunk(chunk: dict[str, Any]) -> None:
    """Check the fields the engine reads; raise ``InvalidRecord`` on the first wrong type.

    Error frames (``{"error": ...}``) and non-chunk frames (``object`` other than
    ``chat.completion.chunk``) are valid records here; the engine decides what they mean.
    """
    if chunk.get("error"):
        return
    obj = chunk.get("object")
    _expect(obj is None or isinstance(obj, str), "wrong_type", "object must be a string")
    if obj is not None and obj != CHUNK_OBJECT:
        return
    _opt_str(chunk, "id", "chunk")
    _opt_str(chunk, "model", "chunk")
    _opt_str(chunk, "system_fingerprint", "chunk")
    created = chunk.get("created")
    _expect(created is None or _is_int(created), "wrong_type", "chunk.created must be an integer")
    usage = chunk.get("usage")
    _expect(usage is None or isinstance(usage, dict), "wrong_type", "chunk.usage must be an object or null")
    choices = chunk.get("choices")
    _expect(choices is None or isinstance(choices, list), "wrong_type", "chunk.choices must be a list")
    for choice in choices or ():
        _expect(isinstance(choice, dict), "wrong_type", "chunk.choices[] must be objects")
        _expect(_is_int(choice.get("index")), "wrong_type", "choice.index must be an integer")
        _expect(choice["index"] >= 0, "wrong_type", "choice.index must not be negative")
        _opt_str(choice, "finish_reason", "choice")
        logprobs = choice.get("logprobs")
        _expect(
            logprobs is None or isinstance(logprobs, dict), "wrong_type", "choice.logprobs must be an object"
        )
        if logprobs:
            _token_list(logprobs.get("content"), "logprobs.content")
            _token_list(logprobs.get("refusal"), "logprobs.refusal")
        delta = choice.get("delta")
        _expect(delta is None or isinstance(delta, dict), "wrong_type", "choice.delta must be an object")
        if delta:
            _validate_delta(delta)


def _validate_delta(delta: dict[str, Any]) -> None:
    for field in ("role", "content", "refusal", "reasoning_content", "reasoning"):
        _opt_str(delta, field, "delta")
    tool_calls = delta.get("tool_calls")
    _expect(
        tool_calls is None or isinstance(tool_calls, list), "wrong_type", "delta.tool_calls must be a list"
    )
    for call in tool_calls or ():
        _expect(isinstance(call, dict), "wrong_type", "delta.tool_calls[] must be objects")
        index = call.get("index")
        _expect(
            index is None or (_is_int(index) and index >= 0),
            "wrong_type",
            "tool_call.index must be an integer",
        )
        _opt_str(call, "id", "tool_call")
        _opt_str(call, "type", "tool_call")
        function = call.get("function")
        _expect(
            function is None or isinstance(function, dict),
            "wrong_type",
            "tool_call.function must be an object",
        )
        if function:
            _opt_str(function, "name", "tool_call.function")
            _opt_str(function, "arguments", "tool_call.function")


def validate_request(request: dict[str, Any]) -> None:
    """Check the parts of the create-params the engine reads (``response_format``, ``tools``, ``n``)."""
    response_format = request.get("response_format")
    _expect(
        response_format is None or isinstance(response_format, dict),
        "wrong_type",
        "request.response_format must be an object",
    )
    if response_format and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        _expect(isinstance(spec, dict), "wrong_type", "response_format.json_schema must be an object")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        _expect(
            schema is None or isinstance(schema, dict), "wrong_type", "json_schema.schema must be an object"
        )
    tools = request.get("tools")
    _expect(tools is None or isinstance(tools, list), "wrong_type", "request.tools must be a list")
    for tool in tools or ():
        _expect(isinstance(tool, dict), "wrong_type", "request.tools[] must be objects")
        function = tool.get("function")
        if tool.get("type") == "function":
            _expect(isinstance(function, dict), "wrong_type", "tool.function must be an object")
            assert isinstance(function, dict)
            _opt_str(function, "name", "tool.function")
            params = function.get("parameters")
            _expect(
                params is None or isinstance(params, dict),
                "wrong_type",
                "function.parameters must be an object",
            )
