"""Driving the engine alone over a list of records, as the unit tests of its parts do."""

from __future__ import annotations

from typing import Any

from chunkfold.core import codec, engine
from chunkfold.core.records import InputRecord
from chunkfold.core.state import AnyState, decode_state, encode_state
from tests.streams import CID


def fold_all(
    records: list[InputRecord], roundtrip: bool = False, completion_id: str = CID
) -> tuple[list[bytes], dict[str, Any] | None, AnyState | None]:
    """The published bytes (events and done record, in order), the done record and the last
    state, each record at offset = its position; ``roundtrip``: the state goes through its bytes
    after every record."""
    state: AnyState | None = None
    out: list[bytes] = []
    done: dict[str, Any] | None = None
    for offset, record in enumerate(records):
        result = engine.fold(state, completion_id, record._replace(offset=offset))
        out += [codec.dumps(event) for event in result.events]
        if result.done is not None:
            done = result.done
            out.append(codec.dumps(result.done))
        state = result.state
        if roundtrip and state is not None:
            state = decode_state(encode_state(state))
    return out, done, state
