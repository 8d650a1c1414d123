"""The one place bytes cross into and out of Python values: orjson out, orjson in, jiter for partial JSON."""

from __future__ import annotations

from typing import Any

import jiter
import orjson


class DecodeError(ValueError):
    """The bytes are not valid JSON (or not valid UTF-8)."""


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document; raises ``DecodeError`` with a one-line reason."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(reason(exc)) from None


loads_raw = orjson.loads
"""``loads`` without its wrapper, for the per-record path: raises ``RawDecodeError`` instead,
whose ``reason(exc)`` is the message of the ``DecodeError`` that ``loads`` raises."""
RawDecodeError = orjson.JSONDecodeError


def reason(exc: ValueError) -> str:
    """The one-line reason of a parse error."""
    return str(exc).splitlines()[0]


def loads_value(data: bytes | str) -> Any:
    """Parse a complete JSON value as pydantic (and so openai-python) does, with jiter:
    numbers beyond float range become ``inf`` instead of an error."""
    try:
        return jiter.from_json(data.encode("utf-8") if isinstance(data, str) else data)
    except ValueError as exc:
        raise DecodeError(str(exc).splitlines()[0]) from None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; non-str dict keys are stringified, floats keep their value."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def embedded(data: bytes) -> Any:
    """A value that ``dumps`` writes as the JSON bytes ``data`` are, without parsing them: for
    output that is already JSON (the caller guarantees it is one valid JSON value)."""
    return orjson.Fragment(data)


def plain(value: Any) -> Any:
    """``value`` with any ``embedded`` JSON in it parsed: a plain JSON value again."""
    return orjson.loads(dumps(value))


def loads_partial(data: bytes | bytearray) -> Any:
    """Parse a JSON prefix the way openai-python does on deltas (jiter ``partial_mode=True``).

    Raises ``ValueError`` where jiter does (the prefix cannot start a JSON value).
    """
    return jiter.from_json(bytes(data), partial_mode=True)
