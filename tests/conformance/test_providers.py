"""What chunkfold makes of the streams real OpenAI-compatible providers send
(``tests/fixtures/providers``): the same result in replay and in the worker, no dead letter,
and where openai-python handles the stream, the same events and completion in SDK mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chunkfold.config import Settings
from chunkfold.core.inputs import iter_sse_events
from chunkfold.gateway import GatewayRecord, capture_records
from chunkfold.replay import replay_kafka, replay_sdk
from tests.conformance.test_differential import assert_same, sdk_replay
from tests.harness import TIMING_FREE, offline_run

pytestmark = pytest.mark.conformance

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
Json = dict[str, Any]


class Outcome:
    """One fixture's completion as replay publishes it, checked against the worker's."""

    def __init__(self, name: str) -> None:
        self.text = (FIXTURES / f"{name}.sse").read_text()
        records = list(replay_kafka(self.text, None, Settings()))
        done = [r["value"] for r in records if r["topic"] == "completion-done"]
        assert len(done) == 1, f"{name}: {len(done)} done records"
        self.done: Json = done[0]
        self.events: list[Json] = [r["value"] for r in records if r["topic"] == "completion-events"]
        self.key: str = done[0]["completion_id"]
        self._check_the_worker_agrees(name)

    def _check_the_worker_agrees(self, name: str) -> None:
        streams = capture_records(self.text, unnamed_key=name)
        assert len(streams) == 1
        ((key, records),) = streams.items()
        if records[-1].value != b"[DONE]":  # a gateway ends every stream it relays
            records.append(GatewayRecord(key.encode(), b"[DONE]", []))
        events, done, deadletters = offline_run(records)
        assert deadletters == []
        (worker_done,) = done.values()
        for field in TIMING_FREE:
            assert worker_done[field] == self.done[field], field
        assert [e["type"] for e in events.get(key, [])] == [e["type"] for e in self.events]

    @property
    def message(self) -> Json:
        message: Json = self.done["completion"]["choices"][0]["message"]
        return message

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of_type(self, event_type: str, field: str) -> list[Any]:
        return [e[field] for e in self.events if e["type"] == event_type]


def sdk_agrees(name: str) -> None:
    """``--format sdk`` gives exactly what openai-python gives for the fixture's frames."""
    text = (FIXTURES / f"{name}.sse").read_text()
    frames = [event.data for event in iter_sse_events(text) if event.data.strip() != "[DONE]"]
    assert_same(list(replay_sdk(text, None)), sdk_replay(frames, None, []))


def test_content_as_typed_parts_folds_text_into_content_and_thinking_into_reasoning() -> None:
    out = Outcome("mistral_magistral_parts")
    assert out.done["status"] == "completed"
    assert out.message["content"] == "2 + 2 = 4"
    assert out.message["reasoning"] == "The user asks 2+2. That is 4."
    assert out.message["content_parts"] == [{"type": "reference", "reference_ids": [3]}]
    assert out.done["anomalies"]["unknown_content_parts"] == 1
    assert out.of_type("content.delta", "delta") == ["", "2 + 2 = ", "4", ""]
    assert out.of_type("reasoning.delta", "delta") == ["The user asks 2+2. ", "That is 4."]
    assert out.of_type("reasoning.done", "reasoning") == ["The user asks 2+2. That is 4."]
    assert out.of_type("content.done", "content") == ["2 + 2 = 4"]
    assert out.done["usage"]["total_tokens"] == 40


def test_an_error_inside_a_chunk_fails_the_completion_keeps_its_usage_and_takes_the_done_after_it() -> None:
    out = Outcome("openrouter_error_chunk")
    assert out.done["status"] == "failed"
    assert out.done["error"] == {
        "type": "APIError",
        "message": "Provider disconnected",
        "body": {"code": 502, "message": "Provider disconnected", "metadata": {"provider_name": "Fireworks"}},
    }
    assert out.done["usage_reported"] is True
    assert out.done["usage"]["total_tokens"] == 14
    assert out.message["content"] == "Let me think"
    sdk_agrees("openrouter_error_chunk")


def test_an_sse_error_event_keeps_the_code_and_failed_generation() -> None:
    out = Outcome("groq_tool_use_failed")
    assert out.done["status"] == "failed"
    body = out.done["error"]["body"]
    assert body["code"] == "tool_use_failed"
    assert body["failed_generation"] == '<function=get_weather>{"city": "Paris"}</function>'
    assert out.done["error"]["message"].startswith("Failed to call a function.")
    sdk_agrees("groq_tool_use_failed")


def test_chunk_ids_that_change_on_every_chunk_are_one_completion() -> None:
    out = Outcome("groq_compound_changing_ids")
    assert out.key == "chatcmpl-c1"
    assert out.done["completion"]["id"] == "chatcmpl-c1"
    assert out.message["content"] == "The weather is sunny."
    assert out.done["completion"]["choices"][0]["finish_reason"] == "stop"
    assert out.done["usage"]["total_tokens"] == 56
    assert out.done["anomalies"]["id_mismatches"] == 5
    assert out.done["other_chunk_ids"] == ["chatcmpl-c2", "chatcmpl-c3", "chatcmpl-c4", "chatcmpl-c5", "stub"]
    assert out.message["role"] == "assistant"  # openai-python: "assistantassistant..." (role repeated)


def test_empty_ids_are_one_completion_and_empty_refusal_deltas_no_refusal_events() -> None:
    out = Outcome("snowflake_empty_ids")
    assert out.key == ""
    assert out.message["content"] == "Hello there!"
    assert not [t for t in out.types() if t.startswith("refusal.")]
    assert out.message["refusal"] == ""  # what the wire said, as the SDK keeps it
    sdk_types = [line["type"] for line in replay_sdk(out.text, None)]
    assert sdk_types.count("refusal.delta") == 3 and sdk_types.count("refusal.done") == 1
    sdk_agrees("snowflake_empty_ids")


def test_a_last_frame_of_another_object_with_choices_is_folded() -> None:
    out = Outcome("perplexity_done_object")
    assert out.done["completion"]["choices"][0]["finish_reason"] == "stop"
    assert out.done["anomalies"]["skipped_frames"] == 0
    assert out.message["content"] == "Paris is the capital."
    assert out.done["usage"]["total_tokens"] == 11
    assert out.done["completion"]["citations"] == ["https://example.org/a"]
    # openai-python folds that frame too, but concatenates the repeated role: no SDK comparison


def test_two_tool_calls_at_one_index_are_two_calls() -> None:
    out = Outcome("claude_same_index_tools")
    calls = out.message["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("tooluse_A", '{"city":"Oslo"}'),
        ("tooluse_B", '{"city":"Rome"}'),
    ]
    assert out.of_type("tool_calls.function.arguments.done", "index") == [0, 1]


def test_an_identity_field_repeated_in_every_delta_is_kept_once() -> None:
    out = Outcome("groq_gpt_oss_channel")
    assert out.message["channel"] == "final"
    assert out.message["reasoning"] == "Simple greeting."
    assert out.message["content"] == "Hi!"
    sdk_agrees("groq_gpt_oss_channel")  # the SDK concatenates: --format sdk does too


def test_list_deltas_are_appended_and_indexed_entries_merged() -> None:
    out = Outcome("openrouter_annotations_reasoning_details")
    assert [a["url_citation"]["url"] for a in out.message["annotations"]] == [
        "https://example.org/w",
        "https://example.org/x",
    ]
    assert out.message["reasoning_details"] == [
        {"type": "reasoning.text", "text": "Look up.", "index": 0, "format": "unknown"}
    ]
    assert out.message["content"] == "It is 5 C."
    # openai-python raises RuntimeError on a list delta whose entries have no index


def test_a_repeated_object_and_identity_are_kept_once_and_streamed_text_appended() -> None:
    out = Outcome("copilot_annotations_object")
    assert out.message["copilot_annotations"] == {"CodeVulnerability": []}
    assert out.message["cot_id"] == "cot-7"
    assert out.message["cot_summary"] == "Writing a stub."
    assert out.message["content"] == "def f(): pass"


def test_filter_frames_without_choice_data_are_skipped_and_counted() -> None:
    out = Outcome("azure_filter_frames")
    assert out.done["anomalies"]["skipped_frames"] == 2
    assert out.done["completion"]["id"] == "chatcmpl-az1"
    assert out.message["content"] == "Hello"
    sdk_agrees("azure_filter_frames")


def test_every_fixture_has_a_test() -> None:
    source = Path(__file__).read_text()
    fixtures = sorted(FIXTURES.glob("*.sse"))
    assert len(fixtures) >= 11
    for fixture in fixtures:
        assert f'Outcome("{fixture.stem}")' in source, f"{fixture.name} has no test"
