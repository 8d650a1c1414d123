"""The size policy's record of what was cut from an output value to fit its topic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Truncation(BaseModel):
    """One cut: the string at ``path`` keeps a prefix, the array at ``path`` a prefix of its items
    (``path`` "" : the whole value was replaced by its identifying fields). The whole is rebuilt
    from the completion's ``*.delta`` events (text, arguments, logprobs) or, for the request and
    dead letters' values, from the input topic."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="JSON Pointer (RFC 6901) of the cut string or array")
    original_bytes: int = Field(description="UTF-8 bytes of the original string, or JSON bytes of the array")
    kept_bytes: int = Field(description="the same measure of what was kept")
    sha256: str = Field(description="hex SHA-256 of the original (the string's UTF-8, the array's JSON)")


TRUNCATED_DESCRIPTION = (
    "present only when the value was cut to fit its topic's max.message.bytes: what was cut, where"
)
