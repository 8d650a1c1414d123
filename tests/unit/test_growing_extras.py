"""Strings of ``message_extra`` that stream (an audio answer's ``data`` and ``transcript``,
legacy ``function_call.arguments``, a provider's own text field) cost what each delta adds, in
memory, per chunk and in the changelog, as content does: a leaf appended to becomes a
``bytearray`` buffer in place, written append-only, and the outputs are what they were."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from chunkfold.core import engine, persist
from chunkfold.core.completion import sdk_final
from chunkfold.core.records import InputRecord, RecordKind
from chunkfold.core.state import (
    EXTRA_TEXT_VERSION,
    STATE_VERSION,
    CompletionState,
    decode_state,
    encode_state,
    split_text_leaves,
    text_leaves,
)
from tests.streams import CID, choice, chunk

pytestmark = pytest.mark.unit

AUDIO_PIECE = base64.b64encode(bytes(range(256)) * 12).decode()  # 4 KB of base64 per chunk


def audio_chunks(n: int) -> list[dict[str, Any]]:
    first = chunk(choice(0, role="assistant", audio={"id": "audio_1", "data": "", "transcript": ""}))
    rest = [chunk(choice(0, audio={"data": AUDIO_PIECE, "transcript": f"w{i} "})) for i in range(n)]
    last = chunk(choice(0, finish_reason="stop"))
    return [first, *rest, last]


def fold_all(
    chunks: list[dict[str, Any]], options: engine.FoldOptions = engine.KAFKA_OPTIONS
) -> CompletionState:
    state = None
    for offset, payload in enumerate(chunks):
        state = engine.fold(state, CID, InputRecord(RecordKind.CHUNK, payload, offset), options).state
    assert isinstance(state, CompletionState)
    return state


def test_an_appended_string_grows_in_place_and_reads_back_as_the_sdk_has_it() -> None:
    chunks = audio_chunks(50)
    state = fold_all(chunks[:3])
    data = state.choices[0].message_extra["audio"]["data"]
    assert type(data) is bytearray
    for offset, payload in enumerate(chunks[3:], start=3):
        state = engine.fold(state, CID, InputRecord(RecordKind.CHUNK, payload, offset)).state  # type: ignore[assignment]
    assert state.choices[0].message_extra["audio"]["data"] is data  # the same buffer, appended to
    audio = text_leaves(state.choices[0].message_extra)["audio"]
    assert audio == {
        "id": "audio_1",
        "data": AUDIO_PIECE * 50,
        "transcript": "".join(f"w{i} " for i in range(50)),
    }
    # the final completion is the SDK's (its audio accumulated by openai-python's rules)
    sdk_state = fold_all(chunks, engine.SDK_OPTIONS)
    _, final = sdk_final(sdk_state)
    sdk_audio = final["choices"][0]["message"]["audio"]
    assert {key: sdk_audio[key] for key in audio} == audio and sdk_audio["expires_at"] is None


def test_only_a_state_with_growing_extras_is_written_as_v7_and_both_read_back() -> None:
    plain = fold_all([chunk(choice(0, role="assistant", content="a")), chunk(choice(0, content="b"))])
    assert orjson.loads(encode_state(plain))["v"] == STATE_VERSION == 6
    growing = fold_all(audio_chunks(3))
    stored = orjson.loads(encode_state(growing))
    assert stored["v"] == EXTRA_TEXT_VERSION == 7
    assert stored["choices"][0]["message_extra"]["audio"]["data"] is None  # the leaf is a buffer
    assert stored["choices"][0]["extra_text"]['["audio","data"]'] == AUDIO_PIECE * 3
    assert decode_state(encode_state(growing)) == growing
    assert split_text_leaves(plain.choices[0].message_extra)[0] is plain.choices[0].message_extra


def test_a_repeat_of_the_whole_text_keeps_the_buffer() -> None:
    """A provider's field equal to all of it so far is a repeat (kept once), also once grown."""
    deltas = ["ab", "cd", "abcd", "ef"]
    state = fold_all(
        [chunk(choice(0, role="assistant", content=""))] + [chunk(choice(0, x_note=d)) for d in deltas]
    )
    assert text_leaves(state.choices[0].message_extra) == {"x_note": "abcdef"}


def test_the_changelog_grows_with_the_audio_not_with_its_square() -> None:
    """A flush after every chunk (the worst case): the bytes written stay within twice the
    audio's, where rewriting the whole string at each flush wrote about n/2 times it."""
    chunks = audio_chunks(200)
    state = None
    cursor = persist.Cursor()
    written = 0
    for offset, payload in enumerate(chunks):
        state = engine.fold(state, CID, InputRecord(RecordKind.CHUNK, payload, offset)).state
        assert state is not None
        written += sum(len(key) + len(value or b"") for key, value in persist.flush_writes(state, cursor, 0))
    audio_bytes = len(AUDIO_PIECE) * 200
    assert written < 2 * audio_bytes
    stored: dict[str, bytes | None] = {}
    cursor = persist.Cursor()
    state = None
    for offset, payload in enumerate(chunks):
        state = engine.fold(state, CID, InputRecord(RecordKind.CHUNK, payload, offset)).state
        assert state is not None
        stored.update(persist.flush_writes(state, cursor, 0))
        restored = persist.restore(CID, stored.get)
        assert restored is not None and encode_state(restored.state) == encode_state(state)
