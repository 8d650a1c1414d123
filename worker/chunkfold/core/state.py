"""Per-completion accumulation state: small, versioned, serializable.

Text that grows with the completion (content, refusal, reasoning, tool arguments, logprob
entries) is held in ``bytearray`` buffers of UTF-8 / JSON: appending is amortized O(1) and the
memory held is close to the text itself. Nothing here re-encodes the whole snapshot per chunk.
So is a string of ``message_extra`` (``audio.data``, ``function_call.arguments``, a provider's
streamed field) once a second delta appends to it: that leaf becomes a ``bytearray`` in place
(``text_leaves`` gives the plain value back), persisted as a buffer of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from chunkfold.core import codec
from chunkfold.core.validation import check_schema

STATE_VERSION = 6
"""2: the counters no longer hold ``replayed_skipped`` and ``records_after_end`` (a v1 state is
still read: those two are dropped). 3: logprob buffers hold normalized entries (a v1/v2 state is
still read: its buffers are marked ``logprobs_wire`` and normalized when they are output).
4: the counters end with ``seq_invalid`` and ``validation_steps`` (a v3 state is read with
both 0; a worker of an older release refuses a v4 state as unreadable instead of misreading
it). 5: the counters end with ``id_mismatches`` and ``unknown_content_parts``, an open state may
hold ``other_ids`` and a tombstone ``awaits_done`` (a v3/v4 state is read with the counters 0,
no ids and no awaited ``[DONE]``). 6: an open state and a tombstone may hold ``events_from``, a
tombstone its ``event_count`` (a v3-v5 state is read with neither: None)."""
EXTRA_TEXT_VERSION = 7
"""A state whose ``message_extra`` holds growing strings (``extra_text``: their paths and
buffers; the leaves themselves written as null). Only such a state is written as v7, so a
worker of an older release refuses it as unreadable instead of misreading it, and still reads
every other state."""

MAX_OTHER_IDS = 8
"""How many distinct chunk ids other than the completion's own a done record lists (the count
of such chunks, ``id_mismatches``, has no limit): bounded, so a provider that changes the id on
every chunk cannot make the state grow with the stream."""

TEXT_FIELDS = ("content", "refusal")
REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass(slots=True)
class ToolSpec:
    """What the request said about one function tool."""

    strict: bool
    schema_json: bytes | None


@dataclass(slots=True)
class RequestSpec:
    """The parts of the request context that change how chunks are folded (derived, not stored)."""

    response_schema_json: bytes | None = None
    structured: bool = False
    tools: dict[str, ToolSpec] = field(default_factory=dict)
    schema_problem: str | None = None
    """Why the first unusable schema (invalid, or beyond what is checked) is ignored: output it
    applies to is parsed without validation. Derived again on restore, so replays agree."""

    @property
    def parseable(self) -> bool:
        """openai-python's ``has_parseable_input``: structured output or any strict function tool."""
        return self.structured or any(tool.strict for tool in self.tools.values())

    @classmethod
    def from_request(cls, request: dict[str, Any] | None) -> RequestSpec:
        if not request:
            return cls()
        spec = cls()
        response_format = request.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            json_schema = response_format.get("json_schema") or {}
            schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
            spec.structured = True
            spec.response_schema_json = spec.checked(schema, "response_format")
        for tool in request.get("tools") or ():
            if not isinstance(tool, dict) or tool.get("type") != "function":
                continue
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                continue
            if function["name"] in spec.tools:
                continue
            strict = function.get("strict") is True
            params = function.get("parameters") if strict else None  # only strict calls are validated
            spec.tools[function["name"]] = ToolSpec(
                strict=strict, schema_json=spec.checked(params, f"tool {function['name']!r} parameters")
            )
        return spec

    def checked(self, schema: Any, what: str) -> bytes | None:
        """The schema as canonical JSON if it is one that can be used; else None, noting why."""
        if not isinstance(schema, dict):
            return None
        schema_json = codec.dumps(schema)
        problem = check_schema(schema_json)
        if problem is None:
            return schema_json
        if self.schema_problem is None:
            self.schema_problem = f"{what} schema ignored, output not validated against it: {problem}"
        return None


@dataclass(slots=True)
class ToolCallState:
    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: bytearray = field(default_factory=bytearray)
    extra: dict[str, Any] = field(default_factory=dict)
    function_extra: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    parsed_partial: Any = None
    arguments_seen: bool = False

    def arguments_text(self) -> str | None:
        """The arguments so far; None while the wire has sent no string for them (as the SDK)."""
        return self.arguments.decode("utf-8") if self.arguments_seen or self.arguments else None


@dataclass(slots=True)
class ChoiceState:
    index: int
    choice_extra: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    role: str | None = None
    # key present: the wire sent the field; value None: only ever null so far
    text: dict[str, bytearray | None] = field(default_factory=dict)
    message_extra: dict[str, Any] = field(default_factory=dict)
    tools: dict[int, ToolCallState] = field(default_factory=dict)
    # provider's tool-call index -> the call it now continues, only where they differ: a new id
    # at an index whose call has another id starts a new call at the next free index
    wire_tools: dict[int, int] = field(default_factory=dict)
    current_tool: int | None = None
    logprobs_seen: bool = False
    logprobs_content: bytearray | None = None
    logprobs_refusal: bytearray | None = None
    # the logprob buffers hold entries as the wire sent them (a state written before v3);
    # otherwise they hold them normalized, ready to be embedded in outputs as they are
    logprobs_wire: bool = False
    content_done: bool = False
    refusal_done: bool = False
    reasoning_done: bool = False
    logprobs_content_done: bool = False
    logprobs_refusal_done: bool = False
    parsed_partial: Any = None

    def text_of(self, name: str) -> str | None:
        buf = self.text.get(name)
        return None if buf is None else buf.decode("utf-8")

    def has_text(self, name: str) -> bool:
        """The field is non-null (possibly empty)."""
        return self.text.get(name) is not None


@dataclass(slots=True)
class Counters:
    chunks: int = 0
    duplicates_dropped: int = 0
    seq_gaps: int = 0
    missing_records: int = 0
    skipped_frames: int = 0
    seq_invalid: int = 0
    validation_steps: int = 0
    """Spent from ``validation.VALIDATION_STEPS``: kept with the state so a restored completion
    has exactly the budget it had left (not an anomaly, so not in the done record)."""
    id_mismatches: int = 0
    """Chunks whose ``id`` was neither empty nor the completion's (the record key)."""
    unknown_content_parts: int = 0
    """``delta.content`` parts of a type other than ``text`` and ``thinking`` (kept as they are)."""


@dataclass(slots=True)
class CompletionState:
    """One open completion. ``last_offset`` / ``next_seq`` identify records already folded in."""

    completion_id: str
    request: dict[str, Any] | None = None
    spec: RequestSpec = field(default_factory=RequestSpec)
    header: dict[str, Any] | None = None
    system_fingerprint: str | None = None
    usage: dict[str, Any] | None = None
    moderation: Any = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    status: str | None = None
    error: dict[str, Any] | None = None
    last_offset: int | None = None
    next_seq: int | None = None
    event_seq: int = 0
    counters: Counters = field(default_factory=Counters)
    request_ms: int | None = None
    first_chunk_ms: int | None = None
    last_chunk_ms: int | None = None
    first_token_ms: int | None = None
    last_activity_ms: int | None = None
    other_ids: list[str] = field(default_factory=list)
    """The first ``MAX_OTHER_IDS`` distinct chunk ids other than ``completion_id``."""
    events_from: int | None = None
    """A lower bound of the events-topic offset of the completion's first event (stamped by the
    worker when a record gives it its first events; None: unknown), so a reader that resumes
    its events can seek there instead of scanning the topic."""

    def choice(self, index: int) -> ChoiceState:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(index)
        return state


@dataclass(slots=True)
class ClosedCompletion:
    """What remains of a finished completion until its tombstone expires: enough to recognise
    redelivered records (skip them) and records that arrive after the end (report them)."""

    completion_id: str
    status: str
    last_offset: int | None
    next_seq: int | None
    closed_at_ms: int | None
    last_activity_ms: int | None
    awaits_done: bool = False
    """It ended on an error frame: one ``[DONE]`` may still follow (OpenRouter sends it), and is
    taken quietly instead of being reported as a record after the end."""
    events_from: int | None = None
    """The open state's ``events_from``, kept while the tombstone lives."""
    event_count: int | None = None
    """How many events the completion published (None: a tombstone written before v6)."""


AnyState = CompletionState | ClosedCompletion


class BufferCodec(Protocol):
    """How growing buffers are written: whole (``FULL``) or as appended parts (``persist``)."""

    def dump(self, buffer_id: str, buf: bytearray | None) -> Any: ...

    def load(self, buffer_id: str, value: Any) -> bytearray | None: ...


class _FullText:
    def dump(self, buffer_id: str, buf: bytearray | None) -> Any:
        return None if buf is None else buf.decode("utf-8")

    def load(self, buffer_id: str, value: Any) -> bytearray | None:
        return None if value is None else bytearray(value.encode("utf-8"))


FULL: BufferCodec = _FullText()


def state_to_dict(state: AnyState, buffers: BufferCodec = FULL, *, compact: bool = False) -> dict[str, Any]:
    """A JSON-ready, versioned form of ``state``; ``state_from_dict`` inverts it exactly.

    ``compact`` leaves out the request context and the partial parses (both recomputable or
    stored elsewhere), so the written-behind head stays small.
    """
    if isinstance(state, ClosedCompletion):
        return {
            "v": STATE_VERSION,
            "closed": True,
            "id": state.completion_id,
            "status": state.status,
            "last_offset": state.last_offset,
            "next_seq": state.next_seq,
            "closed_at_ms": state.closed_at_ms,
            "last_activity_ms": state.last_activity_ms,
            **({"awaits_done": True} if state.awaits_done else {}),
            **({"events_from": state.events_from} if state.events_from is not None else {}),
            **({"event_count": state.event_count} if state.event_count is not None else {}),
        }
    data = {
        "v": STATE_VERSION,
        "id": state.completion_id,
        "header": state.header,
        "fp": state.system_fingerprint,
        "usage": state.usage,
        "moderation": state.moderation,
        "choices": [_choice_to_dict(c, buffers, compact) for c in state.choices.values()],
        "status": state.status,
        "error": state.error,
        "pos": [state.last_offset, state.next_seq, state.event_seq],
        "counters": [getattr(state.counters, f) for f in Counters.__slots__],
        "times": [
            state.request_ms,
            state.first_chunk_ms,
            state.last_chunk_ms,
            state.first_token_ms,
            state.last_activity_ms,
        ],
    }
    if any("extra_text" in choice for choice in data["choices"]):
        data["v"] = EXTRA_TEXT_VERSION
    if state.other_ids:  # absent otherwise: the common state keeps its bytes
        data["other_ids"] = state.other_ids
    if state.events_from is not None:
        data["events_from"] = state.events_from
    if not compact:
        data["request"] = state.request
    return data


def _choice_to_dict(c: ChoiceState, buffers: BufferCodec, compact: bool) -> dict[str, Any]:
    i = c.index
    message_extra, leaves = split_text_leaves(c.message_extra)
    data = {
        "index": i,
        "extra": c.choice_extra,
        "finish_reason": c.finish_reason,
        "role": c.role,
        "text": {k: buffers.dump(f"{i}:t:{k}", v) for k, v in c.text.items()},
        "message_extra": message_extra,
        "tools": [
            [
                t.index,
                t.id,
                t.type,
                t.name,
                buffers.dump(f"{i}:a:{t.index}", t.arguments),
                t.extra,
                t.function_extra,
                t.done,
                None if compact else t.parsed_partial,
                t.arguments_seen,
            ]
            for t in c.tools.values()
        ],
        "current_tool": c.current_tool,
        "logprobs": [
            c.logprobs_seen,
            buffers.dump(f"{i}:lc", c.logprobs_content),
            buffers.dump(f"{i}:lr", c.logprobs_refusal),
            c.logprobs_wire,
        ],
        "flags": [
            c.content_done,
            c.refusal_done,
            c.reasoning_done,
            c.logprobs_content_done,
            c.logprobs_refusal_done,
        ],
        "parsed_partial": None if compact else c.parsed_partial,
    }
    if c.wire_tools:  # absent otherwise: states without remapped calls keep their bytes
        data["wire_tools"] = [[wire, index] for wire, index in c.wire_tools.items()]
    if leaves:  # absent otherwise, and the state v6
        data["extra_text"] = {path: buffers.dump(f"{i}:x:{path}", buf) for path, buf in leaves.items()}
    return data


def text_leaves(value: Any) -> Any:
    """``value`` (``message_extra`` or a part of it) with each growing string (a ``bytearray``
    leaf) as the ``str`` it holds. Copies only the containers on the way to such a leaf."""
    return _replace_leaves(value, (), lambda _path, buf: buf.decode("utf-8"))


def split_text_leaves(value: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytearray]]:
    """``value`` with null for each ``bytearray`` leaf, and those leaves by path (the JSON of
    the list of keys and list positions leading to them). ``value`` itself when it has none."""
    leaves: dict[str, bytearray] = {}

    def strip(path: tuple[str | int, ...], buf: bytearray) -> None:
        leaves[codec.dumps(path).decode("utf-8")] = buf

    stripped = _replace_leaves(value, (), strip)
    return stripped, leaves


def _replace_leaves(
    value: Any, path: tuple[str | int, ...], replace: Callable[[tuple[str | int, ...], bytearray], Any]
) -> Any:
    """``value`` with each ``bytearray`` leaf replaced by ``replace(its path, it)``, copying
    only the dicts and lists on the way to one."""
    if type(value) is bytearray:
        return replace(path, value)
    members: Any = value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    copy: Any = None
    for key, member in members:
        replaced = _replace_leaves(member, (*path, key), replace)
        if replaced is not member:
            copy = copy if copy is not None else (dict(value) if type(value) is dict else list(value))
            copy[key] = replaced
    return value if copy is None else copy


def _join_text_leaves(value: dict[str, Any], leaves: dict[str, bytearray | None]) -> None:
    """Put each buffer of ``leaves`` back at its path in ``value`` (which holds null there)."""
    for path_json, buf in leaves.items():
        *parents, last = codec.loads(path_json)
        node: Any = value
        for key in parents:
            node = node[key]
        node[last] = buf


class StateVersionError(ValueError):
    """A stored state written by an unknown (newer) release."""


def state_from_dict(
    data: dict[str, Any], buffers: BufferCodec = FULL, request: dict[str, Any] | None = None
) -> AnyState:
    """Inverse of ``state_to_dict``; ``request`` supplies the context a compact head left out."""
    version = data.get("v")
    if version == 1 and "counters" in data:
        chunks, duplicates, _replayed, gaps, missing, frames, _after_end = data["counters"]
        data = {**data, "v": 2, "counters": [chunks, duplicates, gaps, missing, frames]}
    elif version == 1 and data.get("closed"):
        data = {**data, "v": 2}
    if data.get("v") == 2:
        data = {**data, "v": STATE_VERSION}
        if "choices" in data:
            data["choices"] = [{**c, "logprobs": [*c["logprobs"], c["logprobs"][0]]} for c in data["choices"]]
    if data.get("v") in (3, 4, 5):  # fewer counters (read as 0), no events_from / event_count
        data = {**data, "v": STATE_VERSION}
    if data.get("v") not in (STATE_VERSION, EXTRA_TEXT_VERSION):
        raise StateVersionError(f"unsupported state version {version!r}")
    if data.get("closed"):
        return ClosedCompletion(
            data["id"],
            data["status"],
            data["last_offset"],
            data["next_seq"],
            data["closed_at_ms"],
            data["last_activity_ms"],
            data.get("awaits_done", False),
            data.get("events_from"),
            data.get("event_count"),
        )
    if "request" in data:
        request = data["request"]
    state = CompletionState(
        completion_id=data["id"],
        request=request,
        spec=RequestSpec.from_request(request),
        header=data["header"],
        system_fingerprint=data["fp"],
        usage=data["usage"],
        moderation=data["moderation"],
        status=data["status"],
        error=data["error"],
        counters=Counters(*data["counters"]),
        other_ids=data.get("other_ids", []),
        events_from=data.get("events_from"),
    )
    state.last_offset, state.next_seq, state.event_seq = data["pos"]
    (
        state.request_ms,
        state.first_chunk_ms,
        state.last_chunk_ms,
        state.first_token_ms,
        state.last_activity_ms,
    ) = data["times"]
    for raw in data["choices"]:
        i = raw["index"]
        choice = ChoiceState(
            index=i,
            choice_extra=raw["extra"],
            finish_reason=raw["finish_reason"],
            role=raw["role"],
            text={k: buffers.load(f"{i}:t:{k}", v) for k, v in raw["text"].items()},
            message_extra=raw["message_extra"],
            current_tool=raw["current_tool"],
            parsed_partial=raw["parsed_partial"],
            wire_tools={wire: index for wire, index in raw.get("wire_tools", ())},
        )
        extra_text = raw.get("extra_text")
        if extra_text:
            leaves = {path: buffers.load(f"{i}:x:{path}", v) for path, v in extra_text.items()}
            _join_text_leaves(choice.message_extra, leaves)
        for index, id_, type_, name, args, extra, fextra, done, partial, seen in raw["tools"]:
            arguments = buffers.load(f"{i}:a:{index}", args) or bytearray()
            choice.tools[index] = ToolCallState(
                index, id_, type_, name, arguments, extra, fextra, done, partial, seen
            )
        choice.logprobs_seen, lp_content, lp_refusal, choice.logprobs_wire = raw["logprobs"]
        choice.logprobs_content = buffers.load(f"{i}:lc", lp_content)
        choice.logprobs_refusal = buffers.load(f"{i}:lr", lp_refusal)
        (
            choice.content_done,
            choice.refusal_done,
            choice.reasoning_done,
            choice.logprobs_content_done,
            choice.logprobs_refusal_done,
        ) = raw["flags"]
        state.choices[i] = choice
    return state


def encode_state(state: AnyState) -> bytes:
    return codec.dumps(state_to_dict(state))


def decode_state(data: bytes) -> AnyState:
    return state_from_dict(codec.loads(data))
