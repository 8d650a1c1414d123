"""Completion snapshots: the body of ``GET /completions/{id}`` on a worker's query listener
(not a topic record). A completion as it stands on the worker that owns it: while it streams,
what its ``completion-done`` record would carry if it ended now (status ``expired``); once it
has ended, while its tombstone lives, its terminal status and event count."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from chunkfold_schemas.completion import CompletionUsage, ParsedChatCompletion
from chunkfold_schemas.done import Anomalies, ErrorInfo, Status, Timing

IN_PROGRESS: Final = "in_progress"
"""The status of a completion that has not ended."""


class InputPosition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partition: int = Field(ge=0, description="the completion's partition of the input topic")
    last_offset: int | None = Field(
        ge=0, description="offset of the last input record folded in (null: none yet carried one)"
    )


class CompletionSnapshot(BaseModel):
    """Ended completions carry no completion, error, usage, request, timing or anomalies
    (null): those are on their completion-done record."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    completion_id: str
    status: Literal["in_progress"] | Status = Field(
        description="in_progress while the completion streams, else how it ended"
    )
    completion: ParsedChatCompletion | None = Field(
        description="the ParsedChatCompletion completion-done would carry if the completion ended "
        "now (unfinished choices unparsed); null before the first chunk and once it has ended"
    )
    error: ErrorInfo | None = Field(description="the error completion-done would carry if it ended now")
    usage: CompletionUsage | None = Field(description="the usage reported so far")
    request: dict[str, Any] | None = Field(description="the request context record, when one was given")
    last_seq: int | None = Field(ge=0, description="seq of the last event published so far (null: none)")
    event_count: int | None = Field(
        ge=0,
        description="events published so far (seq 0 to event_count - 1); null only for a "
        "completion that ended before the worker kept the count (written by an older release)",
    )
    chunk_count: int | None = Field(ge=0, description="chunks folded so far (null once it has ended)")
    timing: Timing | None = Field(description="completion-done's timing block so far")
    anomalies: Anomalies | None = Field(description="completion-done's anomalies block so far")
    input: InputPosition
    events_from: int | None = Field(
        ge=0,
        description="an offset of the completion's completion-events partition at or before its "
        "first event (null: not known): where a reader of its events can start",
    )


def parse_snapshot(data: bytes | str) -> CompletionSnapshot:
    """Parse one ``GET /completions/{id}`` body."""
    return CompletionSnapshot.model_validate_json(data)
