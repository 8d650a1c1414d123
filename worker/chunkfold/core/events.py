"""The semantic events of an accumulated chunk (openai-python's ``_build_events`` and
``ChoiceEventState.get_done_events``), and their numbering.

Called only by ``engine``, after every choice of the chunk has been accumulated. Building a
done event parses and validates the finished text (``completion.parse_content`` /
``parse_tool_arguments``), which may raise ``StreamError``: the engine then drops all of the
chunk's events, as the SDK does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chunkfold.core.accumulate import Step
from chunkfold.core.completion import parse_content, parse_tool_arguments
from chunkfold.core.logprobs import LogprobsDelta, logprobs_value
from chunkfold.core.state import REASONING_FIELDS, ChoiceState, CompletionState

if TYPE_CHECKING:
    from chunkfold.core.engine import FoldOptions


def number_events(state: CompletionState, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each event the completion's next ``seq`` (one sequence over all its events)."""
    for event in events:
        event["seq"] = state.event_seq
        state.event_seq += 1
    return events


def choice_events(
    state: CompletionState, step: Step, options: FoldOptions, events: list[dict[str, Any]], sdk_first: bool
) -> None:
    """openai-python's ``_build_events`` for one accumulated choice entry."""
    cs, delta, tool_indexes, touched, logprobs = step
    index = cs.index
    content_delta = delta.get("content")
    if content_delta is not None and cs.text.get("content") is not None:
        event: dict[str, Any] = {"type": "content.delta", "choice_index": index, "delta": content_delta}
        if options.snapshots:
            event["snapshot"] = cs.text_of("content")
        if options.partial_parse:
            event["parsed"] = cs.parsed_partial
        events.append(event)
    refusal_delta = delta.get("refusal")
    if refusal_delta is not None and cs.text.get("refusal") is not None and _refusal_shown(cs, options):
        event = {"type": "refusal.delta", "choice_index": index, "delta": refusal_delta}
        if options.snapshots:
            event["snapshot"] = cs.text_of("refusal")
        events.append(event)
    if not options.sdk:
        for name in REASONING_FIELDS:
            if delta.get(name):
                events.append(_event("reasoning.delta", index, field=name, delta=delta[name]))
    for tool, args_delta in touched:
        event = {
            "type": "tool_calls.function.arguments.delta",
            "choice_index": index,
            "name": tool.name,
            "index": tool.index,
        }
        if options.snapshots:
            event["arguments"] = tool.arguments_text()
        if options.partial_parse:
            event["parsed_arguments"] = tool.parsed_partial
        event["arguments_delta"] = args_delta
        events.append(event)
    if logprobs is not None:
        _logprobs_events(cs, logprobs, options, events)
    if cs.finish_reason or tool_indexes:
        _done_events(state, cs, tool_indexes, options, events)


def _refusal_shown(cs: ChoiceState, options: FoldOptions) -> bool:
    """Whether the choice's refusal gets events. An empty refusal next to content is no refusal:
    Snowflake Cortex sends ``refusal: ""`` in every delta of a plain answer, and openai-python
    fires ``refusal.delta`` / ``refusal.done`` for each (SDK mode does too). OpenAI opens a real
    refusal with ``refusal: ""`` and ``content: null``: that empty delta keeps its event."""
    return options.sdk or bool(cs.text.get("refusal")) or cs.text.get("content") is None


def _event(event_type: str, choice_index: int, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "choice_index": choice_index, **fields}


def _logprobs_events(
    cs: ChoiceState, logprobs: LogprobsDelta, options: FoldOptions, events: list[dict[str, Any]]
) -> None:
    for kind, delta, buf in (
        ("content", logprobs.content, cs.logprobs_content),
        ("refusal", logprobs.refusal, cs.logprobs_refusal),
    ):
        if delta and buf:
            event = _event(f"logprobs.{kind}.delta", cs.index, **{kind: delta})
            if options.snapshots:
                event["snapshot"] = logprobs_value(cs, buf, embed=not options.sdk)
            events.append(event)


def _done_events(
    state: CompletionState,
    cs: ChoiceState,
    tool_indexes: list[int],
    options: FoldOptions,
    events: list[dict[str, Any]],
) -> None:
    """openai-python's ``ChoiceEventState.get_done_events``: text is done at the choice's
    finish or when a tool call starts; a tool call is done when the next one starts or at finish."""
    if cs.finish_reason:
        _text_done_events(state, cs, options, events)
        if cs.current_tool is not None and not cs.tools[cs.current_tool].done:
            _tool_done_event(state, cs, cs.current_tool, options, events)
    for tool_index in tool_indexes:
        if cs.current_tool != tool_index:
            _text_done_events(state, cs, options, events)
            if cs.current_tool is not None:
                _tool_done_event(state, cs, cs.current_tool, options, events)
        cs.current_tool = tool_index


def _text_done_events(
    state: CompletionState, cs: ChoiceState, options: FoldOptions, events: list[dict[str, Any]]
) -> None:
    index = cs.index
    if not options.sdk and not cs.reasoning_done:
        for name in REASONING_FIELDS:
            if cs.text.get(name):
                cs.reasoning_done = True
                events.append(_event("reasoning.done", index, field=name, reasoning=cs.text_of(name)))
    content = cs.text_of("content")
    if content and not cs.content_done:
        cs.content_done = True
        parsed = parse_content(state, cs, content)
        if options.partial_parse:
            cs.parsed_partial = parsed
        events.append(_event("content.done", index, content=content, parsed=parsed))
    if cs.has_text("refusal") and not cs.refusal_done and _refusal_shown(cs, options):
        cs.refusal_done = True
        events.append(_event("refusal.done", index, refusal=cs.text_of("refusal")))
    embed = not options.sdk
    if cs.logprobs_seen and cs.logprobs_content is not None and not cs.logprobs_content_done:
        cs.logprobs_content_done = True
        content = logprobs_value(cs, cs.logprobs_content, embed=embed)
        events.append(_event("logprobs.content.done", index, content=content))
    if cs.logprobs_seen and cs.logprobs_refusal is not None and not cs.logprobs_refusal_done:
        cs.logprobs_refusal_done = True
        refusal = logprobs_value(cs, cs.logprobs_refusal, embed=embed)
        events.append(_event("logprobs.refusal.done", index, refusal=refusal))


def _tool_done_event(
    state: CompletionState,
    cs: ChoiceState,
    tool_index: int,
    options: FoldOptions,
    events: list[dict[str, Any]],
) -> None:
    tool = cs.tools[tool_index]
    if tool.done:
        return
    tool.done = True
    parsed = parse_tool_arguments(state, tool)
    if options.partial_parse:
        tool.parsed_partial = parsed
    events.append(
        _event(
            "tool_calls.function.arguments.done",
            cs.index,
            index=tool_index,
            name=tool.name,
            arguments=tool.arguments_text(),
            parsed_arguments=parsed,
        )
    )
