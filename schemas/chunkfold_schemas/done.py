"""``completion-done`` records: exactly one per completion, keyed by completion id."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chunkfold_schemas.completion import CompletionUsage, ParsedChatCompletion
from chunkfold_schemas.truncation import TRUNCATED_DESCRIPTION, Truncation


# The engine closes completions with these members, so the statuses it writes and the ones this
# model accepts cannot drift apart. A member is a ``str`` equal to its value: orjson, pydantic,
# sqlite3 and psycopg all write it as that string.
class Status(StrEnum):
    """How the completion ended."""

    COMPLETED = "completed"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    ABORTED = "aborted"
    EXPIRED = "expired"
    FAILED = "failed"


class ErrorInfo(BaseModel):
    type: str = Field(
        description="SDK exception class (APIError, ValidationError, ...) or Aborted / EmptyStream; "
        "SchemaError (status unchanged): a request schema was invalid and its output not validated"
    )
    message: str
    body: Any = Field(
        None,
        description="APIError: the provider's error object as it sent it (code, param, Groq's "
        "failed_generation, ...), as openai-python's APIError.body",
    )


class Timing(BaseModel):
    """Times are the Kafka record timestamps (when the gateway received the chunk), in ms."""

    request_at_ms: int | None
    first_chunk_at_ms: int | None
    last_chunk_at_ms: int | None
    time_to_first_token_ms: int | None = Field(
        description="first non-empty delta minus request (or first chunk)"
    )
    duration_ms: int | None
    tokens_per_second: float | None = Field(
        description="completion tokens over first-token-to-last-chunk time"
    )


class Anomalies(BaseModel):
    duplicates_dropped: int = Field(description="records whose chunkfold.seq had been seen already")
    seq_gaps: int = Field(description="times chunkfold.seq jumped forward")
    missing_records: int = Field(description="records skipped over by those jumps")
    skipped_frames: int = Field(
        description="frames skipped: an object other than chat.completion.chunk, without choices or usage"
    )
    seq_invalid: int = Field(
        description="chunkfold.seq headers ignored: jumps too far ahead to be records lost in between"
    )
    id_mismatches: int = Field(
        0, description="chunks whose id was neither empty nor the completion id (folded in all the same)"
    )
    unknown_content_parts: int = Field(
        0,
        description="delta.content parts of a type other than text and thinking "
        "(kept in the message's content_parts)",
    )


class DoneRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    completion_id: str
    status: Status
    error: ErrorInfo | None
    completion: ParsedChatCompletion | None = Field(
        description="ParsedChatCompletion shape; partial unless completed"
    )
    usage: CompletionUsage | None
    usage_reported: bool = Field(description="the provider reported usage in the stream")
    request: dict[str, Any] | None = Field(description="the request context record, when one was given")
    timing: Timing
    chunk_count: int
    event_count: int
    anomalies: Anomalies
    other_chunk_ids: list[str] = Field(
        default_factory=list,
        description="the first 8 distinct chunk ids other than completion_id, in order of arrival",
    )
    truncated: list[Truncation] | None = Field(None, description=TRUNCATED_DESCRIPTION)


def parse_done(data: bytes | str) -> DoneRecord:
    """Parse one ``completion-done`` value."""
    return DoneRecord.model_validate_json(data)
