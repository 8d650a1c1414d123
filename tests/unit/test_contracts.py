"""The contracts downstream services build on.

- ``schemas/chunkfold_schemas/json/*.json`` equal a fresh ``python -m chunkfold_schemas.generate`` (stale files fail, with
  the command to run), are canonical draft 2020-12 documents, and accept every record the
  engine publishes (replay over the recorded API streams, and the worker's record processor
  with bad input, aborts and expiry) while rejecting malformed ones, as the pydantic models do.
- The input records' schemas (chunk, abort) and models accept exactly the values the worker
  folds and reject the ones it dead-letters for their shape (recorded streams, hand-made frames
  and generated chunks, compared with the worker's own decoding).
- ``schemas/chunkfold_schemas/asyncapi.yaml`` is valid against the official AsyncAPI 3.0 JSON schema (npm
  @asyncapi/specs, checked with the jsonschema package) and parses with the official AsyncAPI
  parser (npm @asyncapi/parser, run with node), and names the worker's real topics, headers,
  consumer group and schema files (every JSON payload is a generated schema file).
- ``schemas`` imports nothing from ``worker`` (nor Kafka or Faust), and ``examples/consumer.py``
  parses published records with it.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft202012Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS
from pydantic import ValidationError
from referencing.jsonschema import DRAFT7

from chunkfold.config import Settings
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER, InvalidRecord, RecordKind, decode_record
from chunkfold.gateway import GatewayRecord, capture_records
from chunkfold.processor import Processor
from chunkfold.replay import replay_kafka
from chunkfold.state.memory import MemoryStore
from chunkfold_schemas import generate
from chunkfold_schemas.abort import AbortRecord, parse_abort
from chunkfold_schemas.chunk import CHUNK_OBJECT, ChatCompletionChunk, ErrorFrame, NonChunkFrame, parse_chunk
from chunkfold_schemas.done import parse_done
from chunkfold_schemas.events import parse_event
from tests.harness import feed
from tests.recorded import recordings
from tests.unit.npm_tools import node_dir, package_version, run_node

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas" / "chunkfold_schemas"
ASYNCAPI = SCHEMAS / "asyncapi.yaml"
EXAMPLE = ROOT / "examples" / "consumer.py"
ASYNCAPI_SPECS_VERSION = "6.11.1"
NOT_FOR_SCHEMAS = (
    "chunkfold",
    "worker",
    "tests",
    "faust",
    "mode",
    "aiokafka",
    "kafka",
    "rocksdict",
    "orjson",
    "jiter",
)


def schema_validator(name: str) -> Draft202012Validator:
    schema = json.loads((generate.JSON_DIR / f"{name}.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validators_by_topic(settings: Settings) -> dict[str, Draft202012Validator]:
    return {
        settings.events_topic: schema_validator("completion-event"),
        settings.done_topic: schema_validator("completion-done"),
        settings.deadletter_topic: schema_validator("dead-letter"),
    }


def errors_of(validator: Draft202012Validator, value: Any) -> list[str]:
    return [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(value)]


# -- generated JSON schemas ---------------------------------------------------------------------


def test_committed_json_schemas_are_fresh() -> None:
    problems = generate.stale()
    assert not problems, (
        f"schemas/chunkfold_schemas/json does not match the pydantic models ({', '.join(problems)}): "
        "run `python -m chunkfold_schemas.generate` and commit schemas/chunkfold_schemas/json"
    )


def test_a_stale_or_missing_schema_file_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "json"
    shutil.copytree(generate.JSON_DIR, directory)
    done = directory / "completion-done.json"
    done.write_text(done.read_text().replace('"completed"', '"finished"', 1))
    (directory / "request-context.json").unlink()
    (directory / "old-record.json").write_text("{}\n")
    assert set(generate.stale(directory)) == {
        "completion-done.json: stale",
        "request-context.json: missing",
        "old-record.json: not generated",
    }
    assert generate.main(["--check", "--out", str(directory)]) == 1
    (directory / "old-record.json").unlink()
    assert generate.main(["--out", str(directory)]) == 0
    assert generate.main(["--check", "--out", str(directory)]) == 0


def test_schema_files_are_canonical_draft_2020_12() -> None:
    files = sorted(generate.JSON_DIR.glob("*.json"))
    assert [p.name for p in files] == sorted(
        [
            "request-context.json",
            "completion-chunk.json",
            "abort.json",
            "completion-event.json",
            "completion-done.json",
            "dead-letter.json",
            "completion-snapshot.json",
        ]
    )
    for path in files:
        text = path.read_text()
        schema = json.loads(text)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
        assert text == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n", path.name
    assert generate.generated() == generate.generated()


# -- records the engine publishes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [Settings(), Settings(snapshots=True, partial_parse=True)], ids=["plain", "snapshots"]
)
def test_replayed_records_match_the_schemas(settings: Settings) -> None:
    validators = validators_by_topic(settings)
    failures: list[str] = []
    per_topic: Counter[str] = Counter()
    event_types: set[str] = set()
    statuses: set[str] = set()
    recorded = recordings()
    assert recorded, "no recorded streams found"
    for rec in recorded:
        for out in replay_kafka(rec.sse.read_text(), rec.request, settings):
            value = orjson.loads(orjson.dumps(out["value"]))  # as it travels: JSON bytes
            per_topic[out["topic"]] += 1
            failures += [f"{rec.name} {out['topic']} {e}" for e in errors_of(validators[out["topic"]], value)]
            if out["topic"] == settings.events_topic:
                event_types.add(value["type"])
            else:
                statuses.add(value["status"])
    assert not failures, "\n".join(failures[:20])
    assert per_topic[settings.done_topic] >= len(recorded)
    assert per_topic[settings.events_topic] > per_topic[settings.done_topic]
    assert {
        "content.delta",
        "content.done",
        "refusal.done",
        "tool_calls.function.arguments.done",
        "logprobs.content.done",
    } <= event_types
    assert {"completed", "length"} <= statuses


def test_recorded_request_contexts_match_the_schema() -> None:
    validator = schema_validator("request-context")
    for rec in recordings():
        assert errors_of(validator, rec.request) == [], rec.name


def _bad_records(key: bytes) -> list[GatewayRecord]:
    return [
        GatewayRecord(key, b"{not json", []),
        GatewayRecord(key, b'{"id": "x"}', [(KIND_HEADER, b"nonsense")]),
        GatewayRecord(key, b"[DONE]", [(SEQ_HEADER, b"-1")]),
        GatewayRecord(key, b"\xff\xfe", []),
    ]


def test_worker_outputs_match_the_schemas() -> None:
    """The worker's record processor (what the Faust agent runs), without a broker: whole
    recorded streams, an aborted one, one left open until it expires, and bad records."""
    settings = Settings()
    validators = validators_by_topic(settings)
    processor = Processor(settings, MemoryStore())
    processor.assign([0])
    now_ms = 1_700_000_000_000
    recorded = recordings()
    records: list[GatewayRecord] = []
    for rec in recorded:
        for stream in capture_records(rec.sse.read_text(), rec.request).values():
            records += stream
    first = next(
        iter(capture_records(recorded[0].sse.read_text(), recorded[0].request, key_suffix="-cut").values())
    )
    records += [
        *first[:3],
        GatewayRecord(first[0].key, b'{"reason": "client gone"}', [(KIND_HEADER, b"abort")]),
    ]
    second = next(iter(capture_records(recorded[1].sse.read_text(), None, key_suffix="-idle").values()))
    records += second[:3]
    bad = _bad_records(b"bad-key")
    records += bad
    outputs = [(o.topic, o.key, o.value) for out in feed(processor, records, base_ms=now_ms) for o in out]
    outputs += [(o.topic, o.key, o.value) for o in processor.sweep(now_ms=int(time.time() * 1000) + 10**9)]

    failures = []
    statuses: Counter[str] = Counter()
    for topic, key, value in outputs:
        record = json.loads(value)
        failures += [f"{topic} {key!r} {e}" for e in errors_of(validators[topic], record)]
        if topic == settings.done_topic:
            statuses[record["status"]] += 1
    assert not failures, "\n".join(failures[:20])
    topics = Counter(topic for topic, _, _ in outputs)
    assert topics[settings.deadletter_topic] == len(bad)
    assert statuses["aborted"] == 1
    assert statuses["expired"] == 1
    assert statuses["completed"] >= 1


def _published_sample() -> tuple[dict[str, Any], dict[str, Any]]:
    """A done record and a tool-arguments event as the engine publishes them."""
    done: dict[str, Any] | None = None
    event: dict[str, Any] | None = None
    for rec in recordings():
        for out in replay_kafka(rec.sse.read_text(), rec.request, Settings()):
            if out["topic"] == "completion-done" and out["value"]["status"] == "completed":
                done = done or out["value"]
            elif out["value"].get("type") == "tool_calls.function.arguments.done":
                event = event or out["value"]
        if done and event:
            return done, event
    raise AssertionError("no completed completion with a tool call in the recordings")


def _broken(value: dict[str, Any], **changes: Any) -> dict[str, Any]:
    broken: dict[str, Any] = json.loads(json.dumps(value))
    for name, new in changes.items():
        if new is None:
            del broken[name]
        else:
            broken[name] = new
    return broken


def test_the_schemas_reject_what_the_models_reject() -> None:
    done, event = _published_sample()
    done_schema, event_schema = schema_validator("completion-done"), schema_validator("completion-event")
    assert errors_of(done_schema, done) == [] and errors_of(event_schema, event) == []
    bad_done = [
        _broken(done, status="finished"),
        _broken(done, timing=None),
        _broken(done, version=2),
        _broken(done, surprise=True),
    ]
    bad_events = [
        _broken(event, type="tool_calls.function.arguments.finished"),
        _broken(event, seq=-1),
        _broken(event, index=None),
        _broken(event, arguments_delta="{"),
    ]
    for value in bad_done:
        assert errors_of(done_schema, value), value
        with pytest.raises(ValidationError):
            parse_done(json.dumps(value))
    for value in bad_events:
        assert errors_of(event_schema, value), value
        with pytest.raises(ValidationError):
            parse_event(json.dumps(value))
    # The schemas are the strict contract: pydantic's lax parsing would accept a numeric
    # string, a JSON Schema validator must not.
    assert errors_of(done_schema, _broken(done, chunk_count="12"))


# -- input records: the schemas say what the worker folds ---------------------------------------------


def worker_verdict(kind: RecordKind, value: bytes, key: str = "k") -> str | None:
    """None when the worker folds this value as a record of ``kind``, else its dead-letter reason."""
    try:
        decode_record(key.encode(), value, [(KIND_HEADER, kind.value.encode())])
    except InvalidRecord as exc:
        return exc.reason
    return None


def _key_of(chunk: Any) -> str:
    """The record key a gateway would use: the chunk's own id (a chunk whose id is another is
    folded all the same, so the key decides nothing here)."""
    chunk_id = chunk.get("id") if isinstance(chunk, dict) else None
    return chunk_id if isinstance(chunk_id, str) and chunk_id else "k"


def _chunk_verdicts(chunk: Any) -> tuple[str | None, bool, bool]:
    """The worker's verdict on a chunk value, whether the JSON Schema accepts it, whether the
    model does."""
    value = orjson.dumps(chunk)
    try:
        parse_chunk(value)
        model_ok = True
    except ValidationError:
        model_ok = False
    return (
        worker_verdict(RecordKind.CHUNK, value, _key_of(chunk)),
        not errors_of(chunk_schema(), chunk),
        model_ok,
    )


@functools.cache
def chunk_schema() -> Draft202012Validator:
    return schema_validator("completion-chunk")


@functools.cache
def abort_schema() -> Draft202012Validator:
    return schema_validator("abort")


def test_recorded_chunks_match_the_chunk_schema() -> None:
    chunks = 0
    for rec in recordings():
        for stream in capture_records(rec.sse.read_text(), rec.request).values():
            for record in stream:
                if dict(record.headers).get(KIND_HEADER) or record.value == b"[DONE]":
                    continue
                chunk = json.loads(record.value)
                assert _chunk_verdicts(chunk) == (None, True, True), (rec.name, record.value[:200])
                assert type(parse_chunk(record.value)) is ChatCompletionChunk
                chunks += 1
    assert chunks > 100


AZURE_FILTER_FRAME = {
    "choices": [],
    "created": 0,
    "id": "",
    "model": "",
    "object": "",
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
}
GOOD_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "content": "Hi",
                "reasoning_content": "hm",
                "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{"}}],
                "provider_extra": [1],
            },
            "finish_reason": None,
            "logprobs": {"content": [{"token": "Hi", "logprob": -0.1}], "refusal": None},
        }
    ],
    "usage": None,
    "service_tier": "default",
}


@pytest.mark.parametrize(
    ("chunk", "verdict", "model"),
    [
        (GOOD_CHUNK, None, ChatCompletionChunk),
        ({}, None, ChatCompletionChunk),
        ({"choices": None, "id": None, "object": None}, None, ChatCompletionChunk),
        ({"choices": [{"index": 0, "delta": None}], "error": None}, None, ChatCompletionChunk),
        ({"error": {"message": "overloaded"}, "choices": "not a list"}, None, ErrorFrame),
        ({"error": "boom", "object": 5}, None, ErrorFrame),
        (AZURE_FILTER_FRAME, None, NonChunkFrame),
        ({"object": "chat.completion", "choices": 1}, None, NonChunkFrame),
        ({"object": 5}, "wrong_type", None),
        ({"error": 0, "choices": 1}, "wrong_type", None),
        ({"error": {}, "choices": [{"index": "0"}]}, "wrong_type", None),
        ({"choices": [{"delta": {}}]}, "wrong_type", None),
        ({"choices": [{"index": -1}]}, "wrong_type", None),
        ({"choices": [{"index": 1.5}]}, "wrong_type", None),
        ({"choices": [{"index": True}]}, "wrong_type", None),
        ({"choices": [{"index": 0, "delta": {"content": 5}}]}, "wrong_type", None),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1}]}}]}, "wrong_type", None),
        (
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"name": 1}}]}}]},
            "wrong_type",
            None,
        ),
        ({"choices": [{"index": 0, "logprobs": {"content": [1]}}]}, "wrong_type", None),
        ({"choices": [{"index": 0, "finish_reason": 1}]}, "wrong_type", None),
        ({"created": "1"}, "wrong_type", None),
        ({"usage": []}, "wrong_type", None),
        ([GOOD_CHUNK], "not_an_object", None),
        ("chunk", "not_an_object", None),
    ],
)
def test_the_chunk_schema_accepts_what_the_worker_folds(
    chunk: Any, verdict: str | None, model: type | None
) -> None:
    value = orjson.dumps(chunk)
    assert worker_verdict(RecordKind.CHUNK, value, _key_of(chunk)) == verdict
    schema_ok = not errors_of(chunk_schema(), chunk)
    assert schema_ok is (verdict is None)
    if model is None:
        with pytest.raises(ValidationError):
            parse_chunk(value)
    else:
        assert type(parse_chunk(value)) is model


def test_integral_floats_are_the_one_thing_json_schema_cannot_refuse() -> None:
    """JSON Schema takes 1.0 for the integer 1; the worker and the model do not (the schema's
    description says so)."""
    chunk = {"choices": [{"index": 1.0}]}
    assert worker_verdict(RecordKind.CHUNK, orjson.dumps(chunk)) == "wrong_type"
    with pytest.raises(ValidationError):
        parse_chunk(orjson.dumps(chunk))
    assert not errors_of(chunk_schema(), chunk)


# Generated chunks: well-typed ones with one value replaced by any JSON value, and ones where any
# field may hold any JSON value.
_SCALAR: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.5, -1.5]),  # not 1.0: see the test above
    st.sampled_from(["", "a", CHUNK_OBJECT, "chat.completion"]),
)
_ANY: st.SearchStrategy[Any] = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["index", "x"]), inner, max_size=2)
    ),
    max_leaves=4,
)
Field = Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]]


def _often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, sometimes any JSON value."""
    return st.one_of(good, good, good, _ANY)


def _chunks(field: Field) -> st.SearchStrategy[dict[str, Any]]:
    """Chunks whose fields are drawn from ``field(<a well-typed value>)``, any of them absent."""

    def some_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({}, optional={**fields, "extra": _ANY})

    text = st.sampled_from(["", "Hi", None])
    function = some_of({"name": field(text), "arguments": field(text)})
    call = some_of(
        {
            "index": field(st.integers(0, 1) | st.none()),
            "id": field(st.sampled_from(["call_1", None])),
            "type": field(st.just("function")),
            "function": field(function | st.none()),
        }
    )
    delta = some_of(
        {
            **{
                name: field(text) for name in ("role", "content", "refusal", "reasoning_content", "reasoning")
            },
            "tool_calls": field(st.lists(field(call), max_size=2) | st.none()),
        }
    )
    tokens = st.lists(field(st.just({"token": "a", "logprob": -0.5})), max_size=2) | st.none()
    choice = some_of(
        {
            "index": field(st.integers(0, 1)),
            "delta": field(delta | st.none()),
            "finish_reason": field(st.sampled_from(["stop", None])),
            "logprobs": field(some_of({"content": field(tokens), "refusal": field(tokens)}) | st.none()),
        }
    )
    return some_of(
        {
            "id": field(st.sampled_from(["chatcmpl-1", "", None])),
            "object": field(st.sampled_from([CHUNK_OBJECT, None])),
            "created": field(st.just(1) | st.none()),
            "model": field(text),
            "system_fingerprint": field(text),
            "usage": field(st.just({"total_tokens": 1}) | st.none()),
            "choices": field(st.lists(field(choice), max_size=2) | st.none()),
            "error": field(st.none()),
        }
    )


_FIELDS = {
    "chunk": ("id", "object", "created", "model", "system_fingerprint", "usage", "choices", "error", "extra"),
    "choice": ("index", "delta", "finish_reason", "logprobs", "extra"),
    "delta": ("role", "content", "refusal", "reasoning_content", "reasoning", "tool_calls", "extra"),
    "call": ("index", "id", "type", "function", "extra"),
    "function": ("name", "arguments", "extra"),
    "logprobs": ("content", "refusal", "extra"),
    "token": ("token", "logprob", "extra"),
}
_CHILD = {
    ("chunk", "choices"): "choice",
    ("choice", "delta"): "delta",
    ("choice", "logprobs"): "logprobs",
    ("delta", "tool_calls"): "call",
    ("call", "function"): "function",
    ("logprobs", "content"): "token",
    ("logprobs", "refusal"): "token",
}


def _places(node: dict[str, Any], level: str) -> Iterator[tuple[Any, Sequence[Any]]]:
    """Every (object or list, its keys or indexes) in a chunk."""
    yield node, _FIELDS[level]
    for key, value in node.items():
        child = _CHILD.get((level, key))
        if child and isinstance(value, dict):
            yield from _places(value, child)
        elif child and isinstance(value, list) and value:
            yield value, range(len(value))
            for item in value:
                yield from _places(item, child)


@st.composite
def _one_value_replaced(draw: st.DrawFn) -> dict[str, Any]:
    chunk: dict[str, Any] = copy.deepcopy(draw(_chunks(lambda good: good)))
    container, keys = draw(st.sampled_from(list(_places(chunk, "chunk"))))
    container[draw(st.sampled_from(keys))] = draw(_ANY)
    return chunk


FULL_CHUNK: dict[str, Any] = {
    **GOOD_CHUNK,
    "system_fingerprint": "fp_1",
    "usage": {"completion_tokens": 1, "prompt_tokens": 2, "total_tokens": 3},
    "error": None,
    "choices": [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "content": "Hi",
                "refusal": None,
                "reasoning_content": "hm",
                "reasoning": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{"},
                    }
                ],
            },
            "finish_reason": None,
            "logprobs": {"content": [{"token": "Hi", "logprob": -0.1}], "refusal": [{"token": "no"}]},
        }
    ],
}
REPLACEMENTS: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    1,
    -1,
    0.5,
    "",
    "a",
    CHUNK_OBJECT,
    [],
    [1],
    [{}],
    {},
    {"index": 0},
)
_DELETE = object()


def _single_changes() -> Iterator[tuple[str, Any]]:
    """FULL_CHUNK with one field (or list item) replaced by each of REPLACEMENTS, or deleted."""
    for place, (_, keys) in enumerate(_places(FULL_CHUNK, "chunk")):
        for key in keys:
            for new in (*REPLACEMENTS, _DELETE):
                chunk = copy.deepcopy(FULL_CHUNK)
                container = list(_places(chunk, "chunk"))[place][0]
                if new is _DELETE:
                    if isinstance(container, list) or key not in container:
                        continue
                    del container[key]
                else:
                    container[key] = new
                yield f"place {place} [{key!r}] = {'deleted' if new is _DELETE else repr(new)}", chunk


def test_single_changes_to_a_chunk_get_one_verdict_from_the_worker_the_schema_and_the_model() -> None:
    verdicts: Counter[str | None] = Counter()
    disagreements = []
    for change, chunk in _single_changes():
        verdict, schema_ok, model_ok = _chunk_verdicts(chunk)
        verdicts[verdict] += 1
        folded = verdict is None
        if schema_ok != folded or model_ok != folded:
            disagreements.append(f"{change}: worker {verdict}, schema {schema_ok}, model {model_ok}")
    assert not disagreements, "\n".join(disagreements[:20])
    assert verdicts[None] > 100 and verdicts["wrong_type"] > 100, verdicts


@settings(
    max_examples=int(os.environ.get("CONTRACT_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.one_of(_one_value_replaced(), _chunks(_often)))
def test_generated_chunks_get_the_same_verdict_from_the_worker_the_schema_and_the_model(
    chunk: dict[str, Any],
) -> None:
    verdict, schema_ok, model_ok = _chunk_verdicts(chunk)
    event(f"worker: {verdict or 'folded'}")
    assert verdict in (None, "wrong_type")
    assert schema_ok is (verdict is None), errors_of(chunk_schema(), chunk)
    assert model_ok is (verdict is None)


@pytest.mark.parametrize(
    ("value", "verdict", "parsed"),
    [
        (b"", None, None),
        (b"  \n", None, None),
        (b"null", None, None),
        (b'{"reason": "client gone"}', None, AbortRecord(reason="client gone")),
        (b"{}", None, AbortRecord()),
        (
            b'{"reason": 5, "upstream": {"status": 502}}',
            None,
            AbortRecord(reason=5, upstream={"status": 502}),
        ),
        (b'"client gone"', "invalid_abort", ...),
        (b"[]", "invalid_abort", ...),
        (b"{not json", "invalid_json", ...),
    ],
)
def test_the_abort_schema_accepts_what_the_worker_folds(
    value: bytes, verdict: str | None, parsed: AbortRecord | None
) -> None:
    assert worker_verdict(RecordKind.ABORT, value) == verdict
    if verdict is None:
        assert parse_abort(value) == parsed
        if value.strip():
            assert not errors_of(abort_schema(), json.loads(value))
    else:
        with pytest.raises(ValidationError):
            parse_abort(value)
        if verdict != "invalid_json":
            assert errors_of(abort_schema(), json.loads(value))


# -- AsyncAPI ----------------------------------------------------------------------------------------


def asyncapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text())
    return doc


@pytest.fixture(scope="module")
def asyncapi_validator() -> Draft7Validator:
    """The official AsyncAPI 3.0.0 JSON schema (one bundled draft-07 document whose definitions
    carry their own $id), from the npm package @asyncapi/specs."""
    assert package_version("@asyncapi/specs") == ASYNCAPI_SPECS_VERSION
    spec_file = node_dir() / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0.json"
    spec = json.loads(spec_file.read_text())
    registry = METASCHEMAS.with_resource(spec["$id"], DRAFT7.create_resource(spec)).crawl()
    return Draft7Validator(spec, registry=registry)


def asyncapi_errors(validator: Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{e.json_path}: {e.message[:300]}" for e in validator.iter_errors(doc)]


def test_asyncapi_document_is_valid_against_the_official_schema(asyncapi_validator: Draft7Validator) -> None:
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert asyncapi_errors(asyncapi_validator, doc) == []


def test_broken_asyncapi_documents_are_rejected_by_the_official_schema(
    asyncapi_validator: Draft7Validator,
) -> None:
    variants: list[dict[str, Any]] = []
    doc = asyncapi()
    del doc["info"]
    variants.append(doc)
    doc = asyncapi()
    doc["operations"]["foldChunks"]["action"] = "subscribe"  # AsyncAPI 2 vocabulary
    variants.append(doc)
    doc = asyncapi()
    doc["channels"]["completionChunks"]["bindings"]["kafka"]["partitions"] = 0
    variants.append(doc)
    doc = asyncapi()
    doc["components"]["messages"]["chunk"]["payload"] = "chunk"
    variants.append(doc)
    for variant in variants:
        assert asyncapi_errors(asyncapi_validator, variant)


def test_asyncapi_document_passes_the_official_parser(tmp_path: Path) -> None:
    result = run_node("parse-asyncapi.mjs", str(ASYNCAPI))
    serious = [d for d in result["diagnostics"] if d["severity"] <= 1]  # 0 error, 1 warning
    assert result["valid"] and not serious, json.dumps(result["diagnostics"], indent=1)

    # ... and the parser resolves the payload files: a reference to a missing one fails.
    shutil.copytree(generate.JSON_DIR, tmp_path / "json")
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(ASYNCAPI.read_text().replace("./json/completion-done.json", "./json/nope.json"))
    result = run_node("parse-asyncapi.mjs", str(broken))
    assert not result["valid"]
    assert any("nope.json" in d["message"] for d in result["diagnostics"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_asyncapi_document_describes_the_worker() -> None:
    doc = asyncapi()
    settings = Settings()

    for ref in _refs(doc):
        if ref.startswith("#/"):
            _resolve(doc, ref)  # raises KeyError if dangling
        else:
            assert (SCHEMAS / ref).is_file(), ref

    channels = doc["channels"]
    by_address = {channel["address"]: channel for channel in channels.values()}
    assert set(by_address) == {
        settings.input_topic,
        settings.events_topic,
        settings.done_topic,
        settings.deadletter_topic,
    }
    for channel in channels.values():
        assert channel["bindings"]["kafka"]["partitions"] == settings.partitions

    def messages(address: str) -> list[dict[str, Any]]:
        return [_resolve(doc, m["$ref"]) for m in by_address[address]["messages"].values()]

    # Every contract's schema file is the payload of a message on its topic, or (a query
    # listener's body, no topic) a schema of its own in components/schemas.
    schema_refs = {json.dumps(schema) for schema in doc["components"]["schemas"].values()}
    for contract in generate.CONTRACTS:
        refs = (
            schema_refs
            if contract.topic is None
            else {json.dumps(m["payload"]) for m in messages(contract.topic)}
        )
        assert any(f"./json/{contract.name}.json" in ref for ref in refs), contract.name

    # Every JSON payload is a generated schema file (no hand-written copy of a record's shape).
    for name, message in doc["components"]["messages"].items():
        if message["contentType"] == "application/json":
            assert set(message["payload"]) == {"schemaFormat", "schema"}, name
            assert message["payload"]["schema"]["$ref"].startswith("./json/"), name

    # Every message is keyed (Kafka key binding, directly or through a trait).
    for name, message in doc["components"]["messages"].items():
        bindings = [message.get("bindings", {})] + [
            _resolve(doc, t["$ref"]).get("bindings", {}) for t in message.get("traits", [])
        ]
        assert any("key" in b.get("kafka", {}) for b in bindings), name

    # The input topic's headers are the worker's.
    headers = doc["components"]["schemas"]["inputHeaders"]["properties"]
    assert set(headers) == {KIND_HEADER, SEQ_HEADER}
    assert set(headers[KIND_HEADER]["enum"]) == {kind.value for kind in RecordKind}
    seq = _resolve(doc, headers[SEQ_HEADER]["$ref"])
    assert all(re.search(seq["pattern"], s) for s in ("0", "17"))
    assert not any(re.search(seq["pattern"], s) for s in ("-1", "x", ""))
    kinds = set()
    for message in messages(settings.input_topic):
        for part in message["headers"]["allOf"]:
            kinds.add(part.get("properties", {}).get(KIND_HEADER, {}).get("const"))
    assert kinds - {None} == {kind.value for kind in RecordKind}

    operations = doc["operations"]
    receives = [op for op in operations.values() if op["action"] == "receive"]
    assert [_resolve(doc, op["channel"]["$ref"])["address"] for op in receives] == [settings.input_topic]
    assert receives[0]["bindings"]["kafka"]["groupId"]["enum"] == [settings.app_id]
    sends = {
        _resolve(doc, op["channel"]["$ref"])["address"]
        for op in operations.values()
        if op["action"] == "send"
    }
    assert sends == {settings.events_topic, settings.done_topic, settings.deadletter_topic}


# -- schemas as a standalone package ---------------------------------------------------------------


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_schemas_sources_import_nothing_from_the_worker() -> None:
    for path in sorted(SCHEMAS.glob("*.py")):
        assert not _imported_top_levels(path) & set(NOT_FOR_SCHEMAS), path.name


def test_importing_schemas_loads_nothing_from_the_worker() -> None:
    """Every schemas module imports in a fresh interpreter that refuses the worker's modules."""
    code = f"""
import importlib, pkgutil, sys
BLOCKED = {NOT_FOR_SCHEMAS!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("schemas imported " + name)
        return None
sys.meta_path.insert(0, Block())
import chunkfold_schemas
for info in pkgutil.iter_modules(chunkfold_schemas.__path__):
    importlib.import_module("chunkfold_schemas." + info.name)
import json
print(json.dumps(sorted(m for m in sys.modules if m.startswith("chunkfold_schemas"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert {
        "chunkfold_schemas.done",
        "chunkfold_schemas.events",
        "chunkfold_schemas.deadletter",
        "chunkfold_schemas.request",
        "chunkfold_schemas.chunk",
        "chunkfold_schemas.abort",
        "chunkfold_schemas.generate",
    } <= loaded


def load_example() -> ModuleType:
    name = "chunkfold_example_consumer"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_example_consumer_uses_only_schemas() -> None:
    imported = _imported_top_levels(EXAMPLE)
    assert "chunkfold_schemas" in imported
    assert not imported & {"chunkfold", "tests", "faust", "mode"}


def test_example_consumer_parses_published_records() -> None:
    example = load_example()
    done_value, event_value = _published_sample()
    done = example.parse_record("completion-done", orjson.dumps(done_value))
    event = example.parse_record("completion-events", orjson.dumps(event_value))
    assert type(done).__name__ == "DoneRecord" and done.status == "completed"
    assert event.type == "tool_calls.function.arguments.done"

    seen = example.Deduplicator()
    assert seen.first_time(done) and not seen.first_time(done)
    assert seen.first_time(event) and not seen.first_time(event)
    assert example.describe(done).startswith(f"{done.completion_id}: completed")
    assert event.name in example.describe(event)

    with pytest.raises(ValueError, match="not a chunkfold output topic"):
        example.parse_record("completion-chunks", orjson.dumps(done_value))
    with pytest.raises(ValidationError):
        example.parse_record("completion-done", orjson.dumps(_broken(done_value, status="finished")))
