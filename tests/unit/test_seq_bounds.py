"""A bogus ``chunkfold.seq`` header cannot poison a completion (chunkfold issue 10, item 7):
a jump too far ahead is counted as ``seq_invalid`` and ignored, while real gaps and real
redeliveries are reported and dropped as before."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from chunkfold.core import engine
from chunkfold.core.engine import MAX_SEQ_JUMP
from chunkfold.core.records import InputRecord, RecordKind
from chunkfold.core.state import AnyState, CompletionState, decode_state, encode_state
from tests.folding import fold_all
from tests.streams import CID, choice, chunk

pytestmark = pytest.mark.unit


def text_records(seqs: list[int]) -> list[InputRecord]:
    """One chunk per seq (content "0", "1", ...), then the end of the stream (seq after the last)."""
    records = [
        InputRecord(RecordKind.CHUNK, chunk(choice(0, role="assistant", content=str(i))), offset=i, seq=seq)
        for i, seq in enumerate(seqs)
    ]
    records.append(InputRecord(RecordKind.DONE, None, offset=len(seqs), seq=None))
    return records


def fold_finished(records: list[InputRecord], roundtrip: bool = False) -> tuple[list[bytes], dict[str, Any]]:
    """The published bytes and the done record of a completion that must finish."""
    out, done, _ = fold_all(records, roundtrip)
    assert done is not None
    return out, done


def test_one_huge_seq_is_ignored_and_the_stream_folds_on() -> None:
    out, done = fold_finished(text_records([0, 999_999_999_999_999_999, 2, 3, 4]))
    assert done["status"] == "completed"
    assert done["completion"]["choices"][0]["message"]["content"] == "01234"
    assert [orjson.loads(e)["delta"] for e in out[:-1]] == ["0", "1", "2", "3", "4"]
    # seq 1 never came: one gap of one record, besides the ignored header
    assert done["anomalies"] == {
        "duplicates_dropped": 0,
        "seq_gaps": 1,
        "missing_records": 1,
        "skipped_frames": 0,
        "seq_invalid": 1,
        "id_mismatches": 0,
        "unknown_content_parts": 0,
    }
    assert fold_finished(text_records([0, 999_999_999_999_999_999, 2, 3, 4]), roundtrip=True)[0] == out


def test_a_huge_first_seq_is_ignored_too() -> None:
    _, done = fold_finished(text_records([10**17, 0, 1]))
    assert done["completion"]["choices"][0]["message"]["content"] == "012"
    assert (done["anomalies"]["seq_invalid"], done["anomalies"]["duplicates_dropped"]) == (1, 0)


def test_redeliveries_are_still_dropped_after_an_ignored_header() -> None:
    records = text_records([0, 1, 10**15, 2, 1, 3])
    _, done = fold_finished(records)
    assert done["completion"]["choices"][0]["message"]["content"] == "01235"
    assert done["anomalies"] == {
        "duplicates_dropped": 1,
        "seq_gaps": 0,
        "missing_records": 0,
        "skipped_frames": 0,
        "seq_invalid": 1,
        "id_mismatches": 0,
        "unknown_content_parts": 0,
    }


@pytest.mark.parametrize(
    ("jump", "gaps", "missing", "invalid"),
    [(MAX_SEQ_JUMP, 1, MAX_SEQ_JUMP, 0), (MAX_SEQ_JUMP + 1, 1, 1, 1)],
)
def test_the_jump_bound(jump: int, gaps: int, missing: int, invalid: int) -> None:
    """Up to ``MAX_SEQ_JUMP`` past the expected seq (1) is records lost in between; one more is
    a bogus header (and the next record, seq 2, then shows seq 1 missing)."""
    seq = 1 + jump
    _, done = fold_finished(text_records([0, seq, 2] if invalid else [0, seq, seq + 1]))
    anomalies = done["anomalies"]
    assert (anomalies["seq_gaps"], anomalies["missing_records"], anomalies["seq_invalid"]) == (
        gaps,
        missing,
        invalid,
    )
    assert anomalies["duplicates_dropped"] == 0


def test_seq_invalid_survives_the_state_round_trip() -> None:
    state: AnyState | None = None
    for record in text_records([0, 10**12])[:2]:
        state = engine.fold(state, CID, record).state
    assert state is not None
    restored = decode_state(encode_state(state))
    assert isinstance(restored, CompletionState)
    assert (restored.counters.seq_invalid, restored.next_seq) == (1, 1)


def test_a_state_written_before_seq_invalid_reads_as_zero() -> None:
    state = engine.fold(None, CID, text_records([0])[0]).state
    assert state is not None
    data = orjson.loads(encode_state(state))
    data["counters"] = data["counters"][:5]  # chunks .. skipped_frames: what earlier releases wrote
    restored = decode_state(orjson.dumps(data))
    assert isinstance(restored, CompletionState)
    assert (restored.counters.seq_invalid, restored.counters.validation_steps) == (0, 0)
