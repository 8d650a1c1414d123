"""State is versioned and serializable; a restored state continues exactly where it stopped,
and records it already holds are recognised and skipped."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from chunkfold.core import codec, engine
from chunkfold.core.inputs import frames_to_keys, iter_frames
from chunkfold.core.records import InputRecord, RecordKind, make_record
from chunkfold.core.state import (
    STATE_VERSION,
    AnyState,
    CompletionState,
    StateVersionError,
    decode_state,
    encode_state,
)
from tests.recorded import recordings
from tests.streams import CID, choice, chunk

pytestmark = pytest.mark.unit


def records_of(text: str, request: dict[str, Any]) -> tuple[str, list[InputRecord]]:
    keyed = list(frames_to_keys(iter_frames(text)))
    key = keyed[0][0]
    out = [make_record(key, RecordKind.REQUEST, request, offset=0)]
    out += [make_record(key, frame.kind, frame.payload, offset=frame.line) for _, frame in keyed]
    return key, out


def run(key: str, records: list[InputRecord], roundtrip_every: int) -> list[Any]:
    outputs: list[Any] = []
    state: AnyState | None = None
    for i, record in enumerate(records):
        result = engine.fold(state, key, record)
        state = result.state
        # as published: through codec.dumps (logprob lists are embedded JSON)
        outputs.extend(orjson.loads(codec.dumps(event)) for event in result.events)
        outputs.append(orjson.loads(codec.dumps(result.done)))
        if roundtrip_every and state is not None and i % roundtrip_every == 0:
            state = decode_state(encode_state(state))
    return outputs


@pytest.mark.parametrize("rec", recordings(), ids=lambda r: r.name)
def test_roundtrip_through_bytes_changes_nothing(rec: Any) -> None:
    key, records = records_of(rec.sse.read_text(), rec.request)
    assert run(key, records, roundtrip_every=1) == run(key, records, roundtrip_every=0)


def test_replayed_records_are_skipped_and_seq_duplicates_counted() -> None:
    first = InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content="a")), offset=10, seq=0)
    second = InputRecord(RecordKind.CHUNK, chunk(choice(0, content="b")), offset=11, seq=1)
    state = engine.fold(None, CID, first).state
    state = engine.fold(state, CID, second).state
    restored = decode_state(encode_state(state))  # type: ignore[arg-type]
    again = engine.fold(restored, CID, second)
    assert again.skipped == "replayed" and again.events == []
    dup = engine.fold(
        restored, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, content="b")), offset=12, seq=1)
    )
    assert dup.skipped == "duplicate" and dup.events == []
    gap = engine.fold(
        restored, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, content="d")), offset=13, seq=3)
    )
    done = engine.fold(gap.state, CID, InputRecord(RecordKind.DONE, offset=14, seq=4)).done
    assert done is not None
    assert done["completion"]["choices"][0]["message"]["content"] == "abd"
    assert done["anomalies"] == {
        "duplicates_dropped": 1,
        "seq_gaps": 1,
        "missing_records": 1,
        "skipped_frames": 0,
        "seq_invalid": 0,
        "id_mismatches": 0,
        "unknown_content_parts": 0,
    }


def test_unknown_state_version_is_refused() -> None:
    state = engine.fold(None, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, content="a")))).state
    data = encode_state(state).replace(f'"v":{STATE_VERSION}'.encode(), b'"v":99')  # type: ignore[arg-type]
    with pytest.raises(StateVersionError):
        decode_state(data)


def test_a_version_1_state_is_still_read() -> None:
    """v1 counters held two more entries (replayed_skipped, records_after_end); they are dropped."""
    state = engine.fold(None, CID, InputRecord(RecordKind.CHUNK, chunk(choice(0, content="a")), seq=0)).state
    assert isinstance(state, CompletionState)
    state.counters.duplicates_dropped, state.counters.seq_gaps = 2, 3
    data = orjson.loads(encode_state(state))
    chunks, duplicates, gaps, missing, frames = data["counters"][:5]  # v1 had no later counters
    choices = [{**c, "logprobs": c["logprobs"][:3]} for c in data["choices"]]
    v1 = {**data, "v": 1, "counters": [chunks, duplicates, 5, gaps, missing, frames, 0], "choices": choices}
    restored = decode_state(orjson.dumps(v1))
    assert isinstance(restored, CompletionState)
    assert restored.counters == state.counters
    assert decode_state(encode_state(restored)) == restored


def _wire_entry(token: str, logprob: float) -> dict[str, Any]:
    """A logprob entry in the wire's key order (the models order ``bytes`` before ``logprob``)."""
    top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


def test_a_version_2_state_with_wire_logprob_entries_gives_the_same_bytes() -> None:
    """v2 kept logprob entries as the wire sent them; v3 keeps them normalized. A v2 state
    restored mid-stream must finish with byte-identical events and done record (a completion
    repeated across an upgrade stays de-duplicable)."""
    entries = [_wire_entry(t, -0.5 * i) for i, t in enumerate(["Hel", "lo", "!"])]
    records = [
        InputRecord(
            RecordKind.CHUNK,
            chunk(
                choice(0, role="assistant", content="Hel", logprobs={"content": entries[:1], "refusal": None})
            ),
            offset=0,
        ),
        InputRecord(
            RecordKind.CHUNK, chunk(choice(0, content="lo", logprobs={"content": entries[1:2]})), offset=1
        ),
        InputRecord(
            RecordKind.CHUNK,
            chunk(choice(0, content="!", finish_reason="stop", logprobs={"content": entries[2:]})),
            offset=2,
        ),
        InputRecord(RecordKind.DONE, offset=3),
    ]

    def published(state: AnyState | None, rest: list[InputRecord]) -> list[bytes]:
        out: list[bytes] = []
        for record in rest:
            result = engine.fold(state, CID, record)
            state = result.state
            out += [codec.dumps(event) for event in result.events]
            if result.done is not None:
                out.append(codec.dumps(result.done))
        return out

    first = engine.fold(None, CID, records[0])
    state = engine.fold(first.state, CID, records[1]).state
    data = orjson.loads(encode_state(state))  # type: ignore[arg-type]
    (lp,) = [c["logprobs"] for c in data["choices"]]
    assert lp[3] is False
    wire = b",".join(orjson.dumps(e) for e in entries[:2]).decode()
    v2 = {**data, "v": 2, "choices": [{**data["choices"][0], "logprobs": [True, wire, None]}]}
    restored = decode_state(orjson.dumps(v2))
    assert isinstance(restored, CompletionState) and restored.choices[0].logprobs_wire
    from_v2 = published(restored, records[2:])
    assert from_v2 == published(state, records[2:])
    done = orjson.loads(from_v2[-1])
    assert list(done["completion"]["choices"][0]["logprobs"]["content"][0]) == [
        "token",
        "bytes",
        "logprob",
        "top_logprobs",
    ]
