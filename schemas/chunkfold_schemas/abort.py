"""Abort records on ``completion-chunks`` (header ``chunkfold.kind: abort``).

The client went away or the upstream failed: the completion ends with status ``aborted``. The
value is empty (or whitespace), JSON ``null`` or a JSON object; anything else is dead-lettered
(``invalid_json``, ``invalid_abort``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class AbortRecord(BaseModel):
    """Every field is optional and other fields are allowed (and ignored)."""

    model_config = ConfigDict(extra="allow")

    reason: Any = Field(
        default=None,
        description="why, normally a string; when given, the completion-done record's error is "
        "{type: Aborted, message: reason} (other JSON values are accepted and rendered as text)",
    )


ABORT_ADAPTER: TypeAdapter[AbortRecord | None] = TypeAdapter(AbortRecord | None)


def parse_abort(data: bytes | str) -> AbortRecord | None:
    """Parse one abort value: ``None`` for an empty value or ``null``; raises
    ``pydantic.ValidationError`` where the worker would dead-letter it."""
    if not data.strip():
        return None
    return ABORT_ADAPTER.validate_json(data)
