"""A completion as it stands, while it streams: ``snapshot(state, partition)``.

An open completion's snapshot carries exactly what its ``completion-done`` record would carry
if the worker closed it now (``engine.expiry_preview``: the ``expired`` path), with status
``in_progress``; a tombstone's carries its terminal status and event count (its final
completion is on ``completion-done``). Taking one changes nothing in the state and costs
O(the completion's size). The result is plain JSON values (``chunkfold_schemas.snapshot``'s
``CompletionSnapshot``) that share no object with the state, which goes on changing in place.
"""

from __future__ import annotations

from typing import Any

from chunkfold.core import codec
from chunkfold.core.engine import expiry_preview
from chunkfold.core.state import AnyState, ClosedCompletion
from chunkfold_schemas.snapshot import IN_PROGRESS

SNAPSHOT_VERSION = 1


def snapshot(state: AnyState, partition: int) -> dict[str, Any]:
    """The snapshot of ``state``, a completion of input partition ``partition``."""
    if isinstance(state, ClosedCompletion):
        return {
            "version": SNAPSHOT_VERSION,
            "completion_id": state.completion_id,
            "status": str(state.status),
            "completion": None,
            "error": None,
            "usage": None,
            "request": None,
            "last_seq": _last_seq(state.event_count),
            "event_count": state.event_count,
            "chunk_count": None,
            "timing": None,
            "anomalies": None,
            "input": {"partition": partition, "last_offset": state.last_offset},
            "events_from": state.events_from,
        }
    done = expiry_preview(state)
    view = {
        "version": SNAPSHOT_VERSION,
        "completion_id": state.completion_id,
        "status": IN_PROGRESS,
        "completion": done["completion"],
        "error": done["error"],
        "usage": done["usage"],
        "request": done["request"],
        "last_seq": _last_seq(state.event_seq),
        "event_count": done["event_count"],
        "chunk_count": done["chunk_count"],
        "timing": done["timing"],
        "anomalies": done["anomalies"],
        "input": {"partition": partition, "last_offset": state.last_offset},
        "events_from": state.events_from,
    }
    plain: dict[str, Any] = codec.plain(view)  # logprobs embedded as JSON, objects the state holds
    return plain


def _last_seq(event_count: int | None) -> int | None:
    return event_count - 1 if event_count else None
