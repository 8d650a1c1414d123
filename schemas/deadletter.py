"""``completion-deadletter`` records: input that could not be folded, with the reason."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Source(BaseModel):
    topic: str
    partition: int | None
    offset: int | None
    timestamp_ms: int | None


class Header(BaseModel):
    key: str
    value_b64: str


class DeadLetter(BaseModel):
    """``reason`` is a short code (``invalid_json``, ``wrong_type``, ``key_mismatch``,
    ``after_end``, ...); ``detail`` a one-line explanation. The original key, value and headers
    are kept byte for byte (base64), the value also as text when it is UTF-8."""

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

    def original_value(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)


def parse_deadletter(data: bytes | str) -> DeadLetter:
    return DeadLetter.model_validate_json(data)
