"""``completion-events`` records: one per semantic event, keyed by completion id.

The event types and their fields are openai-python's (``openai.lib.streaming.chat``), plus
``completion_id``, ``choice_index`` and ``seq`` (gap-free per completion, so a consumer can drop
repeats on ``(completion_id, seq)``). Delta events carry the delta; ``snapshot``, ``arguments``,
``parsed`` and ``parsed_arguments`` on delta events appear only when the worker is configured
with snapshots / partial parses. ``reasoning.*`` events are chunkfold's own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from chunkfold_schemas.completion import TokenLogprob
from chunkfold_schemas.truncation import TRUNCATED_DESCRIPTION, Truncation


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str
    choice_index: int
    seq: int = Field(ge=0)
    truncated: list[Truncation] | None = Field(None, description=TRUNCATED_DESCRIPTION)


class ContentDelta(_Event):
    type: Literal["content.delta"]
    delta: str
    snapshot: str | None = None
    parsed: Any = None


class ContentDone(_Event):
    type: Literal["content.done"]
    content: str
    parsed: Any = None


class RefusalDelta(_Event):
    type: Literal["refusal.delta"]
    delta: str
    snapshot: str | None = None


class RefusalDone(_Event):
    type: Literal["refusal.done"]
    refusal: str


class ReasoningDelta(_Event):
    type: Literal["reasoning.delta"]
    field: Literal["reasoning_content", "reasoning"]
    delta: str


class ReasoningDone(_Event):
    type: Literal["reasoning.done"]
    field: Literal["reasoning_content", "reasoning"]
    reasoning: str


class ToolArgumentsDelta(_Event):
    type: Literal["tool_calls.function.arguments.delta"]
    name: str | None
    index: int
    arguments_delta: str
    arguments: str | None = None
    parsed_arguments: Any = None


class ToolArgumentsDone(_Event):
    type: Literal["tool_calls.function.arguments.done"]
    name: str | None
    index: int
    arguments: str | None = Field(description="null only while the provider sent no string for them")
    parsed_arguments: Any = None


class LogprobsContentDelta(_Event):
    type: Literal["logprobs.content.delta"]
    content: list[TokenLogprob]
    snapshot: list[TokenLogprob] | None = None


class LogprobsContentDone(_Event):
    type: Literal["logprobs.content.done"]
    content: list[TokenLogprob]


class LogprobsRefusalDelta(_Event):
    type: Literal["logprobs.refusal.delta"]
    refusal: list[TokenLogprob]
    snapshot: list[TokenLogprob] | None = None


class LogprobsRefusalDone(_Event):
    type: Literal["logprobs.refusal.done"]
    refusal: list[TokenLogprob]


CompletionEvent = Annotated[
    ContentDelta
    | ContentDone
    | RefusalDelta
    | RefusalDone
    | ReasoningDelta
    | ReasoningDone
    | ToolArgumentsDelta
    | ToolArgumentsDone
    | LogprobsContentDelta
    | LogprobsContentDone
    | LogprobsRefusalDelta
    | LogprobsRefusalDone,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[CompletionEvent] = TypeAdapter(CompletionEvent)


def parse_event(data: bytes | str) -> CompletionEvent:
    """Parse one ``completion-events`` value into its typed event."""
    return EVENT_ADAPTER.validate_json(data)
