"""``completion-deadletter`` records: input that could not be folded, with the reason."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from chunkfold_schemas.truncation import TRUNCATED_DESCRIPTION, Truncation


class Source(BaseModel):
    topic: str
    partition: int | None
    offset: int | None
    timestamp_ms: int | None


class Header(BaseModel):
    key: str
    value_b64: str


class DeadLetter(BaseModel):
    """``reason`` is a short code (``invalid_json``, ``wrong_type``, ``missing_key``,
    ``after_end``, ...); ``detail`` a one-line explanation. The original key, value and headers
    are kept byte for byte (base64), the value also as text when it is UTF-8; a dead letter that
    would not fit its topic keeps a prefix of them (``truncated`` says which), and
    ``value_bytes`` / ``value_sha256`` always identify the whole value."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    reason: str
    detail: str
    source: Source
    key: str | None
    key_b64: str | None
    value_b64: str | None
    value_text: str | None
    headers: list[Header]
    value_bytes: int | None = Field(None, description="size of the original value")
    value_sha256: str | None = Field(None, description="hex SHA-256 of the original value")
    truncated: list[Truncation] | None = Field(None, description=TRUNCATED_DESCRIPTION)

    def original_value(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)


def parse_deadletter(data: bytes | str) -> DeadLetter:
    return DeadLetter.model_validate_json(data)
