"""The optional request context record (``chunkfold.kind: request``) on ``completion-chunks``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RequestContext(BaseModel):
    """The create-params the gateway sent. Only ``response_format`` and ``tools`` change how
    chunks are folded; everything else is carried through to ``completion-done`` as given."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    n: int | None = None
    metadata: dict[str, Any] | None = None
