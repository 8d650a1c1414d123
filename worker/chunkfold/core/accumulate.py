"""A chunk's deltas folded into a completion's state (openai-python's ``_accumulate_chunk``).

Called only by ``engine``: ``fold_plain_chunk`` for the chunks most of a stream is made of;
for any other chunk, ``resolve_tool_indexes`` on every choice first (it rejects a chunk before
anything has changed), then ``accumulate_choice`` on each. Text and tool arguments are appended
to byte buffers, never re-joined per chunk. ``fold_plain_chunk`` is the per-chunk hot path, one
call deep from ``engine.fold``: its work stays inline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from chunkfold.core import codec
from chunkfold.core.completion import TRUNCATING_FINISH_REASONS, StreamError
from chunkfold.core.logprobs import LogprobsDelta, fold_logprobs
from chunkfold.core.records import CHUNK_OBJECT, InvalidRecord
from chunkfold.core.state import REASONING_FIELDS, TEXT_FIELDS, ChoiceState, CompletionState, ToolCallState

if TYPE_CHECKING:
    from chunkfold.core.engine import FoldOptions

_TEXT_KEYS = frozenset({*TEXT_FIELDS, *REASONING_FIELDS})
_SKIP_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
IDENTITY_FIELDS = frozenset({"channel", "recipient", "cot_id", "name", "id", "format"})
"""Provider fields, at any depth, that name what the text belongs to rather than add to it:
providers repeat them in every delta (Groq's gpt-oss sends ``channel: "analysis"`` with each
token, OpenRouter ``format`` in every ``reasoning_details`` entry). The last non-null value is
kept, never a concatenation (``role``, tool-call ``id`` and ``name`` have their own rule,
``_merge_identity``; ``index`` and ``type`` are replaced as openai-python does)."""
SDK_ACCUMULATED_FIELDS = frozenset({"audio", "function_call"})
"""Delta fields of the OpenAI API without a buffer here: accumulated exactly as openai-python
does, nested strings appended (``audio.data`` chunks may repeat: silence)."""
THINKING_FIELD = "reasoning"
"""Where the text of ``thinking`` content parts (Mistral Magistral) goes, with ``reasoning.*``
events: the field name vLLM and OpenRouter use for reasoning text."""
CONTENT_PARTS_FIELD = "content_parts"
"""Message field that keeps content parts of any type but ``text`` and ``thinking``, in order."""


def fold_plain_chunk(
    state: CompletionState, chunk: dict[str, Any], ts: int | None, events: list[dict[str, Any]]
) -> bool:
    """The fast path for the chunks that make up most of a stream: one choice, already seen,
    whose delta is only ``content`` or only the arguments of the tool call already open, without
    finish reason or logprobs, after the first chunk and before any error (the caller checks
    that no snapshots, partial parses or SDK events are asked for).

    It folds the chunk and numbers its one event exactly as the general path
    (``engine._fold_chunk``) would (this shape has no done events and no stream errors) and
    returns True; for any other chunk it returns False having changed nothing.
    """
    choices = chunk.get("choices")
    chunk_id = chunk.get("id")
    if (
        type(choices) is not list  # unchecked in error and non-chunk frames: no len() before this
        or len(choices) != 1
        or state.header is None
        or state.status is not None
        or chunk.get("error")
        or chunk.get("object") not in (None, CHUNK_OBJECT)
        or (chunk_id and chunk_id != state.completion_id)  # counted by the general path
    ):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if not delta or len(delta) != 1 or choice.get("finish_reason") or choice.get("logprobs") is not None:
        return False
    cs = state.choices.get(choice["index"])
    if cs is None or cs.finish_reason or cs.wire_tools:  # moved tool calls: the general path
        return False
    text = delta.get("content")
    if type(text) is str:
        buf = cs.text.get("content")
        if buf is None:
            cs.text["content"] = bytearray(text.encode("utf-8"))
        else:
            buf += text.encode("utf-8")
        event = {"type": "content.delta", "choice_index": cs.index, "delta": text}
    else:  # the arguments of the open tool call, and nothing else
        calls = delta.get("tool_calls")
        if not calls or len(calls) != 1 or len(calls[0]) != 2:
            return False
        tool = cs.tools.get(calls[0].get("index"))
        function = calls[0].get("function")
        if tool is None or tool.index != cs.current_tool or type(function) is not dict or len(function) != 1:
            return False
        text = function.get("arguments")
        if type(text) is not str:
            return False
        tool.arguments_seen = True
        if text:
            tool.arguments += text.encode("utf-8")
        event = {
            "type": "tool_calls.function.arguments.delta",
            "choice_index": cs.index,
            "name": tool.name,
            "index": tool.index,
            "arguments_delta": text,
        }
    count_chunk(state, ts)
    if text and state.first_token_ms is None:
        state.first_token_ms = ts
    event["seq"] = state.event_seq
    state.event_seq += 1
    events.append(event)
    chunk_tail(state, chunk)
    return True


def count_chunk(state: CompletionState, ts: int | None) -> None:
    """Count one chunk folded in, at record time ``ts`` (the stream's first and last chunk times)."""
    state.counters.chunks += 1
    if ts is not None:
        if state.first_chunk_ms is None:
            state.first_chunk_ms = ts
        state.last_chunk_ms = ts


def chunk_tail(state: CompletionState, chunk: dict[str, Any]) -> None:
    """The chunk-level fields that replace what earlier chunks said (last non-null wins)."""
    usage = chunk.get("usage")
    if usage is not None:
        state.usage = usage
    fingerprint = chunk.get("system_fingerprint")
    if fingerprint is not None:
        state.system_fingerprint = fingerprint
    moderation = chunk.get("moderation")
    if moderation is not None:
        state.moderation = moderation


def resolve_tool_indexes(state: CompletionState, choice: dict[str, Any]) -> list[int]:
    """The tool-call index of each tool-call delta of ``choice``.

    A delta with ``index`` continues the call at that index (or the call it was moved to),
    unless it brings a non-empty ``id`` different from that call's: then it starts a new call
    at the next free index, and later deltas at its ``index`` continue the new call (Claude
    behind OpenAI-compatible APIs sends several calls at index 0). A delta without ``index``
    continues the one open call, or starts a new call when it carries an ``id`` none of the
    calls has; anything else is ambiguous and rejected. Nothing is mutated here, so a rejected
    chunk leaves the state as it was (``accumulate_choice`` records the moves).
    """
    delta = choice.get("delta")
    calls = delta.get("tool_calls") if delta else None
    if not calls:
        return []
    existing = state.choices.get(choice["index"])
    ids: dict[int, str | None] = {i: t.id for i, t in existing.tools.items()} if existing else {}
    moved = dict(existing.wire_tools) if existing else {}
    open_calls = [i for i, t in existing.tools.items() if not t.done] if existing else []
    current = existing.current_tool if existing else None
    out: list[int] = []
    for call in calls:
        wire = call.get("index")
        call_id = call.get("id") or None
        if wire is not None:
            index = moved.get(wire, wire)
            known_id = ids.get(index)
            if call_id and known_id and _new_identity(known_id, call_id):
                index = moved[wire] = max(ids) + 1
        elif call_id:
            index = next((i for i, known in ids.items() if known == call_id), max([*ids, -1]) + 1)
        elif len(open_calls) == 1:
            index = open_calls[0]
        elif not open_calls and current is not None:
            index = current
        else:
            raise InvalidRecord(
                "ambiguous_tool_call",
                f"tool-call delta without index while {len(open_calls)} calls are open",
            )
        if index not in ids:
            ids[index] = None
            if current is not None and current in open_calls:
                open_calls.remove(current)
            open_calls.append(index)
            current = index
        if call_id:
            ids[index] = _merge_identity(ids[index], call_id)
        out.append(index)
    return out


class Step(NamedTuple):
    """One choice entry of a chunk, accumulated, waiting for its events to be built."""

    cs: ChoiceState
    delta: dict[str, Any]
    tool_indexes: list[int]
    touched: list[tuple[ToolCallState, str]]
    logprobs: LogprobsDelta | None


def accumulate_choice(
    state: CompletionState,
    choice: dict[str, Any],
    tool_indexes: list[int],
    options: FoldOptions,
    ts: int | None,
    sdk_first: bool,
) -> Step:
    """Fold one choice entry into the state (openai-python's ``_accumulate_chunk`` for it).
    ``sdk_first``: the SDK builds its snapshot from the stream's first chunk without its
    per-chunk partial parses and finish-reason check."""
    index: int = choice["index"]
    cs = state.choices.get(index)
    if cs is None:
        cs = state.choice(index)
        cs.choice_extra = {k: v for k, v in choice.items() if k not in _SKIP_CHOICE_KEYS}
    delta: dict[str, Any] = choice.get("delta") or {}
    if type(delta.get("content")) is list:
        delta = _split_content_parts(state, cs, delta)
    got_token = False
    text = cs.text
    for key, value in delta.items():
        if key in _TEXT_KEYS:
            buf = text.get(key)
            if value is None:
                if key not in text:
                    text[key] = None
            elif buf is None:
                text[key] = bytearray(value.encode("utf-8"))
                got_token = got_token or bool(value)
            else:
                buf += value.encode("utf-8")
                got_token = got_token or bool(value)
        elif key == "role":
            if value is not None and cs.role is None:
                cs.role = value
        elif key != "tool_calls":
            provider = not (options.sdk or key in SDK_ACCUMULATED_FIELDS)
            _accumulate_value(cs.message_extra, key, value, provider, grow=True)

    touched: list[tuple[ToolCallState, str]] = []
    if tool_indexes:
        for call, tool_index in zip(delta["tool_calls"], tool_indexes, strict=True):
            wire = call.get("index")
            if wire is not None and wire != tool_index:
                cs.wire_tools[wire] = tool_index
            touched.append(_accumulate_tool_call(cs, call, tool_index))
        got_token = got_token or any(args for _, args in touched)
    if got_token and state.first_token_ms is None:
        state.first_token_ms = ts

    wire_logprobs = choice.get("logprobs")
    logprobs = None if wire_logprobs is None else fold_logprobs(cs, wire_logprobs)
    finish_reason = choice.get("finish_reason")
    if finish_reason:
        cs.finish_reason = finish_reason
        if (
            state.status is None
            and not sdk_first
            and finish_reason in TRUNCATING_FINISH_REASONS
            and state.spec.parseable
        ):
            if finish_reason == "length":
                raise StreamError("LengthFinishReasonError", "finish_reason length with parseable input")
            raise StreamError(
                "ContentFilterFinishReasonError", "finish_reason content_filter with parseable input"
            )
    if options.partial_parse and not sdk_first and state.status is None:
        _partial_parse(state, cs, delta, touched, options)
    return Step(cs, delta, tool_indexes, touched, logprobs)


def _split_content_parts(state: CompletionState, cs: ChoiceState, delta: dict[str, Any]) -> dict[str, Any]:
    """The delta with ``content`` given as typed parts (Mistral) made plain: the text of ``text``
    parts is the content delta, the text of ``thinking`` parts is appended to the
    ``THINKING_FIELD`` delta; parts of other types are appended to the message's
    ``CONTENT_PARTS_FIELD`` as they are, and counted. A list with no text part is no content
    delta at all (no ``content.delta`` event). Parts were checked by ``records``."""
    text: list[str] = []
    thinking: list[str] = []
    other: list[Any] = []
    for part in delta["content"]:
        kind = part.get("type")
        if kind == "text":
            text.append(part["text"])
        elif kind == "thinking":
            inner = part["thinking"]
            if isinstance(inner, str):
                thinking.append(inner)
                continue
            for sub in inner:
                if sub.get("type") == "text":
                    thinking.append(sub["text"])
                else:
                    other.append(sub)
        else:
            other.append(part)
    plain = {k: v for k, v in delta.items() if k != "content"}
    if text:
        plain["content"] = "".join(text)
    if thinking:
        plain[THINKING_FIELD] = (plain.get(THINKING_FIELD) or "") + "".join(thinking)
    if other:
        state.counters.unknown_content_parts += len(other)
        parts = cs.message_extra.get(CONTENT_PARTS_FIELD)
        if isinstance(parts, list):
            parts.extend(other)  # in place: O(the chunk's parts), not O(all parts so far)
        else:
            cs.message_extra[CONTENT_PARTS_FIELD] = other
    return plain


def _accumulate_tool_call(
    cs: ChoiceState, call: dict[str, Any], tool_index: int
) -> tuple[ToolCallState, str]:
    tool = cs.tools.get(tool_index)
    if tool is None:
        tool = cs.tools[tool_index] = ToolCallState(tool_index)
    for key, value in call.items():
        if key == "function":
            if not value:
                continue
            for fkey, fvalue in value.items():
                if fkey == "arguments":
                    if isinstance(fvalue, str):
                        tool.arguments_seen = True
                        if fvalue:
                            tool.arguments += fvalue.encode("utf-8")
                elif fkey == "name":
                    if fvalue:
                        tool.name = _merge_identity(tool.name, fvalue)
                else:
                    _accumulate_value(tool.function_extra, fkey, fvalue)
        elif key == "id":
            if value:
                tool.id = _merge_identity(tool.id, value)
        elif key == "type":
            if value is not None:
                tool.type = value
        elif key != "index":
            _accumulate_value(tool.extra, key, value)
    function = call.get("function")
    return tool, (function.get("arguments") or "") if function else ""


def _new_identity(old: str, new: str) -> bool:
    """``new`` names another call than ``old``: neither a repeat nor a cumulative resend."""
    return not (new == old or new.startswith(old) or old.endswith(new))


def _merge_identity(old: str | None, new: str) -> str:
    """Ids, names and roles are identities: a repeated value is kept once, not concatenated."""
    if not old or new == old or new.startswith(old):
        return new
    if old.endswith(new):
        return old
    return old + new


def _partial_parse(
    state: CompletionState,
    cs: ChoiceState,
    delta: dict[str, Any],
    touched: list[tuple[ToolCallState, str]],
    options: FoldOptions,
) -> None:
    """openai-python's per-chunk partial parses (O(text so far)); opt-in outside SDK mode."""
    if state.spec.structured and (options.sdk or delta.get("content")):
        content = cs.text.get("content")
        refusal = cs.text.get("refusal")
        if content and not refusal and content.lstrip():
            try:
                cs.parsed_partial = codec.loads_partial(content)
            except ValueError as exc:
                if options.sdk:
                    raise StreamError("ValueError", str(exc)) from None
    for tool, _ in touched:
        spec = state.spec.tools.get(tool.name or "")
        if spec is not None and spec.strict and tool.arguments:
            try:
                tool.parsed_partial = codec.loads_partial(tool.arguments)
            except ValueError as exc:
                if options.sdk:
                    raise StreamError("ValueError", str(exc)) from None


def _accumulate_value(
    acc: dict[str, Any], key: str, value: Any, provider: bool = False, *, grow: bool = False
) -> None:
    """openai-python's ``accumulate_delta`` for one key of fields chunkfold has no buffer for
    (``function_call``, ``audio``, provider extras): strings and numbers add up, dicts merge,
    lists of indexed entries merge by ``index``, ``index``/``type`` are replaced.

    ``provider`` (a provider's own message field, outside SDK mode), at every depth: an
    ``IDENTITY_FIELDS`` member keeps its last non-null value, and a value equal to the whole
    value so far is a repeat, kept once (identity fields no one has listed yet; a repeated
    annotations object). So a text field that really streams is appended, except a second delta
    equal to the first: ``"ab"`` then ``"ab"`` stays ``"ab"``.

    ``grow`` (``message_extra``): a string appended to becomes a ``bytearray`` of its UTF-8 in
    place, appended to from then on (amortized O(the delta), where ``str`` concatenation copies
    the whole string each time: an audio stream's ``data`` runs to megabytes). Such a leaf stays
    a growing buffer for good: nothing here replaces it (a repeat of its whole text keeps it)."""
    if provider and value is not None:
        current = acc.get(key)
        if key in IDENTITY_FIELDS or _same_text(current, value):
            if type(current) is not bytearray:
                acc[key] = value
            return
    if acc.get(key) is None:
        if isinstance(value, list) and any(isinstance(v, dict) and "index" in v for v in value):
            acc[key] = []
        else:
            acc[key] = value
            return
    current = acc[key]
    if key in ("index", "type"):
        acc[key] = value
    elif type(current) is bytearray and isinstance(value, str):
        current += value.encode("utf-8")
    elif isinstance(current, str) and isinstance(value, str):
        acc[key] = bytearray(f"{current}{value}".encode()) if grow else current + value
    elif (
        isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool)
    ):
        acc[key] = current + value
    elif isinstance(current, dict) and isinstance(value, dict):
        merged = dict(current)
        for sub_key, sub_value in value.items():
            _accumulate_value(merged, sub_key, sub_value, provider, grow=grow)
        acc[key] = merged
    elif isinstance(current, list) and isinstance(value, list):
        indexed = [v for v in value if isinstance(v, dict) and isinstance(v.get("index"), int)]
        if not indexed:
            acc[key] = current + value
            return
        merged_list = list(current)
        for entry in indexed:
            position = next(
                (
                    i
                    for i, e in enumerate(merged_list)
                    if isinstance(e, dict) and e.get("index") == entry["index"]
                ),
                None,
            )
            if position is None:
                merged_list.append(entry)
            else:
                holder = {"v": merged_list[position]}
                _accumulate_value(holder, "v", entry, provider, grow=grow)
                merged_list[position] = holder["v"]
        acc[key] = merged_list


def _same_text(current: Any, value: Any) -> bool:
    """``value`` repeats the whole of ``current`` (a growing buffer compared as its text)."""
    if type(current) is bytearray:
        return type(value) is str and len(value) <= len(current) and current == value.encode("utf-8")
    return type(current) is type(value) and current == value
