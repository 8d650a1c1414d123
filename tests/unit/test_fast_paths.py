"""The per-record fast paths give exactly what the general code gives.

Each fast path handles the common shapes and hands everything else to the general code; these
tests compare the two on generated inputs (including the shapes a fast path must refuse).
"""

from __future__ import annotations

import os
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkfold.core import codec, engine, records, shape, validation
from chunkfold.core.records import InvalidRecord, RecordKind, make_record
from chunkfold.core.state import state_to_dict
from tests.demo.synthetic import KINDS, TOOLS, make_stream
from tests.streams import CID

pytestmark = pytest.mark.unit

SETTINGS = settings(
    max_examples=int(os.environ.get("FAST_PATH_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ANY_SCALAR: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["", "a", "é", "stop", "chat.completion.chunk"]),
)
ANY_VALUE: st.SearchStrategy[Any] = st.recursive(
    ANY_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["index", "token", "x", "arguments", "function"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, sometimes anything (a wrong type, or a shape the fast path refuses)."""
    return st.one_of(good, good, good, ANY_VALUE)


@st.composite
def _fields(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A dict of some of ``fields`` in a drawn order, sometimes with an unknown key."""
    names = draw(st.permutations(sorted(fields)))
    kept = [n for n in names if draw(st.integers(0, 5)) > 0]
    out = {name: draw(fields[name]) for name in kept}
    if draw(st.integers(0, 6)) == 0:
        out["extra"] = draw(ANY_VALUE)
    return out


FUNCTION = _fields(
    {"name": _often(st.sampled_from(["f", "g", ""])), "arguments": _often(st.sampled_from(["", "{", "1}"]))}
)
CALL = _fields(
    {
        "index": _often(st.integers(0, 2)),
        "id": _often(st.sampled_from(["call_a", "call_b"])),
        "type": _often(st.just("function")),
        "function": _often(FUNCTION),
    }
)
TOKEN = _fields({"token": st.just("a"), "logprob": st.just(-0.5), "bytes": st.just([97])})
LOGPROBS = _fields({"content": _often(st.lists(_often(TOKEN), max_size=2)), "refusal": _often(st.none())})
DELTA = _fields(
    {
        "content": _often(st.sampled_from(["", "Hi", " é🙂"])),
        "refusal": _often(st.sampled_from(["", "no"])),
        "reasoning": _often(st.just("think")),
        "role": _often(st.just("assistant")),
        "tool_calls": _often(st.lists(_often(CALL), min_size=1, max_size=2)),
    }
)
CHOICE = _fields(
    {
        "index": _often(st.integers(0, 1)),
        "delta": _often(DELTA),
        "finish_reason": _often(st.sampled_from(["stop", "length", "tool_calls"])),
        "logprobs": _often(st.one_of(st.none(), LOGPROBS)),
    }
)
CHUNK = _fields(
    {
        "id": _often(st.just(CID)),
        "object": _often(st.just("chat.completion.chunk")),
        "created": _often(st.just(1)),
        "model": _often(st.just("m")),
        "system_fingerprint": _often(st.just("fp")),
        "usage": _often(st.one_of(st.none(), st.just({"completion_tokens": 1}))),
        "choices": _often(st.lists(_often(CHOICE), max_size=2)),
        "error": st.one_of(st.none(), st.none(), ANY_VALUE),
    }
)


def _outcome(check: Any, chunk: dict[str, Any]) -> str | None:
    try:
        check(chunk)
    except InvalidRecord as exc:
        return str(exc)
    return None


@SETTINGS
@given(CHUNK)
def test_chunk_validation_reports_what_the_ordered_walk_reports(chunk: dict[str, Any]) -> None:
    ordered = _outcome(records._check_in_order, chunk)
    if records._plainly_valid(chunk):
        assert ordered is None
    assert _outcome(records.validate_chunk, chunk) == ordered


def test_chunk_validation_takes_the_fast_path_on_the_usual_chunks() -> None:
    for kind in KINDS:
        for record in make_stream(kind, 64).records[1:-1]:
            assert records._plainly_valid(orjson.loads(record.value)), (kind, record.value)


# ---------------------------------------------------------------------------------------------
# the engine's one-choice fast path against the general path


def _fold_all(payloads: list[Any], plain: bool, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every output of folding ``payloads`` (one record each, then [DONE]) as bytes."""
    with monkeypatch.context() as patched:
        if not plain:
            patched.setattr(engine, "fold_plain_chunk", lambda *args: False)
        out: list[bytes] = []
        state: Any = None
        request = {"model": "m", "messages": [], "tools": TOOLS}
        kinds = [
            (RecordKind.REQUEST, request),
            *((RecordKind.CHUNK, p) for p in payloads),
            (RecordKind.DONE, None),
        ]
        for offset, (kind, payload) in enumerate(kinds):
            try:
                record = make_record(CID, kind, payload, offset=offset, timestamp_ms=1000 + offset)
                result = engine.fold(state, CID, record)
            except InvalidRecord as exc:
                out.append(f"invalid {exc}".encode())
                continue
            state = result.state
            body = [result.events, result.done, result.stream_error, result.skipped]
            out.append(codec.dumps([body, state_to_dict(state) if state is not None else None]))
        return out


CONTINUATIONS = st.lists(
    st.one_of(
        st.builds(lambda text: {"content": text}, st.sampled_from(["", "a", " é🙂"])),
        st.builds(
            lambda index, args: {"tool_calls": [{"index": index, "function": {"arguments": args}}]},
            st.integers(0, 2),
            st.sampled_from(["", "{", '"a"']),
        ),
        DELTA,
    ),
    max_size=12,
)


@SETTINGS
@given(CONTINUATIONS, st.lists(st.integers(0, 11), max_size=3), st.lists(CHUNK, max_size=2))
def test_fast_fold_path_matches_the_general_path(
    deltas: list[dict[str, Any]], finishes: list[int], odd: list[dict[str, Any]]
) -> None:
    monkeypatch = pytest.MonkeyPatch()
    first = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": ""}}],
    }
    payloads: list[Any] = [
        {"id": CID, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": first}]}
    ]
    for i, delta in enumerate(deltas):
        entry: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        if i in finishes:
            entry["finish_reason"] = "stop"
        payloads.append({"id": CID, "object": "chat.completion.chunk", "choices": [entry], "usage": None})
    payloads[1:1] = odd
    assert _fold_all(payloads, True, monkeypatch) == _fold_all(payloads, False, monkeypatch)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_fold_path_matches_the_general_path_on_synthetic_streams(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = [orjson.loads(r.value) for r in make_stream(kind, 96).records[1:-1]]
    assert _fold_all(payloads, True, monkeypatch) == _fold_all(payloads, False, monkeypatch)


# ---------------------------------------------------------------------------------------------
# logprob entries


TOP = _fields({"token": st.just("a"), "logprob": st.just(-0.5), "bytes": st.one_of(st.none(), st.just([97]))})
TOKEN_ENTRY = st.one_of(
    _fields(
        {
            "token": st.sampled_from(["a", ""]),
            "logprob": st.floats(-9, 0),
            "bytes": st.one_of(st.none(), st.just([97])),
            "top_logprobs": st.one_of(
                st.none(), st.lists(st.one_of(TOP, TOP, ANY_VALUE), max_size=3), ANY_VALUE
            ),
        }
    ),
    ANY_VALUE,
)


@SETTINGS
@given(TOKEN_ENTRY)
def test_token_fast_path_gives_what_normalize_gives(item: Any) -> None:
    expected = shape.normalize(item, shape.TOKEN_LOGPROB)
    got = shape.token_logprob(item)
    assert got == expected
    assert orjson.dumps(got) == orjson.dumps(expected)  # same key order too


def _plain_normalize(value: Any, node: shape.ShapeNode) -> Any:
    """``shape.normalize`` as plainly defined: the reference for its fast paths."""
    if node is None or value is None:
        return value
    if isinstance(node, shape.ListOf):
        return [_plain_normalize(v, node.item) for v in value] if isinstance(value, list) else value
    if not isinstance(value, dict):
        return value
    out = {name: _plain_normalize(value.get(name), sub) for name, sub in node.items()}
    out.update((k, v) for k, v in value.items() if k not in node)
    return out


COMPLETION = st.fixed_dictionaries(
    {
        "id": st.just(CID),
        "choices": st.lists(
            _fields(
                {
                    "index": st.integers(0, 1),
                    "logprobs": _often(_fields({"content": _often(st.lists(TOKEN_ENTRY, max_size=3))})),
                    "message": _often(
                        _fields({"content": st.just("x"), "tool_calls": _often(st.lists(CALL))})
                    ),
                }
            ),
            max_size=2,
        ),
    },
    optional={"usage": _often(st.just({"completion_tokens": 1})), "extra": ANY_VALUE},
)


@SETTINGS
@given(COMPLETION)
def test_normalize_gives_what_its_plain_definition_gives(completion: dict[str, Any]) -> None:
    expected = _plain_normalize(completion, shape.COMPLETION)
    assert orjson.dumps(shape.normalize(completion, shape.COMPLETION)) == orjson.dumps(expected)


def test_the_completion_shape_shares_the_token_logprob_shape() -> None:
    logprobs = shape.CHOICE["logprobs"]
    assert isinstance(logprobs, dict)
    for name in ("content", "refusal"):
        node = logprobs[name]
        assert isinstance(node, shape.ListOf) and node.item is shape.TOKEN_LOGPROB


def test_token_fast_path_is_taken_for_the_wire_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    item = {
        "token": "a",
        "logprob": -0.5,
        "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}],
    }
    expected = shape.normalize(item, shape.TOKEN_LOGPROB)
    monkeypatch.setattr(shape, "normalize", None)
    assert orjson.dumps(shape.token_logprob(item)) == orjson.dumps(expected)


# ---------------------------------------------------------------------------------------------
# the quick schema check in front of jsonschema

SCALAR_SCHEMA: st.SearchStrategy[Any] = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(
                st.sampled_from(
                    ["string", "integer", "number", "boolean", "null", "object", "array", "date"]
                ),
                st.lists(st.sampled_from(["string", "integer", "null", "number"]), max_size=2),
            ),
            "enum": st.one_of(st.lists(st.sampled_from(["a", "b", ""]), max_size=3), st.just([1, "a"])),
            "description": st.just("d"),
            "minimum": st.just(0),
            "const": st.just("a"),
        },
    ),
    st.booleans(),
    st.just({"$ref": "#/$defs/Item"}),
    st.just({"$ref": "#/$defs/Missing"}),
)
SCHEMA: st.SearchStrategy[Any] = st.recursive(
    SCALAR_SCHEMA,
    lambda inner: st.one_of(
        st.builds(
            lambda props, required, additional, typed: {
                **({"type": "object"} if typed else {}),
                "properties": props,
                "required": required,
                **({} if additional is None else {"additionalProperties": additional}),
            },
            st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
            st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
            st.one_of(st.none(), st.booleans(), inner),
            st.booleans(),
        ),
        st.builds(lambda items: {"type": "array", "items": items}, inner),
        st.builds(lambda branches: {"anyOf": branches}, st.lists(inner, max_size=2)),
        st.builds(lambda branches: {"oneOf": branches}, st.lists(inner, min_size=1, max_size=2)),
    ),
    max_leaves=8,
)
JSON: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-2, 2),
        st.sampled_from([1.0, 0.5, float("inf")]),
        st.sampled_from(["a", "b", "", "z"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, max_size=4)
    ),
    max_leaves=10,
)


@SETTINGS
@given(SCHEMA, st.one_of(st.none(), SCHEMA), JSON)
def test_schema_check_accepts_only_what_jsonschema_accepts(schema: Any, item: Any, value: Any) -> None:
    if isinstance(schema, dict) and item is not None:
        schema = {**schema, "$defs": {"Item": item}}
    if validation._accepts(codec.dumps(schema), value):
        assert not list(jsonschema.Draft202012Validator(schema).iter_errors(value))


def test_schema_check_accepts_the_synthetic_arguments_and_content() -> None:
    for kind in ("tools", "structured"):
        state: Any = None
        for r in make_stream(kind, 96).records[:-1]:
            completion_id, record = records.decode_record(r.key, r.value, r.headers, offset=r.offset)
            state = engine.fold(state, completion_id, record).state
        checked = [
            (state.spec.tools[t.name].schema_json, t.arguments_text())
            for cs in state.choices.values()
            for t in cs.tools.values()
        ]
        if kind == "structured":
            checked.append((state.spec.response_schema_json, state.choices[0].text_of("content")))
        assert checked
        for schema_json, text in checked:
            assert validation._accepts(schema_json, codec.loads_value(text)), text


def test_schema_errors_still_come_from_jsonschema() -> None:
    schema_json = codec.dumps(TOOLS[0]["function"]["parameters"])
    with pytest.raises(validation.SchemaValidationError, match="'units' is a required property"):
        validation.parse_and_validate('{"city": "Paris", "state": "", "days": 1, "notes": []}', schema_json)
    with pytest.raises(validation.SchemaValidationError, match=r"^days: 1\.5 is not of type 'integer'"):
        validation.parse_and_validate(
            '{"city": "Paris", "state": "", "units": "c", "days": 1.5, "notes": []}', schema_json
        )
