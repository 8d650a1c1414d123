"""Schemas from request contexts and values from model output are untrusted (chunkfold issue
10, items 4 and 5): an invalid schema is ignored and said so, a ``$ref`` is never fetched nor
followed forever, regexes run in linear time, validation has a deterministic budget per
completion, and integers of any size are written exactly."""

from __future__ import annotations

import urllib.request
from typing import Any

import jsonschema
import orjson
import pytest

from chunkfold.core import codec, validation
from chunkfold.core.records import InputRecord, RecordKind
from chunkfold.core.state import CompletionState, decode_state, encode_state
from tests.folding import fold_all
from tests.streams import LOCATION_SCHEMA, choice, chunk, tool_delta

pytestmark = pytest.mark.unit

BIG = 123456789012345678901234567890


def structured(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "S", "schema": schema}},
    }


def content_records(request: dict[str, Any], *contents: str) -> list[InputRecord]:
    """The request, then each content on its own choice (index 0, 1, ...), finished, then [DONE]."""
    records = [InputRecord(RecordKind.REQUEST, request, offset=0)]
    for i, content in enumerate(contents):
        records.append(InputRecord(RecordKind.CHUNK, chunk(choice(i, role="assistant", content=content))))
        records.append(InputRecord(RecordKind.CHUNK, chunk(choice(i, finish_reason="stop"))))
    records.append(InputRecord(RecordKind.DONE))
    return records


def finished(records: list[InputRecord]) -> tuple[list[bytes], dict[str, Any]]:
    """``fold_all``, checked to publish the same bytes when the state is restored after each record."""
    out, done, _ = fold_all(records)
    assert done is not None
    assert fold_all(records, roundtrip=True)[0] == out
    return out, done


def parsed_of(done: dict[str, Any], index: int = 0) -> Any:
    return done["completion"]["choices"][index]["message"]["parsed"]


# -- invalid schemas: ignored, the output parsed without validation, the done record says why ----


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "strnig"}, "type: 'strnig' is not valid under any of the given schemas"),
        ({"type": "string", "pattern": "["}, "pattern: '[' is not a 'regex'"),
        ({"pattern": "^(?=a)a$"}, "pattern: '^(?=a)a$' is not a 'regex'"),  # lookahead: not linear
        ({"patternProperties": {"(a)\\1": {}}}, "is not a 'regex'"),  # backreference
        ({"$schema": ["not", "a", "uri"]}, "TypeError"),
        ({"required": "city"}, "required: 'city' is not of type 'array'"),
    ],
)
def test_an_invalid_response_schema_is_ignored_and_reported(schema: dict[str, Any], problem: str) -> None:
    out, done = finished(content_records(structured(schema), '"x"'))
    assert done["status"] == "completed"
    assert done["error"]["type"] == "SchemaError"
    assert done["error"]["message"].startswith("response_format schema ignored, output not validated")
    assert problem in done["error"]["message"]
    assert parsed_of(done) == "x"
    content_done = orjson.loads(out[-2])
    assert (content_done["type"], content_done["parsed"]) == ("content.done", "x")


def test_an_invalid_strict_tool_schema_is_ignored_and_reported() -> None:
    request = {
        "model": "m",
        "messages": [],
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": 5}, "strict": True}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": 6}}},  # not strict: unused
        ],
    }
    records = [
        InputRecord(RecordKind.REQUEST, request),
        InputRecord(
            RecordKind.CHUNK,
            chunk(choice(0, role="assistant", tool_calls=[tool_delta(0, '{"a": 1}', "c", "f")])),
        ),
        InputRecord(RecordKind.CHUNK, chunk(choice(0, finish_reason="tool_calls"))),
        InputRecord(RecordKind.DONE),
    ]
    _, done = finished(records)
    assert done["status"] == "completed"
    assert done["error"]["type"] == "SchemaError"
    assert done["error"]["message"].startswith("tool 'f' parameters schema ignored")
    call = done["completion"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["parsed_arguments"] == {"a": 1}


def test_output_that_is_not_json_still_fails_under_an_ignored_schema() -> None:
    _, done = finished(content_records(structured({"type": "strnig"}), "not json"))
    assert done["status"] == "failed"
    assert done["error"]["type"] == "ValidationError"


def test_a_valid_schema_is_checked_once_and_still_validates() -> None:
    _, done = finished(content_records(structured(LOCATION_SCHEMA), '{"city": "Paris"}'))
    assert done["status"] == "failed"
    assert done["error"] == {
        "type": "ValidationError",
        "message": "choice 0 content: (root): 'temperature' is a required property",
    }


# -- $ref: never fetched, never followed forever ---------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [{"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}],
    ids=["root", "defs"],
)
def test_a_self_referring_ref_fails_validation_without_recursing_forever(schema: dict[str, Any]) -> None:
    _, done = finished(content_records(structured(schema), '"x"'))
    assert done["status"] == "failed"
    assert done["error"] == {
        "type": "ValidationError",
        "message": "choice 0 content: not validated: the schema's evaluation nests deeper than "
        f"{validation.MAX_DEPTH} levels",
    }


def test_a_remote_ref_is_never_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a $ref was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    schema = {"$ref": "https://schemas.example.invalid/s.json"}
    _, done = finished(content_records(structured(schema), '"x"'))
    assert done["status"] == "failed"
    assert done["error"]["type"] == "ValidationError"
    assert "Unresolvable: https://schemas.example.invalid/s.json" in done["error"]["message"]
    assert parsed_of(done) is None


# -- regexes in linear time ------------------------------------------------------------------


def test_a_catastrophic_pattern_is_decided_at_once() -> None:
    """``^(a+)+$`` backtracks exponentially on ``a...a!`` in ``re`` (28 a's took ~26 s, 40 take
    days); RE2 decides it in linear time."""
    text = '"' + "a" * 40 + '!"'
    _, done = finished(content_records(structured({"type": "string", "pattern": "^(a+)+$"}), text))
    assert done["status"] == "failed"
    assert done["error"]["message"] == f"choice 0 content: (root): '{'a' * 40}!' does not match '^(a+)+$'"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^\\d$"},
        {"type": "object", "patternProperties": {"^\\d$": {}}, "additionalProperties": False},
        {"type": "object", "patternProperties": {"^\\d$": {}}, "unevaluatedProperties": False},
        {"type": "object", "propertyNames": {"pattern": "^\\d$"}},
    ],
    ids=["pattern", "additionalProperties", "unevaluatedProperties", "propertyNames"],
)
def test_every_regex_runs_on_re2(schema: dict[str, Any]) -> None:
    """RE2's ``\\d`` is ASCII (as ECMA-262's), ``re``'s matches any Unicode digit: an Arabic-Indic
    three is rejected exactly when the regex ran on RE2."""
    value = "\u0663" if schema.get("type") == "string" else {"\u0663": 1}
    with pytest.raises(validation.SchemaValidationError):
        validation.parse_and_validate(orjson.dumps(value).decode(), codec.dumps(schema))
    assert validation.parse_and_validate(
        orjson.dumps("3" if "pattern" in schema else {"3": 1}).decode(), codec.dumps(schema)
    )


def test_other_users_of_jsonschema_keep_re() -> None:
    jsonschema.validate("\u0663", {"pattern": "^\\d$"})  # outside chunkfold's validation: re semantics


def test_the_quick_check_never_runs_a_schema_pattern() -> None:
    """It declines any schema with ``pattern``: jsonschema (on RE2) decides those."""
    schema_json = codec.dumps({"type": "string", "pattern": "^(a+)+$"})
    assert validation._accepts(schema_json, "a" * 40 + "!") is False


# -- a deterministic validation budget per completion ----------------------------------------

BOMB = {
    "$defs": {
        "n": {
            "anyOf": [
                {"type": "array", "items": {"$ref": "#/$defs/n"}},
                {"type": "array", "items": {"$ref": "#/$defs/n"}},
            ]
        }
    },
    "$ref": "#/$defs/n",
}
"""Two identical branches at every level: ``[[[...[1]...]]]`` is evaluated 2^depth times."""


def test_an_exponential_schema_runs_out_of_budget_and_later_validations_are_refused() -> None:
    deep = "[" * 40 + "1" + "]" * 40
    records = content_records(structured(BOMB), deep)
    out, done = finished(records)
    assert done["status"] == "failed"
    assert done["error"]["message"] == (
        "choice 0 content: not validated: the validation budget "
        f"({validation.VALIDATION_STEPS} steps per completion) ran out"
    )
    assert parsed_of(done) is None
    # the stream failed at the content.done of choice 0: no more events
    assert [orjson.loads(e).get("type") for e in out[:-1]] == ["content.delta"]
    _, _, state = fold_all(records[:-1])
    assert isinstance(state, CompletionState)
    assert state.counters.validation_steps == validation.VALIDATION_STEPS
    restored = decode_state(encode_state(state))
    assert isinstance(restored, CompletionState) and restored.counters == state.counters
    # a value the quick check cannot accept now needs budget the completion no longer has
    left = validation.Budget(validation.VALIDATION_STEPS - restored.counters.validation_steps)
    with pytest.raises(validation.SchemaValidationError, match="the completion's validation budget is spent"):
        validation.parse_and_validate('"x"', codec.dumps(BOMB), left)


def test_a_budget_spent_in_part_carries_over_a_restore() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1}}}  # not quick
    records = content_records(structured(schema), '{"city": "P"}')
    _, _, state = fold_all(records[:-1])
    assert isinstance(state, CompletionState)
    spent = state.counters.validation_steps
    assert 0 < spent < validation.VALIDATION_STEPS
    restored = decode_state(encode_state(state))
    assert isinstance(restored, CompletionState) and restored.counters.validation_steps == spent


# -- integers of any size ---------------------------------------------------------------------


def test_an_integer_over_64_bits_is_written_exactly() -> None:
    out, done = finished(content_records(structured({"type": "object"}), f'{{"a": {BIG}}}'))
    assert done["status"] == "completed" and done["error"] is None
    assert parsed_of(done) == {"a": BIG}
    assert f'"parsed":{{"a":{BIG}}}'.encode() in out[-1]  # the done record
    content_done = out[-2]
    assert content_done.endswith(f'"parsed":{{"a":{BIG}}},"seq":1}}'.encode())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**64 - 1, b"18446744073709551615"),  # the largest orjson writes itself
        (2**64, b"18446744073709551616"),
        (-(2**63), b"-9223372036854775808"),
        (-(2**63) - 1, b"-9223372036854775809"),
        (
            [1.5, 1e16, None, True, "\u00e9", {"k": [-(10**40)]}],
            '[1.5,1e+16,null,true,"\u00e9",{"k":[-10000000000000000000000000000000000000000]}]'.encode(),
        ),
        (
            {10**30: "big key", 7: "small key", "t": (1, 10**25)},
            b'{"1000000000000000000000000000000":"big key","7":"small key","t":[1,10000000000000000000000000]}',
        ),
    ],
)
def test_dumps_writes_big_integers_exactly_and_the_rest_as_orjson(value: Any, expected: bytes) -> None:
    assert codec.dumps(value) == expected


def test_dumps_still_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        codec.dumps({"a": 10**30, "b": object()})
