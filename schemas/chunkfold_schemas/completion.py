"""The final completion as chunkfold publishes it: openai-python's ``ParsedChatCompletion`` shape.

Every field the SDK declares is present in a dump (``null`` when the wire omitted it), and
fields the wire carried that the SDK does not know (``reasoning_content``, provider extras)
are kept, exactly as ``ParsedChatCompletion.model_dump(mode="json")`` does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TopLogprob(_Open):
    token: str | None = None
    bytes: list[int] | None = None
    logprob: float | None = None


class TokenLogprob(_Open):
    token: str | None = None
    bytes: list[int] | None = None
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None


class ChoiceLogprobs(_Open):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AnnotationURLCitation(_Open):
    end_index: int | None = None
    start_index: int | None = None
    title: str | None = None
    url: str | None = None


class Annotation(_Open):
    type: str | None = None
    url_citation: AnnotationURLCitation | None = None


class ChatCompletionAudio(_Open):
    id: str | None = None
    data: str | None = None
    expires_at: int | None = None
    transcript: str | None = None


class FunctionCall(_Open):
    arguments: str | None = None
    name: str | None = None


class ParsedFunction(_Open):
    arguments: str | None = None
    name: str | None = None
    parsed_arguments: Any = None


class ParsedFunctionToolCall(_Open):
    id: str | None = None
    function: ParsedFunction | None = None
    type: str | None = None


class ParsedChatCompletionMessage(_Open):
    content: str | None = None
    refusal: str | None = None
    role: str | None = None
    annotations: list[Annotation] | None = None
    audio: ChatCompletionAudio | None = None
    function_call: FunctionCall | None = None
    tool_calls: list[ParsedFunctionToolCall] | None = None
    parsed: Any = None


class ParsedChoice(_Open):
    finish_reason: str | None = None
    index: int | None = None
    logprobs: ChoiceLogprobs | None = None
    message: ParsedChatCompletionMessage | None = None


class CompletionTokensDetails(_Open):
    accepted_prediction_tokens: int | None = None
    audio_tokens: int | None = None
    reasoning_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    text_tokens: int | None = None


class PromptTokensDetails(_Open):
    audio_tokens: int | None = None
    cache_write_tokens: int | None = None
    cached_tokens: int | None = None
    image_tokens: int | None = None
    text_tokens: int | None = None


class CompletionUsage(_Open):
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    total_tokens: int | None = None
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class ParsedChatCompletion(_Open):
    id: str | None = None
    choices: list[ParsedChoice] | None = None
    created: int | None = None
    model: str | None = None
    object: str | None = None
    metadata: dict[str, str] | None = None
    moderation: dict[str, Any] | None = None
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None
