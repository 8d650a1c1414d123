"""Generated chunk streams replay to exactly what openai-python's ``ChatCompletionStreamState`` gives.

The oracle builds each chunk the way the SDK's ``Stream`` does and feeds it to a
``ChatCompletionStreamState`` that holds the pydantic classes the request was made from;
``replay_sdk`` gets the same capture and the create-params as JSON. Streams on which the SDK
crashes (an exception that is none of its documented errors) are rejected, not compared.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import openai
import orjson
import pydantic
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai.lib._parsing import type_to_response_format_param
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk, ChatCompletionFunctionToolParam

from chunkfold.replay import replay_sdk
from tests.recorded import Recording, recordings

pytestmark = pytest.mark.conformance

T = TypeVar("T")
Json = dict[str, Any]

MODEL = "gpt-4o-2024-08-06"
CHUNK_OBJECT = "chat.completion.chunk"
SDK_ERRORS: tuple[type[Exception], ...] = (
    openai.LengthFinishReasonError,
    openai.ContentFilterFinishReasonError,
    openai.APIError,
    pydantic.ValidationError,
    json.JSONDecodeError,
)


class Location(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    city: str
    temperature: float
    units: Literal["c", "f"]


class GetWeather(pydantic.BaseModel):
    """The current weather in a city."""

    model_config = pydantic.ConfigDict(extra="forbid")

    city: str
    units: Literal["c", "f"]


class GetStockPrice(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    ticker: str
    exchange: str


# ---------------------------------------------------------------------------------------------
# values and JSON documents

CHARS = st.characters(codec="utf-8")
TEXT = st.text(CHARS, max_size=12)
PROSE = st.text(CHARS, max_size=30)
TOKEN = st.sampled_from([" the", '{"', "é", "Hello", "🙂", "\n", ""])
NUMBER = st.one_of(st.integers(-100, 150), st.floats(-100, 150, allow_nan=False, allow_infinity=False))
NOT_A_STRING = st.one_of(
    st.integers(-5, 5), st.floats(-5, 5), st.none(), st.lists(st.integers(0, 3), max_size=2)
)
NOT_A_NUMBER: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["hot", "", "n/a"]), st.none(), st.just([1]), st.just({})
)
NOT_A_UNIT = st.one_of(st.sampled_from(["C", "k", "", "celsius"]), st.integers(0, 3), st.none())
NOT_AN_OBJECT: st.SearchStrategy[Any] = st.one_of(
    st.just([]), TEXT, st.integers(-3, 3), st.none(), st.just(True)
)


def _pick(options: Sequence[tuple[T, int]]) -> st.SearchStrategy[T]:
    """One of ``options`` with the given weights; shrinks towards the first option."""
    table = [value for value, weight in options for _ in range(weight)]
    return st.integers(0, len(table) - 1).map(table.__getitem__)


def _sometimes(draw: st.DrawFn, one_in: int) -> bool:
    """True once in ``one_in`` draws; shrinks to False."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


def _schema_invalid(
    valid: st.SearchStrategy[Json], wrong: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """Valid JSON that both pydantic (lax, ``extra="forbid"``) and the strict JSON schema reject."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        value = dict(draw(valid))
        how = draw(st.sampled_from(["missing", "extra", "wrong_type", "not_an_object"]))
        if how == "missing":
            del value[draw(st.sampled_from(sorted(value)))]
        elif how == "extra":
            value["note"] = draw(TEXT)
        elif how == "wrong_type":
            key = draw(st.sampled_from(sorted(wrong)))
            value[key] = draw(wrong[key])
        else:
            return draw(NOT_AN_OBJECT)
        return value

    return build()


@st.composite
def _dumped(draw: st.DrawFn, value: Any) -> str:
    style = draw(st.sampled_from(["compact", "spaced", "indented"]))
    ensure_ascii = draw(st.booleans())
    separators = (",", ":") if style == "compact" else None
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, separators=separators, indent=2 if style == "indented" else None
    )
    return draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", "\n"]))


@st.composite
def _malformed(draw: st.DrawFn, text: str) -> str:
    how = draw(st.sampled_from(["truncated", "prefix", "suffix"]))
    if how == "truncated" and len(text) > 1:
        return text[: draw(st.integers(1, len(text) - 1))]
    if how == "prefix":
        return draw(st.sampled_from(["Sure! ", "```json\n", "'", "\n\nx"])) + text
    return text + draw(st.sampled_from(["}", "\n```", " x", ",{}", "]"]))


def _document(
    valid: st.SearchStrategy[Json], wrong: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[str]:
    """JSON text a model might send: mostly valid; with ``wrong``, also schema-invalid or malformed."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        mode = draw(_pick([("valid", 6), ("schema_invalid", 2), ("malformed", 2)])) if wrong else "valid"
        if mode == "schema_invalid":
            assert wrong is not None
            return draw(_dumped(draw(_schema_invalid(valid, wrong))))
        text = draw(_dumped(draw(valid)))
        return draw(_malformed(text)) if mode == "malformed" else text

    return build()


UNITS = st.sampled_from(["c", "f"])
LOCATION = st.fixed_dictionaries({"city": TEXT, "temperature": NUMBER, "units": UNITS})
LOCATION_DOCUMENT = _document(
    LOCATION, {"city": NOT_A_STRING, "temperature": NOT_A_NUMBER, "units": NOT_A_UNIT}
)


# ---------------------------------------------------------------------------------------------
# tools


@dataclass(frozen=True)
class ToolDef:
    """A function tool: what the SDK is given (a pydantic tool or a plain dict) and what
    argument texts a model might send for it."""

    name: str
    sdk: ChatCompletionFunctionToolParam | None
    arguments: st.SearchStrategy[str]
    strict_dict: bool = False

    def __repr__(self) -> str:
        return f"ToolDef({self.name!r})"


LOOKUP_PARAM: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"],
            "additionalProperties": False,
        },
    },
}
NOTIFY_PARAM: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "notify",
        "description": "Send a message to the user.",
        "parameters": {"type": "object", "properties": {"message": {"type": "string"}}},
    },
}
WEATHER_TOOL = ToolDef(
    "GetWeather",
    openai.pydantic_function_tool(GetWeather),
    _document(
        st.fixed_dictionaries({"city": TEXT, "units": UNITS}), {"city": NOT_A_STRING, "units": NOT_A_UNIT}
    ),
)
STOCK_TOOL = ToolDef(
    "get_stock_price",
    openai.pydantic_function_tool(GetStockPrice, name="get_stock_price"),
    _document(
        st.fixed_dictionaries({"ticker": TEXT, "exchange": TEXT}),
        {"ticker": NOT_A_STRING, "exchange": NOT_A_STRING},
    ),
)
# The SDK only json.loads a strict dict tool's arguments (raising JSONDecodeError on bad JSON);
# chunkfold cannot tell it from a pydantic tool and validates, so its arguments are schema-valid
# and complete whenever the SDK parses them (no call interleaved with it).
LOOKUP_TOOL = ToolDef(
    "lookup",
    LOOKUP_PARAM,
    _document(st.fixed_dictionaries({"query": TEXT, "limit": st.integers(0, 100)})),
    strict_dict=True,
)
NOTIFY_TOOL = ToolDef(
    "notify",
    NOTIFY_PARAM,
    st.one_of(_document(st.fixed_dictionaries({"message": TEXT}), {"message": NOT_A_STRING}), PROSE),
)
UNKNOWN_TOOL = ToolDef("search_web", None, st.one_of(_document(st.fixed_dictionaries({"q": TEXT})), PROSE))
TOOLS = (WEATHER_TOOL, STOCK_TOOL, LOOKUP_TOOL, NOTIFY_TOOL)


# ---------------------------------------------------------------------------------------------
# requests and streams


@dataclass(frozen=True)
class Request:
    """What the client asked for (and ``reasoning_field``: the provider's reasoning delta key)."""

    response_format: type[pydantic.BaseModel] | None
    tools: tuple[ToolDef, ...]
    logprobs: bool
    n: int
    reasoning_field: str | None = None

    def create_params(self) -> Json:
        """The create-params as the gateway would record them (JSON only)."""
        params: Json = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What's the weather like in Paris?"}],
            "stream": True,
        }
        if self.n > 1:
            params["n"] = self.n
        if self.logprobs:
            params["logprobs"] = True
        if self.response_format is not None:
            params["response_format"] = type_to_response_format_param(self.response_format)
        if self.tools:
            params["tools"] = json.loads(json.dumps([tool.sdk for tool in self.tools]))
        return params


@dataclass(frozen=True)
class Capture:
    """One recorded completion: the request and the raw ``data:`` payloads, in order."""

    request: Request
    frames: tuple[str, ...]
    sse: bool = False
    done_marker: bool = True

    @property
    def text(self) -> str:
        lines = [*self.frames, "[DONE]"] if self.done_marker else list(self.frames)
        if self.sse:
            return "".join(f"data: {line}\n\n" for line in lines)
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        frames = "\n".join(f"    {frame}" for frame in self.frames)
        return f"Capture(request={self.request!r}, sse={self.sse}, done_marker={self.done_marker}, frames=\n{frames}\n)"


def _split(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut at random places (an empty text gives no pieces); shrinks to one piece."""
    if not text:
        return []
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _interleave(draw: st.DrawFn, sequences: Sequence[Sequence[T]]) -> list[T]:
    """An order-preserving merge in which sequence ``k`` starts only after sequence ``k - 1``
    has started (choices and tool calls appear in index order); shrinks to plain concatenation."""
    positions = [0] * len(sequences)
    out: list[T] = []
    while True:
        ready = [
            k
            for k, seq in enumerate(sequences)
            if positions[k] < len(seq) and (k == 0 or positions[k - 1] > 0 or not sequences[k - 1])
        ]
        if not ready:
            return out
        k = ready[draw(st.integers(0, len(ready) - 1))]
        out.append(sequences[k][positions[k]])
        positions[k] += 1


@st.composite
def _token_logprobs(draw: st.DrawFn, piece: str) -> list[Json]:
    def entry(token: str) -> Json:
        return {
            "token": token,
            "logprob": draw(st.floats(-20, 0, allow_nan=False)),
            "bytes": draw(st.one_of(st.just(list(token.encode("utf-8"))), st.none())),
        }

    first = entry(piece)
    first["top_logprobs"] = [entry(draw(TOKEN)) for _ in range(draw(st.integers(0, 2)))]
    rest = [{**entry(draw(TOKEN)), "top_logprobs": []} for _ in range(draw(_pick([(0, 4), (1, 1)])))]
    return [first, *rest]


def _logprobs(content: list[Json] | None, refusal: list[Json] | None) -> Json:
    return {"content": content, "refusal": refusal}


@st.composite
def _choice_entries(draw: st.DrawFn, request: Request, index: int) -> list[Json]:
    """The per-choice payloads (``{"index", "delta", "logprobs", "finish_reason"}``) of one choice.

    A choice's first delta carries no text and no finish reason, so whichever first deltas the
    stream's first chunk holds are not affected by the SDK skipping its accumulation checks there;
    its logprobs are null or empty (the SDK counts twice the logprobs of the first delta of a
    choice that appears after the first chunk)."""
    kind = draw(_pick([("content", 5), ("refusal", 1), ("tools", 5 if request.tools else 0)]))
    with_logprobs = request.logprobs and kind != "tools"
    reasoning = request.reasoning_field if kind != "refusal" else None

    def entry(delta: Json, logprobs: Json | None = None) -> Json:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    explicit_nulls = draw(st.booleans())
    first: Json = {"role": "assistant", "content": None}
    if explicit_nulls:
        first.update(refusal=None, function_call=None, tool_calls=None)
    first_logprobs: Json | None = None
    body: list[Json] = []
    if reasoning is not None:
        first[reasoning] = ""
        for piece in _split(draw, draw(st.text(CHARS, min_size=1, max_size=20))):
            body.append(entry({"content": None, reasoning: piece}))

    content = ""
    if kind == "content":
        content = draw(LOCATION_DOCUMENT if request.response_format else PROSE)
    elif kind == "tools" and _sometimes(draw, 7):
        content = draw(st.text(CHARS, min_size=1, max_size=20))
    if kind == "refusal":
        first["refusal"] = ""
        if with_logprobs and draw(st.booleans()):
            first_logprobs = _logprobs(None, [])
        for piece in _split(draw, draw(st.text(CHARS, min_size=1, max_size=20))):
            lp = _logprobs(None, draw(_token_logprobs(piece))) if with_logprobs else None
            body.append(entry({"refusal": piece}, lp))
    elif content or kind == "content":
        if reasoning is None:
            first["content"] = ""
        if with_logprobs and draw(st.booleans()):
            first_logprobs = _logprobs([], None)
        for piece in _split(draw, content):
            lp = _logprobs(draw(_token_logprobs(piece)), None) if with_logprobs else None
            delta: Json = {"content": piece} if reasoning is None else {"content": piece, reasoning: None}
            body.append(entry(delta, lp))

    natural = "stop"
    if kind == "tools":
        natural = draw(_pick([("tool_calls", 4), ("stop", 1)]))
        targets = _pick([*((tool, 4) for tool in request.tools), (UNKNOWN_TOOL, 1)])
        calls = draw(st.lists(targets, min_size=1, max_size=3))
        header_in_first = not body and draw(st.booleans())
        per_call: list[list[Json]] = []
        for k, tool in enumerate(calls):
            pieces = _split(draw, draw(tool.arguments))
            opening = (
                pieces.pop(0) if pieces and not (k == 0 and header_in_first) and draw(st.booleans()) else ""
            )
            header: Json = {
                "index": k,
                "id": f"call_{index}{k}_Qx7bZ",
                "type": "function",
                "function": {"name": tool.name, "arguments": opening},
            }
            more: Json = {"id": None, "function": {"name": None}} if explicit_nulls else {"function": {}}
            per_call.append(
                [
                    header,
                    *({**more, "index": k, "function": {**more["function"], "arguments": p}} for p in pieces),
                ]
            )
        if header_in_first:
            first["tool_calls"] = [per_call[0].pop(0)]
        interleaved = not any(tool.strict_dict for tool in calls) and _sometimes(draw, 6)
        deltas = _interleave(draw, per_call) if interleaved else [d for seq in per_call for d in seq]
        grouped: list[list[Json]] = []
        for call_delta in deltas:
            if grouped and _sometimes(draw, 6):
                grouped[-1].append(call_delta)
            else:
                grouped.append([call_delta])
        body.extend(entry({"tool_calls": group}) for group in grouped)

    for _ in range(draw(_pick([(0, 8), (1, 1)]))):
        body.insert(draw(st.integers(0, len(body))), entry({}))
    finish = draw(_pick([(natural, 12), ("length", 1), ("content_filter", 1)]))
    if finish != natural:
        body = body[: draw(st.integers(0, len(body)))]
    if body and _sometimes(draw, 4):
        body[-1]["finish_reason"] = finish
    else:
        body.append(entry({}) | {"finish_reason": finish})
    return [entry(first, first_logprobs), *body]


@st.composite
def requests(draw: st.DrawFn) -> Request:
    return Request(
        response_format=draw(_pick([(None, 1), (Location, 1)])),
        tools=tuple(draw(st.lists(st.sampled_from(TOOLS), unique_by=lambda tool: tool.name, max_size=3))),
        logprobs=_sometimes(draw, 3),
        n=draw(_pick([(1, 3), (2, 2), (3, 1)])),
        reasoning_field=draw(_pick([(None, 6), ("reasoning_content", 1), ("reasoning", 1)])),
    )


@st.composite
def _usage(draw: st.DrawFn) -> Json:
    prompt, completion = draw(st.integers(0, 500)), draw(st.integers(0, 500))
    usage: Json = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if draw(st.booleans()):
        usage["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
        usage["prompt_tokens_details"] = {"cached_tokens": draw(st.integers(0, 64))}
    return usage


AZURE_FILTER = {
    "hate": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


@st.composite
def captures(draw: st.DrawFn) -> Capture:
    request = draw(requests())
    entries = _interleave(draw, [draw(_choice_entries(request, i)) for i in range(request.n)])
    azure = _sometimes(draw, 5)
    if azure:
        entries = [e | {"content_filter_results": AZURE_FILTER} for e in entries]

    groups: list[list[Json]] = []
    for e in entries:
        if groups and e["index"] > groups[-1][-1]["index"] and _sometimes(draw, 4):
            groups[-1].append(e)
        else:
            groups.append([e])

    header: Json = {
        "id": "chatcmpl-ABfw2KKFuVXmEJgVwYfBvejMAdWtq",
        "object": CHUNK_OBJECT,
        "created": draw(st.integers(1_700_000_000, 1_800_000_000)),
        "model": MODEL,
    }
    if draw(st.booleans()):
        header["service_tier"] = draw(st.sampled_from(["default", "flex"]))
    fingerprint = draw(_pick([("fp_5050236cbd", 2), (None, 1), ("absent", 1)]))
    if fingerprint != "absent":
        header["system_fingerprint"] = fingerprint
    usage_mode = draw(_pick([("none", 2), ("usage_chunk", 2), ("last_chunk", 1)]))
    if usage_mode == "usage_chunk":
        header["usage"] = None
    obfuscate = _sometimes(draw, 4)

    def chunk(choices: list[Json]) -> Json:
        value = {**header, "choices": choices}
        if obfuscate:
            value["obfuscation"] = draw(st.sampled_from(["", "Zx", "k3Pq0"]))
        return value

    frames = [chunk(group) for group in groups]
    if _sometimes(draw, 7):
        frames.insert(0, chunk([]))
    if usage_mode == "usage_chunk":
        frames.append(chunk([]) | {"usage": draw(_usage())})
    elif usage_mode == "last_chunk":
        frames[-1]["usage"] = draw(_usage())
    if _sometimes(draw, 8):  # Perplexity: the last frame is a "chat.completion.done"
        frames[-1]["object"] = "chat.completion.done"
    for _ in range(draw(_pick([(0, 6), (1, 1), (2, 1)]))):
        frames.insert(
            draw(st.integers(1, len(frames))), _async_filter_frame(draw(st.integers(0, request.n - 1)))
        )
    if _sometimes(draw, 10):
        cut = draw(st.integers(1, len(frames)))
        message = draw(st.sampled_from(["", "The server had an error while processing your request."]))
        frames = [
            *frames[:cut],
            {"error": {"message": message, "type": "server_error", "param": None, "code": None}},
        ]

    ensure_ascii = draw(st.booleans())
    return Capture(
        request,
        tuple(json.dumps(f, ensure_ascii=ensure_ascii, separators=(",", ":")) for f in frames),
        sse=draw(st.booleans()),
        done_marker=draw(st.booleans()),
    )


def _async_filter_frame(choice_index: int) -> Json:
    """An Azure OpenAI asynchronous content-filter frame: not a chunk, skipped by the SDK."""
    return {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [
            {
                "index": choice_index,
                "finish_reason": None,
                "content_filter_results": AZURE_FILTER,
                "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 12},
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# the oracle


class SdkCrash(Exception):
    """The SDK raised something that is not one of its documented errors."""


def _documented(exc: Exception) -> bool:
    return isinstance(exc, SDK_ERRORS) or type(exc) is ValueError


def sdk_lines(capture: Capture) -> list[Json]:
    request = capture.request
    tools = [tool.sdk for tool in request.tools if tool.sdk is not None]
    return sdk_replay(capture.frames, request.response_format, tools)


def sdk_replay(
    frames: Sequence[str],
    response_format: type[pydantic.BaseModel] | None,
    tools: Sequence[ChatCompletionFunctionToolParam],
) -> list[Json]:
    """What ``replay_sdk`` must give for these ``data:`` payloads: the SDK's non-chunk events,
    then the completion or the name of the exception that ended the stream."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(
        input_tools=list(tools),
        response_format=response_format if response_format is not None else openai.omit,
    )
    lines: list[Json] = []
    with warnings.catch_warnings():
        # ContentDoneEvent[T] dumps its parsed model with a "serializer warnings" UserWarning.
        warnings.simplefilter("ignore")
        try:
            for frame in frames:
                data = json.loads(frame)
                if data.get("error"):
                    return [*lines, {"type": "error", "error": "APIError"}]
                if _filter_frame(data):
                    continue
                chunk = cast(ChatCompletionChunk, construct_type(type_=ChatCompletionChunk, value=data))
                lines.extend(
                    e.model_dump(mode="json") for e in state.handle_chunk(chunk) if e.type != "chunk"
                )
            completion = state.get_final_completion().model_dump(mode="json")
        except Exception as exc:
            if not _documented(exc):
                raise SdkCrash(type(exc).__name__) from exc
            return [*lines, {"type": "error", "error": type(exc).__name__}]
    return [*lines, {"type": "completion", "completion": completion}]


def _filter_frame(data: Json) -> bool:
    """A frame a client must drop before the SDK sees it (Azure's filter frames: the SDK would
    take its snapshot from a first one, ``id: ""``): another ``object`` than a chunk's, and no
    choice with a delta, finish reason or logprobs, and no usage. Perplexity's last frame
    (``object: "chat.completion.done"``) holds the finish reason: the SDK folds it."""
    if data.get("object") in (None, CHUNK_OBJECT) or data.get("usage") is not None:
        return False
    return not any(
        c.get("delta") or c.get("finish_reason") or c.get("logprobs") is not None
        for c in data.get("choices") or ()
    )


def assert_same(got: list[Json], expected: list[Json]) -> None:
    for index, (g, e) in enumerate(zip(got, expected, strict=False)):
        assert g == e, f"line {index}:\n chunkfold {json.dumps(g)}\n       sdk {json.dumps(e)}"
    assert len(got) == len(expected), f"chunkfold gave {len(got)} lines, the SDK {len(expected)}"


def check(capture: Capture) -> None:
    assert_same(list(replay_sdk(capture.text, capture.request.create_params())), sdk_lines(capture))


# ---------------------------------------------------------------------------------------------
# the tests


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(captures())
def test_replay_sdk_matches_openai_python(capture: Capture) -> None:
    try:
        expected = sdk_lines(capture)
    except SdkCrash as crash:
        event(f"SDK crashed: {crash}")
        reject()
    last = expected[-1]
    event(f"outcome: {last['error'] if last['type'] == 'error' else 'completion'}")
    got = list(replay_sdk(capture.text, capture.request.create_params()))
    assert_same(got, expected)


def _plain_recordings() -> list[Recording]:
    """The recordings whose request the SDK was given without pydantic classes."""
    return [r for r in recordings() if not json.loads(r.request_file.read_text()).get("pydantic_models")]


@pytest.mark.parametrize("rec", _plain_recordings(), ids=lambda r: r.name)
def test_the_oracle_reproduces_the_recorded_goldens(rec: Recording) -> None:
    frames = [
        line.removeprefix("data: ")
        for line in rec.sse.read_text().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    tools = cast(list[ChatCompletionFunctionToolParam], rec.request.get("tools") or [])
    assert sdk_replay(frames, None, tools) == rec.expected_sdk_lines()


def test_the_oracle_tells_an_sdk_crash_from_an_sdk_error() -> None:
    header = _tool_header(0, "GetWeather")
    continuation = {"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": "{}"}}
    frames = [
        _chunk(_choice({"role": "assistant", "content": None, "tool_calls": [header]})),
        _chunk(_choice({"tool_calls": [continuation]})),
    ]
    with pytest.raises(SdkCrash, match="AssertionError"):
        sdk_lines(_capture(frames, tools=(WEATHER_TOOL,)))


# ---------------------------------------------------------------------------------------------
# hand-written streams


def _chunk(*choices: Json, **fields: Any) -> Json:
    return {
        "id": "chatcmpl-edge",
        "object": CHUNK_OBJECT,
        "created": 1727346170,
        "model": MODEL,
        "system_fingerprint": "fp_5050236cbd",
        "choices": list(choices),
        **fields,
    }


def _choice(
    delta: Json, index: int = 0, finish_reason: str | None = None, logprobs: Json | None = None
) -> Json:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _tool_header(index: int, name: str, arguments: str = "") -> Json:
    return {
        "index": index,
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _arguments(index: int, arguments: str) -> Json:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def _capture(
    frames: Sequence[Json],
    response_format: type[pydantic.BaseModel] | None = None,
    tools: Sequence[ToolDef] = (),
    n: int = 1,
) -> Capture:
    request = Request(response_format, tuple(tools), logprobs=False, n=n)
    return Capture(request, tuple(json.dumps(frame) for frame in frames))


def _token(text: str, logprob: float) -> Json:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}


USAGE_CHUNK = _chunk(usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
EDGE_CASES: dict[str, Capture] = {
    "api_error_mid_stream": _capture(
        [
            _chunk(_choice({"role": "assistant", "content": ""})),
            _chunk(_choice({"content": "Hel"})),
            {"error": {"message": "The server had an error", "type": "server_error"}},
            _chunk(_choice({"content": "lo"})),
        ]
    ),
    "azure_async_filter_frames_are_skipped": _capture(
        [
            _chunk(_choice({"role": "assistant", "content": ""})),
            _async_filter_frame(0),
            _chunk(_choice({"content": "Hi"})),
            _async_filter_frame(0),
            _chunk(_choice({}, finish_reason="stop")),
        ]
    ),
    "empty_refusal_with_empty_logprobs": _capture(
        [
            _chunk(
                _choice(
                    {"role": "assistant", "content": None, "refusal": ""},
                    logprobs={"content": None, "refusal": []},
                )
            ),
            _chunk(_choice({}, finish_reason="stop")),
        ]
    ),
    "whitespace_only_structured_content": _capture(
        [
            _chunk(_choice({"role": "assistant", "content": ""})),
            _chunk(_choice({"content": " \n"})),
            _chunk(_choice({}, finish_reason="stop")),
        ],
        response_format=Location,
    ),
    "integer_for_a_float_field": _capture(
        [
            _chunk(_choice({"role": "assistant", "content": ""})),
            _chunk(_choice({"content": '{"city":"Paris","temperature":61,'})),
            _chunk(_choice({"content": '"units":"c"}'}, finish_reason="stop")),
        ],
        response_format=Location,
    ),
    "two_calls_in_one_delta_then_content_filter": _capture(
        [
            _chunk(
                _choice({"role": "assistant", "content": None, "tool_calls": [_tool_header(0, "GetWeather")]})
            ),
            _chunk(
                _choice(
                    {
                        "tool_calls": [
                            {"index": 0, "function": {"arguments": '{"city":"Oslo","units":"c"}'}},
                            _tool_header(1, "lookup", '{"query":"Oslo",'),
                        ]
                    }
                )
            ),
            _chunk(_choice(_arguments(1, '"limit":3}'), finish_reason="content_filter")),
        ],
        tools=(WEATHER_TOOL, LOOKUP_TOOL),
    ),
    "refusal_next_to_content_in_n2": _capture(
        [
            _chunk(
                _choice({"role": "assistant", "content": ""}, logprobs={"content": [], "refusal": None}),
            ),
            _chunk(
                _choice(
                    {"content": '{"city":"Rome",'},
                    logprobs={"content": [_token('{"city', -0.1)], "refusal": None},
                )
            ),
            _chunk(
                _choice(
                    {"role": "assistant", "content": None, "refusal": ""},
                    index=1,
                    logprobs={"content": None, "refusal": []},
                )
            ),
            _chunk(
                _choice(
                    {"refusal": "No."}, index=1, logprobs={"content": None, "refusal": [_token("No.", -0.5)]}
                )
            ),
            _chunk(
                _choice({"content": '"temperature":21.5,"units":"c"}'}, logprobs=None),
                _choice({}, index=1, finish_reason="stop"),
            ),
            _chunk(_choice({}, finish_reason="stop")),
            USAGE_CHUNK,
        ],
        response_format=Location,
        n=2,
    ),
}


@pytest.mark.parametrize("capture", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_case_matches_openai_python(capture: Capture) -> None:
    check(capture)


FIRST_CHUNK_CASES: dict[str, Capture] = {
    "partial_parse_of_content": _capture(
        [
            _chunk(_choice({"role": "assistant", "content": '{"city":"P'})),
            _chunk(_choice({"content": 'aris","temperature":61,"units":"c"}'})),
            _chunk(_choice({}, finish_reason="stop")),
        ],
        response_format=Location,
    ),
    "length_in_the_only_chunk": _capture(
        [_chunk(_choice({"role": "assistant", "content": '{"city":"P'}, finish_reason="length"))],
        response_format=Location,
    ),
    "partial_parse_of_tool_arguments": _capture(
        [
            _chunk(
                _choice(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [_tool_header(0, "GetWeather", '{"city":"Paris"')],
                    }
                )
            ),
            _chunk(_choice(_arguments(0, ',"units":"c"}'))),
            _chunk(_choice({}, finish_reason="tool_calls")),
        ],
        tools=(WEATHER_TOOL,),
    ),
}


@pytest.mark.parametrize("capture", list(FIRST_CHUNK_CASES.values()), ids=list(FIRST_CHUNK_CASES))
def test_first_chunk_of_the_stream(capture: Capture) -> None:
    check(capture)


@pytest.mark.parametrize(
    "first_frame",
    [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}],
        },
        {"error": {"message": "The server had an error", "type": "server_error"}},
    ],
    ids=["azure_prompt_filter_results", "api_error"],
)
def test_first_frame_without_an_id(first_frame: Json) -> None:
    check(
        _capture(
            [
                first_frame,
                _chunk(_choice({"role": "assistant", "content": ""})),
                _chunk(_choice({"content": "Hi"})),
                _chunk(_choice({}, finish_reason="stop")),
            ]
        )
    )


def test_tool_call_without_type_is_a_function_call() -> None:
    """Deliberate divergence: the SDK drops a tool call whose deltas never say ``"type"``
    (no events, ``type: null``, nothing parsed); providers that omit it still mean a function
    call, so chunkfold treats it as one."""
    header = {"index": 0, "id": "call_0", "function": {"name": "GetWeather", "arguments": ""}}
    capture = _capture(
        [
            _chunk(_choice({"role": "assistant", "content": None, "tool_calls": [header]})),
            _chunk(_choice(_arguments(0, '{"city":"Oslo","units":"c"}'))),
            _chunk(_choice({}, finish_reason="tool_calls")),
        ],
        tools=(WEATHER_TOOL,),
    )
    sdk = sdk_lines(capture)
    assert not any(line["type"].startswith("tool_calls") for line in sdk)
    got = list(replay_sdk(capture.text, capture.request.create_params()))
    assert [line["type"] for line in got if line["type"].startswith("tool_calls")] == [
        "tool_calls.function.arguments.delta",
        "tool_calls.function.arguments.delta",
        "tool_calls.function.arguments.done",
    ]
    call = got[-1]["completion"]["choices"][0]["message"]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["parsed_arguments"] == {"city": "Oslo", "units": "c"}


def test_tool_call_header_with_null_arguments() -> None:
    header = {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "notify", "arguments": None},
    }
    check(
        _capture(
            [
                _chunk(_choice({"role": "assistant", "content": None, "tool_calls": [header]})),
                _chunk(_choice({}, finish_reason="tool_calls")),
            ],
            tools=(NOTIFY_TOOL,),
        )
    )


def test_audio_fields_the_wire_never_sent() -> None:
    check(
        _capture(
            [
                _chunk(
                    _choice(
                        {
                            "role": "assistant",
                            "content": None,
                            "audio": {"id": "audio_0", "transcript": "Hel"},
                        }
                    )
                ),
                _chunk(_choice({"audio": {"data": "UklGR", "transcript": "lo"}})),
                _chunk(_choice({}, finish_reason="stop")),
            ]
        )
    )


def test_number_out_of_float_range_in_structured_output() -> None:
    """``1e400`` parses to ``inf`` in both (jiter); as JSON, which is what either prints or
    publishes, both are null."""
    capture = _capture(
        [
            _chunk(_choice({"role": "assistant", "content": ""})),
            _chunk(_choice({"content": '{"city":"Oslo","temperature":1e400,"units":"c"}'})),
            _chunk(_choice({}, finish_reason="stop")),
        ],
        response_format=Location,
    )
    got = orjson.loads(orjson.dumps(list(replay_sdk(capture.text, capture.request.create_params()))))
    assert_same(got, orjson.loads(orjson.dumps(sdk_lines(capture))))
