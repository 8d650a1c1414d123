"""The final ``ParsedChatCompletion`` of a completion's state, and the parsing and validation
of its content and tool arguments (against the request's schemas, within the completion's
validation budget).

Called by ``engine`` (the done record), by ``events`` (the ``*.done`` events parse the same
way) and by ``accumulate`` (``StreamError``, the finish reasons that truncate); ``sdk_final``
is for replays in SDK mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chunkfold.core import shape
from chunkfold.core.logprobs import logprobs_value
from chunkfold.core.state import ChoiceState, CompletionState, ToolCallState, text_leaves
from chunkfold.core.validation import VALIDATION_STEPS, Budget, SchemaValidationError, parse_and_validate

TRUNCATING_FINISH_REASONS = ("length", "content_filter")
"""Finish reasons that cut a choice's text: it is never parsed."""


class StreamError(Exception):
    """What openai-python raises on a stream, by class name (``error_type``): parsing and
    validation here, the truncating finish reasons in ``accumulate``. The engine reports it as
    the record's ``stream_error`` and gives the completion the status it implies."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def build_completion(
    state: CompletionState, *, parse_unfinished: bool, embed: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``ParsedChatCompletion`` dump of ``state`` (None before the first chunk) and the
    first error ``get_final_completion`` would raise, in one pass over the choices.
    ``embed``: logprob lists are embedded JSON (``codec.embedded``), for output through ``codec.dumps``.

    Choices cut by ``length`` / ``content_filter`` are never parsed (their text is truncated),
    nor, unless ``parse_unfinished``, choices without a finish reason; a choice whose text
    does not parse or validate gets ``parsed`` null and the error is reported.
    """
    if state.header is None:
        return None, None
    errors: list[dict[str, str]] = []
    choices = [
        _choice_dump(state, cs, parse_unfinished, embed, errors) for _, cs in sorted(state.choices.items())
    ]
    completion = {
        **state.header,
        "choices": choices,
        "system_fingerprint": state.system_fingerprint,
        "usage": state.usage,
    }
    if state.moderation is not None:
        completion["moderation"] = state.moderation
    result: dict[str, Any] = shape.normalize(completion, shape.COMPLETION)
    return result, errors[0] if errors else None


def _choice_dump(
    state: CompletionState,
    cs: ChoiceState,
    parse_unfinished: bool,
    embed: bool,
    errors: list[dict[str, str]],
) -> dict[str, Any]:
    if cs.finish_reason == "length":
        errors.append(
            {"type": "LengthFinishReasonError", "message": f"choice {cs.index} hit the length limit"}
        )
    elif cs.finish_reason == "content_filter":
        errors.append(
            {
                "type": "ContentFilterFinishReasonError",
                "message": f"choice {cs.index} was stopped by the content filter",
            }
        )
    parse = cs.finish_reason not in TRUNCATING_FINISH_REASONS and (
        parse_unfinished or cs.finish_reason is not None
    )
    message: dict[str, Any] = dict(text_leaves(cs.message_extra))
    message["role"] = cs.role
    for name in cs.text:
        message[name] = cs.text_of(name)
    content = cs.text_of("content") or ""
    message["parsed"] = _guarded(lambda: parse_content(state, cs, content), parse and bool(content), errors)
    if cs.tools:
        message["tool_calls"] = [_tool_dump(state, t, parse, errors) for _, t in sorted(cs.tools.items())]
    logprobs = None
    if cs.logprobs_seen:
        logprobs = {
            "content": None
            if cs.logprobs_content is None
            else logprobs_value(cs, cs.logprobs_content, embed=embed),
            "refusal": None
            if cs.logprobs_refusal is None
            else logprobs_value(cs, cs.logprobs_refusal, embed=embed),
        }
    return {
        **cs.choice_extra,
        "finish_reason": cs.finish_reason,
        "index": cs.index,
        "logprobs": logprobs,
        "message": message,
    }


def _tool_dump(
    state: CompletionState, tool: ToolCallState, parse: bool, errors: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        **tool.extra,
        "id": tool.id,
        "function": {
            **tool.function_extra,
            "arguments": tool.arguments_text(),
            "name": tool.name,
            "parsed_arguments": _guarded(lambda: parse_tool_arguments(state, tool), parse, errors),
        },
        "type": tool.type or "function",
        "index": tool.index,
    }


def _guarded(compute: Callable[[], Any], enabled: bool, errors: list[dict[str, str]]) -> Any:
    if not enabled:
        return None
    try:
        return compute()
    except StreamError as exc:
        errors.append({"type": exc.error_type, "message": exc.message})
        return None


def sdk_final(state: CompletionState) -> tuple[str, Any]:
    """What ``ChatCompletionStreamState.get_final_completion()`` gives: ``("completion", dump)``
    or ``("error", exception class name)``."""
    completion, error = build_completion(state, parse_unfinished=True)
    if completion is None:
        return "error", "AssertionError"
    if error is not None:
        return "error", error["type"]
    return "completion", completion


def parse_content(state: CompletionState, cs: ChoiceState, content: str) -> Any:
    """The validated structured output of a choice, or None where the SDK gives None."""
    if not state.spec.structured or not content or cs.text.get("refusal"):
        return None
    try:
        return _validated(state, content, state.spec.response_schema_json)
    except SchemaValidationError as exc:
        raise StreamError("ValidationError", f"choice {cs.index} content: {exc}") from None


def parse_tool_arguments(state: CompletionState, tool: ToolCallState) -> Any:
    """The validated arguments of a call to a strict tool, or None (any other tool)."""
    spec = state.spec.tools.get(tool.name or "")
    if spec is None or not spec.strict:
        return None
    try:
        return _validated(state, tool.arguments_text(), spec.schema_json)
    except SchemaValidationError as exc:
        raise StreamError(
            "ValidationError", f"tool call {tool.index} ({tool.name}) arguments: {exc}"
        ) from None


def _validated(state: CompletionState, text: str | None, schema_json: bytes | None) -> Any:
    """``parse_and_validate`` spending from the completion's validation budget, whose count is
    kept in its state: a restored completion goes on with exactly the budget it had left."""
    budget = Budget(VALIDATION_STEPS - state.counters.validation_steps)
    try:
        return parse_and_validate(text, schema_json, budget)
    finally:
        state.counters.validation_steps += budget.spent
