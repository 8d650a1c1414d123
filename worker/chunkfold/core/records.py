"""Input records (chunk, request context, end of stream, abort): decoding and validation.

Everything here is pure. A record that cannot be folded raises ``InvalidRecord`` with a one-line
reason before any state is touched, so a bad record never corrupts a completion.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any, NamedTuple

from chunkfold.core import codec, fit

KIND_HEADER = "chunkfold.kind"
SEQ_HEADER = "chunkfold.seq"
MAX_KEY_BYTES = 128 * 1024
"""The longest completion id with the default output limit (``max_key_bytes`` lowers it for
smaller ones)."""
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


class InputRecord(NamedTuple):
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


# Enum member lookups cost about 0.1 us each on CPython 3.11; the per-record paths use these.
_CHUNK, _REQUEST, _DONE, _ABORT = RecordKind.CHUNK, RecordKind.REQUEST, RecordKind.DONE, RecordKind.ABORT


def _is_done_marker(value: bytes) -> bool:
    return value.strip() == b"[DONE]"


def decode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | None = None,
    *,
    offset: int | None = None,
    timestamp_ms: int | None = None,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_key: int = MAX_KEY_BYTES,
) -> tuple[str, InputRecord]:
    """Turn one raw input record into ``(completion_id, InputRecord)`` or raise ``InvalidRecord``.
    ``max_key``: the key limit for the worker's output topics (``max_key_bytes``)."""
    if not key:
        raise InvalidRecord("missing_key", "record has no key (the completion id)")
    if len(key) > max_key:
        raise key_too_large(len(key), max_key)
    try:
        completion_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("invalid_key", "key is not valid UTF-8") from None
    value = value or b""
    if len(value) > max_bytes:
        raise oversized(len(value), max_bytes)
    raw_seq = raw_kind = None
    if headers:
        for name, header in headers:
            if name == SEQ_HEADER:
                raw_seq = header
            elif name == KIND_HEADER:
                raw_kind = header
    seq = None if raw_seq is None else _decode_seq(raw_seq)
    # a value that starts with "{" cannot be the [DONE] marker: the common case, a chunk
    kind = _CHUNK if raw_kind is None and value[:1] == b"{" else _decode_kind(raw_kind, value)
    if kind is _CHUNK:
        try:
            payload = codec.loads_raw(value)
        except codec.RawDecodeError as exc:
            raise InvalidRecord("invalid_json", codec.reason(exc)) from None
        return completion_id, chunk_record(payload, offset, seq, timestamp_ms)
    payload = None
    if kind is _DONE:
        if value and not _is_done_marker(value):
            raise InvalidRecord("invalid_done", "a done record carries [DONE] or nothing")
    elif kind is not _ABORT or value.strip():
        payload = _decode_json(value)
    return completion_id, make_record(
        completion_id, kind, payload, offset=offset, seq=seq, timestamp_ms=timestamp_ms
    )


def max_key_bytes(output_limit: int) -> int:
    """The longest key (UTF-8 bytes) whose outputs all fit topics whose records may be
    ``output_limit`` bytes: an output carries the key twice, as its record key and as its
    ``completion_id`` (whose JSON takes up to 6 bytes per key byte: control characters are
    escaped), and must fit even when cut to its essential fields (``fit``). At most
    ``MAX_KEY_BYTES``; 2,048 bytes at ``fit.MIN_OUTPUT_BYTES``."""
    room = output_limit - fit.RECORD_OVERHEAD_BYTES - fit.ESSENTIAL_ROOM_BYTES
    return max(0, min(MAX_KEY_BYTES, room // 7))


def key_too_large(size: int, limit: int) -> InvalidRecord:
    """A key longer than ``limit`` (``max_key_bytes``: the worker's rule, which replay applies too)."""
    return InvalidRecord("key_too_large", f"key is {size} bytes, limit {limit}")


def oversized(size: int, max_bytes: int) -> InvalidRecord:
    """A value larger than the record limit (the worker's rule, which replay applies too)."""
    return InvalidRecord("oversized", f"value is {size} bytes, limit {max_bytes}")


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
    if kind is _CHUNK:
        return chunk_record(payload, offset, seq, timestamp_ms)
    if kind is _ABORT:
        if payload is not None and not isinstance(payload, dict):
            raise InvalidRecord("invalid_abort", "abort value must be a JSON object")
    elif kind is not _DONE:
        if not isinstance(payload, dict):
            raise InvalidRecord("not_an_object", f"{kind.value} value must be a JSON object")
        validate_request(payload)
    return InputRecord(kind, payload, offset, seq, timestamp_ms)


def chunk_record(payload: Any, offset: int | None, seq: int | None, timestamp_ms: int | None) -> InputRecord:
    """``make_record`` for a chunk, called directly on the per-record paths (no keywords)."""
    if not isinstance(payload, dict):
        raise InvalidRecord("not_an_object", "chunk value must be a JSON object")
    if not _plainly_valid(payload):  # validate_chunk, one call less
        _check_in_order(payload)
    # a chunk id other than the key is folded into the key's completion (the engine counts it):
    # the key is the gateway's completion id, and some providers change the id on every chunk
    # InputRecord(...) without the NamedTuple's Python-level __new__, which costs as much again
    return tuple.__new__(InputRecord, (_CHUNK, payload, offset, seq, timestamp_ms))


def _decode_seq(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRecord("invalid_seq", f"{SEQ_HEADER} must be ASCII decimal, got {raw[:40]!r}")
    return int(raw)


def _decode_kind(raw: bytes | None, value: bytes) -> RecordKind:
    if raw is None or raw == b"":
        return _DONE if _is_done_marker(value) else _CHUNK
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


_STR_OR_NONE = (str, type(None))
_CHUNK_STR_FIELDS = frozenset(("id", "model", "system_fingerprint"))
_DELTA_STR_FIELDS = frozenset(("role", "content", "refusal", "reasoning_content", "reasoning"))
_CALL_STR_FIELDS = frozenset(("id", "type"))
_FUNCTION_STR_FIELDS = frozenset(("name", "arguments"))


def _wrong(detail: str) -> InvalidRecord:
    return InvalidRecord("wrong_type", detail)


def _token_list(value: Any, where: str) -> None:
    if value is None:
        return
    if type(value) is not list or any(type(entry) is not dict for entry in value):
        raise _wrong(f"{where} must be a list of objects or null")


def validate_chunk(chunk: dict[str, Any]) -> None:
    """Check the fields the engine reads; raise ``InvalidRecord`` on the first wrong type.

    Error frames (``{"error": ...}``) and non-chunk frames (``object`` other than
    ``chat.completion.chunk``) are valid records here; the engine decides what they mean.
    Written for speed: it runs on every chunk. ``_plainly_valid`` accepts the common shapes
    field by field; anything else is walked key by key in wire order (so that the first wrong
    type is the one reported), building messages only on failure.
    """
    if not _plainly_valid(chunk):
        _check_in_order(chunk)


_STR_OR_NULL_TYPES = frozenset((str, type(None)))
_INT_OR_NULL_TYPES = frozenset((int, type(None)))
_DICT_OR_NULL_TYPES = frozenset((dict, type(None)))


def is_non_chunk_frame(chunk: dict[str, Any]) -> bool:
    """A frame to skip (and count): its ``object`` is another than ``chat.completion.chunk``
    and it carries no choice data (no choice with a ``delta``, ``finish_reason`` or
    ``logprobs``) and no usage: Azure's content-filter frames (``object: ""``, choices with
    filter results only). A frame of any other object with choice data is folded as a chunk
    (Perplexity ends its streams with ``object: "chat.completion.done"``, finish reason in it)."""
    obj = chunk.get("object")
    if obj is None or obj == CHUNK_OBJECT or chunk.get("usage") is not None:
        return False
    choices = chunk.get("choices")
    return not (
        type(choices) is list
        and any(
            type(c) is dict and (c.get("delta") or c.get("finish_reason") or c.get("logprobs") is not None)
            for c in choices
        )
    )


def _plainly_valid(chunk: dict[str, Any]) -> bool:
    """True only if ``_check_in_order`` has nothing to report for ``chunk``; False means "look
    closer", not "invalid". Checks exactly the fields ``_check_in_order`` checks, by lookup."""
    get = chunk.get
    choices = get("choices")
    if (
        type(choices) is not list
        or get("object") not in (None, CHUNK_OBJECT)
        or type(get("id")) not in _STR_OR_NULL_TYPES
        or type(get("model")) not in _STR_OR_NULL_TYPES
        or type(get("system_fingerprint")) not in _STR_OR_NULL_TYPES
        or type(get("created")) not in _INT_OR_NULL_TYPES
        or type(get("usage")) not in _DICT_OR_NULL_TYPES
    ):
        return False
    for choice in choices:
        if type(choice) is not dict:
            return False
        index = choice.get("index")
        delta = choice.get("delta")
        logprobs = choice.get("logprobs")
        if (
            type(index) is not int
            or index < 0
            or type(choice.get("finish_reason")) not in _STR_OR_NULL_TYPES
            or (logprobs is not None and not _plain_logprobs(logprobs))
        ):
            return False
        if delta is None:
            continue
        if type(delta) is not dict:
            return False
        for key, value in delta.items():
            if key == "tool_calls":
                if type(value) is not list:
                    if value is None:
                        continue
                    return False
                for call in value:
                    if type(call) is not dict or not _plain_call(call):
                        return False
            elif key in _DELTA_STR_FIELDS and type(value) not in _STR_OR_NULL_TYPES:
                return False
    return True


def _plain_call(call: dict[str, Any]) -> bool:
    for key, value in call.items():
        if value is None:
            continue
        if key == "function":
            if type(value) is not dict:
                return False
            for fkey, fvalue in value.items():
                if fkey in _FUNCTION_STR_FIELDS and type(fvalue) not in _STR_OR_NULL_TYPES:
                    return False
        elif key == "index":
            if type(value) is not int or value < 0:
                return False
        elif key in _CALL_STR_FIELDS and type(value) is not str:
            return False
    return True


def _plain_logprobs(logprobs: Any) -> bool:
    if type(logprobs) is not dict:
        return False
    for tokens in (logprobs.get("content"), logprobs.get("refusal")):
        if tokens is not None:
            if type(tokens) is not list:
                return False
            for entry in tokens:
                if type(entry) is not dict:
                    return False
    return True


def _check_in_order(chunk: dict[str, Any]) -> None:
    if chunk.get("error"):
        return
    obj = chunk.get("object")
    if obj is not None:
        if type(obj) is not str:
            raise _wrong("object must be a string")
        if is_non_chunk_frame(chunk):
            return
    choices = None
    for key, value in chunk.items():
        if value is None:
            continue
        if key == "choices":
            if type(value) is not list:
                raise _wrong("chunk.choices must be a list")
            choices = value
        elif key in _CHUNK_STR_FIELDS:
            if type(value) is not str:
                raise _wrong(f"chunk.{key} must be a string or null")
        elif key == "created":
            if type(value) is not int:
                raise _wrong("chunk.created must be an integer")
        elif key == "usage" and type(value) is not dict:
            raise _wrong("chunk.usage must be an object or null")
    for choice in choices or ():
        if type(choice) is not dict:
            raise _wrong("chunk.choices[] must be objects")
        index = choice.get("index")
        if type(index) is not int or index < 0:
            raise _wrong("choice.index must be a non-negative integer")
        for key, value in choice.items():
            if value is None:
                continue
            if key == "delta":
                if type(value) is not dict:
                    raise _wrong("choice.delta must be an object")
                _validate_delta(value)
            elif key == "finish_reason":
                if type(value) is not str:
                    raise _wrong("choice.finish_reason must be a string or null")
            elif key == "logprobs":
                if type(value) is not dict:
                    raise _wrong("choice.logprobs must be an object or null")
                _token_list(value.get("content"), "logprobs.content")
                _token_list(value.get("refusal"), "logprobs.refusal")


def _validate_delta(delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            if type(value) is not list:
                raise _wrong("delta.tool_calls must be a list")
            for call in value:
                _validate_tool_call(call)
        elif key == "content" and type(value) is list:
            _validate_content_parts(value)
        elif key in _DELTA_STR_FIELDS and type(value) is not str:
            raise _wrong(
                "delta.content must be a string, a list of content parts or null"
                if key == "content"
                else f"delta.{key} must be a string or null"
            )


def _validate_content_parts(parts: list[Any]) -> None:
    """``delta.content`` as typed parts (Mistral): objects; a ``text`` part's ``text`` is a
    string, a ``thinking`` part's ``thinking`` a string or a list of such parts. Parts of other
    types are not checked (the engine keeps them as they are)."""
    for part in parts:
        if type(part) is not dict:
            raise _wrong("delta.content[] must be objects")
        kind = part.get("type")
        if kind == "text":
            if type(part.get("text")) is not str:
                raise _wrong("delta.content[].text must be a string")
        elif kind == "thinking":
            thinking = part.get("thinking")
            if type(thinking) is list:
                _validate_content_parts(thinking)
            elif type(thinking) is not str:
                raise _wrong("delta.content[].thinking must be a string or a list of parts")


def _validate_tool_call(call: Any) -> None:
    if type(call) is not dict:
        raise _wrong("delta.tool_calls[] must be objects")
    for key, value in call.items():
        if value is None:
            continue
        if key == "function":
            if type(value) is not dict:
                raise _wrong("tool_call.function must be an object")
            for fkey, fvalue in value.items():
                if fvalue is not None and fkey in _FUNCTION_STR_FIELDS and type(fvalue) is not str:
                    raise _wrong(f"tool_call.function.{fkey} must be a string or null")
        elif key == "index":
            if type(value) is not int or value < 0:
                raise _wrong("tool_call.index must be a non-negative integer")
        elif key in _CALL_STR_FIELDS and type(value) is not str:
            raise _wrong(f"tool_call.{key} must be a string or null")


def _expect(ok: bool, reason: str, detail: str) -> None:
    if not ok:
        raise InvalidRecord(reason, detail)


def _opt_str(obj: dict[str, Any], field: str, where: str) -> None:
    if not isinstance(obj.get(field), _STR_OR_NONE):
        raise _wrong(f"{where}.{field} must be a string or null")


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
