"""The synthetic streams of ``tests.demo.synthetic``, plus the pydantic model openai-python needs
to parse the structured kind (chunkfold only gets its JSON Schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tests.demo.synthetic import KINDS, TOOLS, KafkaRecord, Stream, make_stream, text_bytes

__all__ = ["KINDS", "TOOLS", "KafkaRecord", "Solution", "Stream", "make_stream", "sdk_inputs", "text_bytes"]


class Step(BaseModel):
    explanation: str
    output: str
    confidence: float


class Solution(BaseModel):
    title: str
    steps: list[Step]
    final_answer: str
    tags: list[str]


def sdk_inputs(stream: Stream) -> tuple[type[BaseModel] | None, list[dict[str, Any]] | None]:
    """``(response_format, input_tools)`` to hand openai-python for ``stream``."""
    return (Solution if stream.kind == "structured" else None), (TOOLS if stream.kind == "tools" else None)
