"""SSE / JSON Lines framing of captures (``chunkfold.core.inputs``)."""

from __future__ import annotations

import pytest

from chunkfold.core.inputs import detect_format, frames_to_keys, iter_frames, iter_sse_events
from chunkfold.core.records import RecordKind

pytestmark = pytest.mark.unit


def test_sse_framing_follows_the_spec() -> None:
    text = "\ufeff: keep-alive comment\r\ndata: one\r\n\r\nevent: x\nid: 7\ndata: two\ndata: lines\n\n:c\rdata:three\r\r"
    assert [event.data for event in iter_sse_events(text)] == ["one", "two\nlines", "three"]


def test_a_last_event_the_input_does_not_terminate_is_discarded_as_the_spec_says() -> None:
    assert [event.data for event in iter_sse_events("data: a\n\ndata: [DONE]")] == ["a"]
    assert [event.data for event in iter_sse_events('data: a\r\n\r\ndata: {"id"')] == ["a"]


def test_the_event_type_belongs_to_its_own_event_only() -> None:
    events = list(iter_sse_events("event: error\ndata: x\n\ndata: y\n\n"))
    assert [(event.event, event.data, event.line) for event in events] == [("error", "x", 2), ("", "y", 4)]


@pytest.mark.parametrize(
    ("data", "payload"),
    [
        ('{"error": {"message": "m", "code": 7}}', {"error": {"message": "m", "code": 7}}),
        ('{"message": "m", "code": 7}', {"error": {"message": "m", "code": 7}}),
        ("upstream timed out", {"error": {"message": "upstream timed out"}}),
    ],
)
def test_an_sse_error_event_is_an_error_frame(data: str, payload: dict[str, object]) -> None:
    text = f'data: {{"id": "c1", "choices": []}}\n\nevent: error\ndata: {data}\n\n'
    frames = list(iter_frames(text))
    assert [(f.kind, f.payload) for f in frames[1:]] == [(RecordKind.CHUNK, payload)]
    assert [key for key, _ in frames_to_keys(frames)] == ["c1", "c1"]


def test_chunks_without_id_anywhere_are_one_completion() -> None:
    text = 'data: {"id": "", "choices": []}\n\ndata: {"choices": []}\n\ndata: [DONE]\n\n'
    assert [key for key, _ in frames_to_keys(iter_frames(text))] == ["", "", ""]


def test_a_chunk_with_an_empty_id_joins_the_completion_around_it() -> None:
    text = '{"id": "", "choices": []}\n{"id": "a", "choices": []}\n{"id": "", "choices": []}\n'
    assert [key for key, _ in frames_to_keys(iter_frames(text))] == ["a", "a", "a"]


def test_format_detection() -> None:
    assert detect_format(": hi\n\ndata: {}\n\n") == "sse"
    assert detect_format('\n{"id": "x"}\n') == "jsonl"


def test_an_sse_response_is_one_completion_per_stream_whatever_ids_its_chunks_carry() -> None:
    text = (
        'data: {"id": "a1", "choices": []}\n\ndata: {"id": "a2", "choices": []}\n\ndata: [DONE]\n\n'
        'data: {"id": "", "choices": []}\n\ndata: {"id": "b1", "choices": []}\n\n'
        'data: {"id": "stub", "choices": []}\n\ndata: [DONE]\n\n'
        'data: {"choices": []}\n\ndata: [DONE]\n\n'
    )
    keys = [key for key, _ in frames_to_keys(iter_frames(text))]
    assert keys == ["a1", "a1", "a1", "b1", "b1", "b1", "b1", "", ""]


def test_json_lines_keep_grouping_interleaved_completions_by_id() -> None:
    text = '{"id": "a", "choices": []}\n{"id": "b", "choices": []}\n{"id": "a", "choices": []}\n[DONE]\n'
    assert [key for key, _ in frames_to_keys(iter_frames(text))] == ["a", "b", "a", "a"]
