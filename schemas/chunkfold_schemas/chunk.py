"""Chunk records on ``completion-chunks`` (header ``chunkfold.kind`` absent or ``chunk``).

The value is the SSE ``data:`` payload exactly as the API streamed it: an OpenAI
``ChatCompletionChunk``, an error frame or another provider frame. These models accept exactly
the JSON values the worker folds; the worker dead-letters the others as ``wrong_type`` (or
``not_an_object``). Only the fields the worker reads are typed; every other field, at any
level, is allowed and carried through untouched. Integer fields are JSON integers (``1``, not
``1.0``; JSON Schema cannot tell the two apart, the models and the worker do), and a value is
at most ``CHUNKFOLD_MAX_RECORD_BYTES`` (1 MiB by default). A chunk whose ``id`` is neither
empty nor the record key is folded into the key's completion all the same and counted
(``anomalies.id_mismatches``): the key is the gateway's completion id.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

CHUNK_OBJECT = "chat.completion.chunk"
# Python's falsy JSON values: an "error" that is one of these does not make an error frame.
_FALSY: tuple[Any, ...] = (None, False, 0, "", {}, [])


class _Lenient(BaseModel):
    """Typed fields are checked strictly (no ``"1"`` for ``1``); unknown fields are kept."""

    model_config = ConfigDict(extra="allow", strict=True)


NonNegativeInt = Annotated[int, Field(ge=0)]


class ChunkFunction(_Lenient):
    name: str | None = None
    arguments: str | None = Field(default=None, description="a fragment of the arguments JSON text")


class ChunkToolCall(_Lenient):
    index: NonNegativeInt | None = Field(
        default=None,
        description="the tool call's identity within its choice; without it, the delta continues the "
        "one open call, or starts a new one when it brings a new id",
    )
    id: str | None = None
    type: str | None = Field(default=None, description="function when absent")
    function: ChunkFunction | None = None


class TextPart(_Lenient):
    """A content part of type ``text``: its text is content."""

    type: Literal["text"]
    text: str


class ThinkingPart(_Lenient):
    """A content part of type ``thinking`` (Mistral Magistral): its text is reasoning."""

    type: Literal["thinking"]
    thinking: str | list[ContentPart]


class OtherPart(_Lenient):
    """A content part of any other type: kept in the message's ``content_parts``, counted in
    ``anomalies.unknown_content_parts``."""

    type: Annotated[
        Any,
        AfterValidator(lambda value: _not_one_of(value, ("text", "thinking"))),
        Field(json_schema_extra={"not": {"enum": ["text", "thinking"]}}),
    ] = None


ContentPart = Annotated[TextPart | ThinkingPart | OtherPart, Field(union_mode="left_to_right")]
ThinkingPart.model_rebuild()


class ChunkDelta(_Lenient):
    role: str | None = None
    content: str | list[ContentPart] | None = Field(
        default=None, description="text, or a list of typed content parts (text, thinking, other)"
    )
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkLogprobs(_Lenient):
    content: list[dict[str, Any]] | None = Field(
        default=None, description="TokenLogprob objects, carried through as given"
    )
    refusal: list[dict[str, Any]] | None = Field(
        default=None, description="TokenLogprob objects, carried through as given"
    )


class ChunkChoice(_Lenient):
    index: NonNegativeInt = Field(description="the choice's identity, not a list offset")
    delta: ChunkDelta | None = None
    finish_reason: str | None = None
    logprobs: ChunkLogprobs | None = None


class ChatCompletionChunk(_Lenient):
    """One ``chat.completion.chunk``, or a frame of another ``object`` that carries choices or
    usage (Perplexity's last frame is a ``chat.completion.done``). Every field may be null or
    absent."""

    id: str | None = Field(
        default=None,
        description="the completion id; may be empty (Azure filter frames) or differ from the key",
    )
    object: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[ChunkChoice] | None = None
    usage: dict[str, Any] | None = Field(
        default=None,
        description="CompletionUsage as the provider reported it (the last non-null one is kept), "
        "carried through as given",
    )


def _truthy(value: Any) -> Any:
    if not value:
        raise ValueError("a null, false, zero or empty error is not an error frame")
    return value


def _not_a_chunk(value: str) -> str:
    if value == CHUNK_OBJECT:
        raise ValueError(f"object {CHUNK_OBJECT} is a chunk")
    return value


def _not_one_of(value: Any, kinds: tuple[str, ...]) -> Any:
    if value in kinds:
        raise ValueError(f"a part of type {value!r} has its own shape")
    return value


def _no_choice_data(value: Any) -> Any:
    if isinstance(value, list) and any(
        isinstance(c, dict) and (c.get("delta") or c.get("finish_reason") or c.get("logprobs") is not None)
        for c in value
    ):
        raise ValueError("a frame with choice data (delta, finish_reason or logprobs) is folded as a chunk")
    return value


_FALSY_SCHEMA = {"enum": list(_FALSY)}
_NO_CHOICE_DATA_SCHEMA = {
    "anyOf": [
        {"not": {"type": "array"}},
        {
            "type": "array",
            "items": {
                "anyOf": [
                    {"not": {"type": "object"}},
                    {
                        "type": "object",
                        "properties": {
                            "delta": _FALSY_SCHEMA,
                            "finish_reason": _FALSY_SCHEMA,
                            "logprobs": {"type": "null"},
                        },
                    },
                ]
            },
        },
    ]
}


class ErrorFrame(_Lenient):
    """``data: {"error": ...}`` mid-stream: ends the completion with status ``failed``
    (``APIError``). Its other fields are not checked."""

    error: Annotated[
        Any,
        AfterValidator(_truthy),
        Field(
            description="any JSON value but null, false, 0, an empty string, object or array",
            json_schema_extra={"not": {"enum": list(_FALSY)}},
        ),
    ]


class NonChunkFrame(_Lenient):
    """A frame whose ``object`` is not ``chat.completion.chunk`` and that carries no choice
    data and no usage (an Azure content-filter frame: ``object: ""``, choices with filter
    results only): counted in ``anomalies.skipped_frames``, otherwise ignored."""

    object: Annotated[
        str,
        AfterValidator(_not_a_chunk),
        Field(json_schema_extra={"not": {"const": CHUNK_OBJECT}}),
    ]
    choices: Annotated[
        Any,
        AfterValidator(_no_choice_data),
        Field(
            description="no choice with a delta, finish_reason or logprobs (filter results only)",
            json_schema_extra=_NO_CHOICE_DATA_SCHEMA,
        ),
    ] = None
    usage: None = None


# In the worker's order: an error frame first, then another frame, else a chunk.
ChunkRecord = Annotated[ErrorFrame | NonChunkFrame | ChatCompletionChunk, Field(union_mode="left_to_right")]

CHUNK_ADAPTER: TypeAdapter[ChunkRecord] = TypeAdapter(ChunkRecord)


def parse_chunk(data: bytes | str) -> ErrorFrame | NonChunkFrame | ChatCompletionChunk:
    """Parse one chunk value; raises ``pydantic.ValidationError`` where the worker would
    dead-letter it for its shape."""
    return CHUNK_ADAPTER.validate_json(data)
