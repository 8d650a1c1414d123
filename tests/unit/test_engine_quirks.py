"""Where real providers break openai-python's accumulator, chunkfold stays correct."""

from __future__ import annotations

from typing import Any

import pytest

from chunkfold.config import Settings
from chunkfold.core import engine
from chunkfold.core.codec import dumps as codec_dumps
from chunkfold.core.inputs import InputError
from chunkfold.core.records import InputRecord, InvalidRecord, RecordKind, make_record
from chunkfold.replay import replay_kafka, replay_sdk
from tests.folding import fold_all
from tests.streams import CID, USAGE, choice, chunk, jsonl, structured_request, tool_delta, tools_request

pytestmark = pytest.mark.unit


def kafka(text: str, request: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = list(replay_kafka(text, request, Settings()))
    events = [r["value"] for r in out if r["topic"] == "completion-events"]
    done = [r["value"] for r in out if r["topic"] == "completion-done"]
    assert len(done) == 1
    return events, done[0]


def final(text: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    lines = list(replay_sdk(text, request))
    assert lines[-1]["type"] == "completion", lines[-1]
    completion: dict[str, Any] = lines[-1]["completion"]
    return completion


def test_choices_out_of_order_are_identities() -> None:
    text = jsonl(
        chunk(choice(1, role="assistant", content="B")),
        chunk(choice(0, role="assistant", content="A")),
        chunk(choice(1, content="b", finish_reason="stop")),
        chunk(choice(0, content="a", finish_reason="stop")),
        "[DONE]",
    )
    completion = final(text)
    assert [(c["index"], c["message"]["content"]) for c in completion["choices"]] == [(0, "Aa"), (1, "Bb")]
    events, done = kafka(text)
    assert done["status"] == "completed"
    assert [(e["type"], e["choice_index"]) for e in events if e["type"] == "content.done"] == [
        ("content.done", 1),
        ("content.done", 0),
    ]
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_two_entries_for_one_choice_in_one_chunk_apply_in_order() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content="He"), choice(0, content="llo")),
        chunk(choice(0, finish_reason="stop")),
    )
    assert final(text)["choices"][0]["message"]["content"] == "Hello"
    events, _ = kafka(text)
    assert [e["delta"] for e in events if e["type"] == "content.delta"] == ["He", "llo"]


def test_repeated_role_id_and_name_are_not_concatenated() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", tool_calls=[tool_delta(0, "", id="call_1", name="get_weather")])),
        chunk(
            choice(
                0,
                role="assistant",
                tool_calls=[tool_delta(0, '{"city":"Paris",', id="call_1", name="get_weather")],
            )
        ),
        chunk(choice(0, role="assistant", tool_calls=[tool_delta(0, '"temperature":20}', id="call_1")])),
        chunk(choice(0, finish_reason="tool_calls")),
    )
    message = final(text, tools_request())["choices"][0]["message"]
    assert message["role"] == "assistant"
    call = message["tool_calls"][0]
    assert (call["id"], call["function"]["name"]) == ("call_1", "get_weather")
    assert call["function"]["parsed_arguments"] == {"city": "Paris", "temperature": 20}


def test_missing_tool_call_index_is_inferred_when_one_call_is_open() -> None:
    text = jsonl(
        chunk(
            choice(0, role="assistant", tool_calls=[tool_delta(None, "", id="call_1", name="get_weather")])
        ),
        chunk(choice(0, tool_calls=[tool_delta(None, '{"city":"Oslo","temperature":-3}')])),
        chunk(choice(0, tool_calls=[tool_delta(None, "", id="call_2", name="get_weather")])),
        chunk(choice(0, tool_calls=[tool_delta(None, '{"city":"Rome","temperature":25}')])),
        chunk(choice(0, finish_reason="tool_calls")),
    )
    calls = final(text, tools_request())["choices"][0]["message"]["tool_calls"]
    assert [(c["index"], c["id"], c["function"]["parsed_arguments"]["city"]) for c in calls] == [
        (0, "call_1", "Oslo"),
        (1, "call_2", "Rome"),
    ]
    events, done = kafka(text, tools_request())
    assert [e["index"] for e in events if e["type"] == "tool_calls.function.arguments.done"] == [0, 1]
    assert done["status"] == "completed"


def test_missing_tool_call_index_with_no_open_call_is_rejected() -> None:
    state = engine.fold(None, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant")))).state
    record = InputRecord(RecordKind.CHUNK, chunk(choice(0, tool_calls=[tool_delta(None, "{}")])))
    with pytest.raises(InvalidRecord) as info:
        engine.fold(state, CID, record)
    assert info.value.reason == "ambiguous_tool_call"


def test_usage_is_the_last_reported_value_not_a_sum() -> None:
    early = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    text = jsonl(
        chunk(choice(0, role="assistant", content="Hi"), usage=early),
        chunk(choice(0, content="!", finish_reason="stop"), usage=None),
        chunk(usage=USAGE),
        chunk(usage=None),
    )
    _, done = kafka(text)
    assert done["usage"]["completion_tokens"] == 7
    assert done["usage_reported"] is True
    assert done["completion"]["usage"] == done["usage"]


def test_reasoning_deltas_are_kept_with_their_own_events() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", reasoning_content="Think")),
        chunk(choice(0, reasoning_content="ing.")),
        chunk(choice(0, reasoning="Alt")),
        chunk(choice(0, content="Answer", finish_reason="stop")),
    )
    events, done = kafka(text)
    message = done["completion"]["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking."
    assert message["reasoning"] == "Alt"
    assert [e["delta"] for e in events if e["type"] == "reasoning.delta"] == ["Think", "ing.", "Alt"]
    done_events = [e for e in events if e["type"] == "reasoning.done"]
    assert done_events[0]["reasoning"] == "Thinking."
    sdk_types = {line["type"] for line in replay_sdk(text, None)}
    assert not any(t.startswith("reasoning") for t in sdk_types)
    assert final(text)["choices"][0]["message"]["reasoning_content"] == "Thinking."


def test_error_payload_mid_stream_is_an_api_error() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content="Hel")),
        {"error": {"message": "upstream overloaded", "type": "server_error"}},
        chunk(choice(0, content="lo")),
    )
    lines = list(replay_sdk(text, None))
    assert lines[-1] == {"type": "error", "error": "APIError"}
    assert [line["type"] for line in lines] == ["content.delta", "error"]
    out = list(replay_kafka(text.split("\n", 2)[0] + "\n" + text.split("\n", 2)[1] + "\n", None, Settings()))
    done = [r["value"] for r in out if r["topic"] == "completion-done"]
    assert len(done) == 1
    assert done[0]["status"] == "failed"
    assert done[0]["error"] == {
        "type": "APIError",
        "message": "upstream overloaded",
        "body": {"message": "upstream overloaded", "type": "server_error"},
    }
    assert done[0]["completion"]["choices"][0]["message"]["content"] == "Hel"


def test_length_keeps_the_partial_completion_and_never_passes_truncated_arguments() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", tool_calls=[tool_delta(0, "", id="call_1", name="get_weather")])),
        chunk(choice(0, tool_calls=[tool_delta(0, '{"city":"Par')])),
        chunk(choice(0, finish_reason="length")),
        chunk(usage=USAGE),
    )
    assert list(replay_sdk(text, tools_request()))[-1] == {
        "type": "error",
        "error": "LengthFinishReasonError",
    }
    _, done = kafka(text, tools_request())
    assert done["status"] == "length"
    call = done["completion"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"city":"Par'
    assert call["function"]["parsed_arguments"] is None
    assert done["usage"]["total_tokens"] == 12


def test_content_filter_without_parseable_input_is_reported_at_the_end() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content="abc")), chunk(choice(0, finish_reason="content_filter"))
    )
    lines = list(replay_sdk(text, None))
    assert lines[-1] == {"type": "error", "error": "ContentFilterFinishReasonError"}
    assert "content.done" in [line["type"] for line in lines]
    _, done = kafka(text)
    assert done["status"] == "content_filter"


def test_schema_invalid_structured_output_fails_validation() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content='{"city": 3, "temperature": 1}')),
        chunk(choice(0, finish_reason="stop")),
    )
    assert list(replay_sdk(text, structured_request()))[-1] == {"type": "error", "error": "ValidationError"}
    _, done = kafka(text, structured_request())
    assert done["status"] == "failed"
    assert done["error"]["type"] == "ValidationError"
    assert "city" in done["error"]["message"]
    assert done["completion"]["choices"][0]["message"]["parsed"] is None


def test_structured_output_is_parsed_and_validated() -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content='{"city": "Oslo", ')),
        chunk(choice(0, content='"temperature": -3.5}')),
        chunk(choice(0, finish_reason="stop")),
    )
    events, done = kafka(text, structured_request())
    assert done["completion"]["choices"][0]["message"]["parsed"] == {"city": "Oslo", "temperature": -3.5}
    content_done = [e for e in events if e["type"] == "content.done"]
    assert content_done[0]["parsed"] == {"city": "Oslo", "temperature": -3.5}
    assert all("snapshot" not in e and "parsed" not in e for e in events if e["type"] == "content.delta")


def test_non_chunk_frames_are_skipped_and_counted() -> None:
    azure_filter = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [],
    }
    text = jsonl(
        chunk(choice(0, role="assistant", content="Hi")),
        azure_filter,
        chunk(choice(0, finish_reason="stop")),
    )
    _, done = kafka(text)
    assert done["anomalies"]["skipped_frames"] == 1
    assert done["chunk_count"] == 2


def test_records_after_the_end_and_ends_without_a_start_are_rejected() -> None:
    result = engine.fold(
        None, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content="x")))
    )
    closed = engine.fold(result.state, CID, InputRecord(RecordKind.DONE)).state
    with pytest.raises(InvalidRecord) as info:
        engine.fold(closed, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, content="y"))))
    assert info.value.reason == "after_end"
    with pytest.raises(InvalidRecord) as info:
        engine.fold(None, CID, InputRecord(RecordKind.DONE))
    assert info.value.reason == "unknown_completion"


def test_expire_closes_an_idle_completion_and_then_drops_the_tombstone() -> None:
    state = engine.fold(
        None,
        CID,
        InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content="x")), timestamp_ms=1000),
    ).state
    assert state is not None and engine.idle_since_ms(state) == 1000
    expired = engine.expire(state, 700_000)
    assert expired.done is not None and expired.done["status"] == "expired"
    assert expired.done["completion"]["choices"][0]["message"]["content"] == "x"
    assert expired.state is not None
    assert engine.expire(expired.state, 1_400_000).state is None


def test_replay_rejects_ambiguous_sdk_input() -> None:
    text = jsonl(chunk(choice(0, content="a"), cid="a"), chunk(choice(0, content="b"), cid="b"))
    with pytest.raises(InputError):
        list(replay_sdk(text, None))


def _records(*payloads: dict[str, Any]) -> list[InputRecord]:
    """Chunk records for ``payloads``, then the ``[DONE]`` record."""
    return [*(InputRecord(RecordKind.CHUNK, p) for p in payloads), InputRecord(RecordKind.DONE)]


def _fold_stable_across_state_round_trips(records: list[InputRecord]) -> dict[str, Any]:
    """The done record; the published bytes are the same whether or not the state goes through
    its bytes after every record."""
    out, done, _ = fold_all(records)
    assert fold_all(records, roundtrip=True)[0] == out
    assert done is not None
    return done


def test_a_new_id_at_an_index_in_use_starts_a_new_call_at_the_next_free_index() -> None:
    # Claude behind an OpenAI-compatible API: every call at index 0, told apart by id; the ids
    # are repeated in every delta, which must not start a call.
    def call(call_id: str, arguments: str, name: str | None = None) -> dict[str, Any]:
        return {**tool_delta(0, arguments, id=call_id, name=name), "index": 0}

    records = _records(
        chunk(choice(0, role="assistant", content=None)),
        chunk(choice(0, tool_calls=[call("tooluse_A", "", name="get_weather")])),
        chunk(choice(0, tool_calls=[call("tooluse_A", '{"f":')])),
        chunk(choice(0, tool_calls=[tool_delta(0, "1}")])),
        chunk(choice(0, tool_calls=[call("tooluse_B", "", name="get_weather")])),
        chunk(choice(0, tool_calls=[tool_delta(0, '{"f":2}')])),
        chunk(choice(0, tool_calls=[call("tooluse_B", "")])),
        chunk(choice(0, finish_reason="tool_calls")),
    )
    done = _fold_stable_across_state_round_trips(records)
    calls = done["completion"]["choices"][0]["message"]["tool_calls"]
    assert [(c["index"], c["id"], c["function"]["arguments"]) for c in calls] == [
        (0, "tooluse_A", '{"f":1}'),
        (1, "tooluse_B", '{"f":2}'),
    ]
    text = jsonl(*(r.payload for r in records[:-1]), "[DONE]")
    events, _ = kafka(text)
    deltas = [
        (e["index"], e["arguments_delta"])
        for e in events
        if e["type"] == "tool_calls.function.arguments.delta" and e["arguments_delta"]
    ]
    assert deltas == [(0, '{"f":'), (0, "1}"), (1, '{"f":2}')]
    assert [e["index"] for e in events if e["type"] == "tool_calls.function.arguments.done"] == [0, 1]


def test_two_new_ids_at_one_index_in_one_chunk_are_two_calls() -> None:
    first, second = tool_delta(0, '{"f":1}', id="tooluse_A", name="f"), tool_delta(0, "{}", id="tooluse_B")
    done = _fold_stable_across_state_round_trips(
        _records(chunk(choice(0, role="assistant", tool_calls=[first, second], finish_reason="tool_calls")))
    )
    calls = done["completion"]["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("tooluse_A", '{"f":1}'),
        ("tooluse_B", "{}"),
    ]


def test_one_done_after_an_error_frame_is_taken_quietly_and_survives_a_restore() -> None:
    records = [
        InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content="Hi"))),
        InputRecord(RecordKind.CHUNK, {"id": CID, "error": {"message": "gone", "code": 502}, "usage": USAGE}),
        InputRecord(RecordKind.DONE),
    ]
    for roundtrip in (False, True):
        out, done, state = fold_all(records, roundtrip=roundtrip)
        assert done is not None and done["status"] == "failed"
        assert done["error"]["body"] == {"message": "gone", "code": 502}
        assert done["usage"]["total_tokens"] == USAGE["total_tokens"] and done["usage_reported"] is True
        assert out[-1] == codec_dumps(done)  # the [DONE] published nothing
        with pytest.raises(InvalidRecord, match="after_end"):
            engine.fold(state, CID, InputRecord(RecordKind.DONE, offset=9))


def test_a_chunk_id_other_than_the_key_is_folded_and_counted_with_a_bounded_list() -> None:
    records = [InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content="")))]
    records += [
        InputRecord(RecordKind.CHUNK, chunk(choice(0, content="x"), cid=f"other-{n}")) for n in range(12)
    ]
    records += [InputRecord(RecordKind.CHUNK, chunk(choice(0, content="y"), cid="other-0"))]
    _, done, _ = fold_all([*records, InputRecord(RecordKind.DONE)], roundtrip=True)
    assert done is not None
    assert done["completion"]["choices"][0]["message"]["content"] == "x" * 12 + "y"
    assert done["anomalies"]["id_mismatches"] == 13
    assert done["other_chunk_ids"] == [f"other-{n}" for n in range(8)]


def test_malformed_content_parts_are_wrong_type() -> None:
    for parts in ([7], [{"type": "text", "text": 7}], [{"type": "thinking", "thinking": 7}]):
        with pytest.raises(InvalidRecord, match="wrong_type"):
            make_record(CID, RecordKind.CHUNK, chunk(choice(0, content=parts)))
