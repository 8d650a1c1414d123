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
    """Compact JSON bytes; non-str dict keys are stringified, floats keep their value, and
    integers of any size are written exactly (jiter parses model output's to Python ints,
    which orjson refuses beyond 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        # rare: a second pass with the big integers as JSON fragments, so every other byte is
        # still orjson's own; a value that fails for another reason fails again here
        return orjson.dumps(_exact_big_ints(value), option=orjson.OPT_NON_STR_KEYS)


_INT_RANGE = range(-(2**63), 2**64)
"""The integers orjson writes itself: int64 and uint64."""


def _exact_big_ints(value: Any) -> Any:
    """``value`` with every integer outside ``_INT_RANGE`` as a JSON fragment of its digits
    (and as the string of its digits where it is a dict key, as OPT_NON_STR_KEYS writes ints)."""
    if isinstance(value, dict):
        return {
            str(k) if type(k) is int and k not in _INT_RANGE else k: _exact_big_ints(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_exact_big_ints(v) for v in value]
    if type(value) is int and value not in _INT_RANGE:
        return orjson.Fragment(str(value).encode("ascii"))
    return value


def embedded(data: bytes) -> Any:
    """A value that ``dumps`` writes as the JSON bytes ``data`` are, without parsing them: for
    output that is already JSON (the caller guarantees it is one valid JSON value)."""
    return orjson.Fragment(data)


def plain(value: Any) -> Any:
    """``value`` with any ``embedded`` JSON in it parsed: a plain JSON value again (jiter keeps
    integers beyond 64 bits exact, where orjson would read them as floats)."""
    return jiter.from_json(dumps(value))


def loads_partial(data: bytes | bytearray) -> Any:
    """Parse a JSON prefix the way openai-python does on deltas (jiter ``partial_mode=True``).

    Raises ``ValueError`` where jiter does (the prefix cannot start a JSON value).
    """
    return jiter.from_json(bytes(data), partial_mode=True)
