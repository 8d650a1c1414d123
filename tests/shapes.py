"""Generated streams that carry every field shape the engine accumulates.

``all_shapes_stream(seed, completion_id)`` gives one completion's records as a gateway
publishes them: ``(kind, value bytes, headers)`` with ``chunkfold.seq`` headers, an optional
request context first and ``[DONE]`` (rarely an abort) last. Its chunks cover, at random:
content, refusal, reasoning (``reasoning_content`` / ``reasoning``), several tool calls
(sequential or interleaved, strict with a request context or not, with extra fields on the call
and on its function), legacy ``function_call``, ``audio`` (id, data, transcript, expires_at),
annotations (appended and merged by index), logprobs (content and refusal), unknown fields on
the chunk, the choice and the delta (strings, numbers, objects), n > 1 choices (one or several
per chunk), usage (mid-stream and in a final usage chunk), moderation, every finish reason and
gateway retries (a record published twice with the same seq). And what providers send beyond
OpenAI: content as typed parts (text, thinking, unknown), identity fields repeated in every
delta (``channel``, indexed ``reasoning_details`` entries with ``format``), empty refusal
deltas, chunk ids other than the key, filter frames without choice data, a last frame of
another ``object`` and an error frame with usage followed by ``[DONE]``.

The same seed always gives the same bytes, so a broker-level test can publish exactly the
streams an engine-level test checked (``gateway_records``).
"""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any, NamedTuple

from chunkfold.core import codec
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.gateway import GatewayRecord

ShapeRecord = tuple[str, bytes, list[tuple[str, bytes]]]
"""``(kind, value, headers)``: kind is chunk | request | done | abort."""

Delta = dict[str, Any]


class Piece(NamedTuple):
    """One delta of one choice, with the logprobs and finish reason that go with it."""

    delta: Delta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


TEXT = ["Hé", "llo", " wörld", " 🌍", "", " ok", "\n", ' "q"', " \\ ", "日本"]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
    "required": ["city", "temperature"],
    "additionalProperties": False,
}
LOOKUP_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}
FINISH_REASONS = ["stop", "length", "tool_calls", "content_filter", "function_call", None]


def all_shapes_stream(seed: int | random.Random, completion_id: str) -> list[ShapeRecord]:
    """The records of one generated completion (see the module docstring)."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    n_choices = rng.choice([1, 1, 2, 3])
    request = _request(rng, n_choices) if rng.random() < 0.7 else None
    structured = request is not None and "response_format" in request
    pieces = {index: _choice_pieces(rng, index, structured, completion_id) for index in range(n_choices)}
    chunks = _chunks(rng, completion_id, pieces)
    out: list[tuple[str, bytes]] = []
    if request is not None:
        out.append(("request", codec.dumps(request)))
    out += [("chunk", codec.dumps(chunk)) for chunk in chunks]
    if rng.random() < 0.05:  # OpenRouter: an error frame with usage, then [DONE]
        error = {"id": completion_id, "error": {"code": 502, "message": "gone"}, "usage": _usage(rng)}
        out.append(("chunk", codec.dumps(error)))
    if rng.random() < 0.9:
        out.append(("done", b"[DONE]"))
    else:
        out.append(("abort", codec.dumps({"reason": "client_closed"})))
    return _with_seq_and_retries(rng, out)


def gateway_records(seed: int | random.Random, completion_id: str) -> list[GatewayRecord]:
    """``all_shapes_stream`` as ``GatewayRecord``s (keyed by the completion id), for publishing."""
    key = completion_id.encode("utf-8")
    return [
        GatewayRecord(key, value, headers) for _, value, headers in all_shapes_stream(seed, completion_id)
    ]


# -- the request context --------------------------------------------------------------------


def _request(rng: random.Random, n_choices: int) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "weather?"}],
        "n": n_choices,
    }
    if rng.random() < 0.5:
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "Weather", "schema": WEATHER_SCHEMA, "strict": True},
        }
    if rng.random() < 0.7:
        request["tools"] = [
            _tool("get_weather", WEATHER_SCHEMA, strict=True),
            _tool("lookup", LOOKUP_SCHEMA, strict=False),
        ]
    return request


def _tool(name: str, schema: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": schema, "strict": strict}}


# -- one choice's deltas --------------------------------------------------------------------


def _choice_pieces(rng: random.Random, index: int, structured: bool, completion_id: str) -> list[Piece]:
    """The deltas of one choice in order: a role delta, reasoning, then every other field's
    deltas merged at random (each field's own deltas keep their order), then a finish."""
    first: Delta = {"role": "assistant", "content": rng.choice(["", None]), "refusal": rng.choice([None, ""])}
    if rng.random() < 0.3:
        first["x_delta"] = "x"
    pieces: list[Piece] = [Piece(first)]
    if rng.random() < 0.4:
        name = rng.choice(["reasoning_content", "reasoning"])
        pieces += [Piece({name: text}) for text in _split(rng, _text(rng))]
    with_logprobs = rng.random() < 0.3
    fields: list[list[Piece]] = []
    if rng.random() < 0.8:
        content = _weather_json(rng) if structured else _text(rng)
        fields.append(
            [Piece({"content": t}, _logprobs(rng, "content", t, with_logprobs)) for t in _split(rng, content)]
        )
    if rng.random() < 0.2:
        fields.append(
            [
                Piece({"refusal": t}, _logprobs(rng, "refusal", t, with_logprobs))
                for t in _split(rng, _text(rng))
            ]
        )
    if rng.random() < 0.5:
        fields.append(_tool_call_pieces(rng, completion_id, index))
    if rng.random() < 0.3:
        fields.append(_function_call_pieces(rng))
    if rng.random() < 0.3:
        fields.append(_audio_pieces(rng, index))
    if rng.random() < 0.3:
        fields.append(_annotation_pieces(rng))
    if rng.random() < 0.4:
        fields.append(_extra_pieces(rng))
    if rng.random() < 0.15:
        fields.append(_content_part_pieces(rng))
    pieces += _merge(rng, fields)
    finish = rng.choice(FINISH_REASONS)
    if finish is not None:
        pieces.append(Piece({}, None, finish))
    return pieces


def _tool_call_pieces(rng: random.Random, completion_id: str, choice_index: int) -> list[Piece]:
    """Several tool calls; with ``interleaved`` their argument deltas alternate."""
    calls: list[list[Piece]] = []
    for tool_index in range(rng.randint(1, 3)):
        name = rng.choice(["get_weather", "lookup", "unlisted"])
        arguments = _weather_json(rng) if name == "get_weather" else codec.dumps({"q": _text(rng)}).decode()
        opening: dict[str, Any] = {
            "index": tool_index,
            "id": f"call_{choice_index}_{tool_index}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        if rng.random() < 0.3:
            opening["x_call"] = "c"
        call = [Piece({"tool_calls": [opening]})]
        for text in _split(rng, arguments):
            function: dict[str, Any] = {"arguments": text}
            if rng.random() < 0.2:
                function["x_fn"] = rng.choice(["f", 1, {"k": "v"}])
            entry: dict[str, Any] = {"index": tool_index, "function": function}
            if rng.random() < 0.1:
                entry["x_call"] = "d"
            call.append(Piece({"tool_calls": [entry]}))
        calls.append(call)
    interleaved = rng.random() < 0.4
    return _merge(rng, calls) if interleaved else [piece for call in calls for piece in call]


def _function_call_pieces(rng: random.Random) -> list[Piece]:
    arguments = codec.dumps({"q": _text(rng)}).decode()
    pieces: list[Piece] = [Piece({"function_call": {"name": "legacy_fn", "arguments": ""}})]
    pieces += [Piece({"function_call": {"arguments": text}}) for text in _split(rng, arguments)]
    return pieces


def _audio_pieces(rng: random.Random, choice_index: int) -> list[Piece]:
    opening = {"id": f"audio_{choice_index}", "data": "", "transcript": "", "expires_at": 1_700_000_000}
    pieces: list[Piece] = [Piece({"audio": opening})]
    data = [
        Piece({"audio": {"data": rng.choice(["UklG", "RiQA", "AABX", "QVZF"])}})
        for _ in range(rng.randint(1, 5))
    ]
    transcript = [Piece({"audio": {"transcript": text}}) for text in _split(rng, _text(rng))]
    pieces += _merge(rng, [data, transcript])
    if rng.random() < 0.3:
        pieces.append(Piece({"audio": {"expires_at": 60}}))  # numbers add up
    return pieces


def _annotation_pieces(rng: random.Random) -> list[Piece]:
    pieces: list[Piece] = []
    for n in range(rng.randint(1, 3)):
        citation = {"url": f"https://example.com/{n}", "title": "t", "start_index": n, "end_index": n + 2}
        entry: dict[str, Any] = {"type": "url_citation", "url_citation": citation}
        if rng.random() < 0.3:
            entry["index"] = n % 2  # indexed entries merge by index
        pieces.append(Piece({"annotations": [entry]}))
    return pieces


def _content_part_pieces(rng: random.Random) -> list[Piece]:
    """``delta.content`` as typed parts: thinking (nested text parts or a string), text, unknown."""
    options: list[Delta] = [
        {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": _text(rng)}]}]},
        {"content": [{"type": "thinking", "thinking": "th"}]},
        {"content": [{"type": "text", "text": _text(rng)}]},
        {"content": [{"type": "reference", "reference_ids": [1]}, {"type": "text", "text": "t"}]},
    ]
    return [Piece(rng.choice(options)) for _ in range(rng.randint(1, 4))]


def _extra_pieces(rng: random.Random) -> list[Piece]:
    """Unknown delta fields: strings concatenate, numbers add up, objects merge; identity
    fields and whole repeats are kept once."""
    options: list[Delta] = [
        {"x_delta": "ab"},
        {"x_count": 1},
        {"x_count": 2.5},
        {"x_count": 0.0},  # after 1: 1.0, equal to 1 but not the same bytes
        {"x_obj": {"k": "v", "n": 1}},
        {"channel": rng.choice(["analysis", "final"])},
        {"reasoning_details": [{"type": "reasoning.text", "text": "r", "index": 0, "format": "f"}]},
    ]
    return [Piece(rng.choice(options)) for _ in range(rng.randint(1, 4))]


def _logprobs(rng: random.Random, field: str, text: str, enabled: bool) -> dict[str, Any] | None:
    if not enabled:
        return None
    entry = {
        "token": text,
        "logprob": -round(rng.random(), 3),
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [{"token": text, "logprob": -0.5, "bytes": None}] if rng.random() < 0.5 else [],
    }
    other = "refusal" if field == "content" else "content"
    return {field: [entry] if text else [], other: None}


# -- chunks ---------------------------------------------------------------------------------


def _chunks(rng: random.Random, completion_id: str, pieces: dict[int, list[Piece]]) -> list[dict[str, Any]]:
    """The choices' deltas packed into chunks: each chunk takes the next delta of one or more
    choices; chunk-level fields (fingerprint, usage, moderation, unknown fields) vary."""
    cursors = dict.fromkeys(pieces, 0)
    created = 1_727_346_169
    fingerprint: str | None = "fp_a"
    chunks: list[dict[str, Any]] = []
    other_ids = rng.random() < 0.1  # a provider that changes the id on every chunk
    while any(cursors[i] < len(p) for i, p in pieces.items()):
        open_choices = [i for i, p in pieces.items() if cursors[i] < len(p)]
        taken = rng.sample(open_choices, rng.randint(1, len(open_choices)) if rng.random() < 0.3 else 1)
        choices = []
        for index in taken:
            choices.append(
                _choice_entry(rng, index, pieces[index][cursors[index]], first=cursors[index] == 0)
            )
            cursors[index] += 1
        if rng.random() < 0.1:
            fingerprint = rng.choice([None, "fp_b"])
        chunk: dict[str, Any] = {
            "id": f"{completion_id}~{len(chunks)}" if other_ids and chunks else completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": _usage(rng) if rng.random() < 0.05 else None,
        }
        if not chunks:
            chunk["service_tier"] = "default"
            chunk["x_chunk"] = {"a": 1}
        if rng.random() < 0.2:
            chunk["obfuscation"] = "pad" * rng.randint(0, 3)
        if rng.random() < 0.05:
            chunk["moderation"] = {"flagged": rng.random() < 0.5}
        chunks.append(chunk)
        if rng.random() < 0.03:  # Azure's content-filter frame: skipped
            chunks.append({"id": "", "object": "", "choices": [{"index": 0, "content_filter_results": {}}]})
    if rng.random() < 0.1:
        chunks[-1]["object"] = "chat.completion.done"  # Perplexity: folded like a chunk
    if rng.random() < 0.6:
        chunks.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": "gpt-4o-2024-08-06",
                "choices": [],
                "usage": _usage(rng),
            }
        )
    return chunks


def _choice_entry(rng: random.Random, index: int, piece: Piece, *, first: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": index,
        "delta": piece.delta,
        "logprobs": piece.logprobs,
        "finish_reason": piece.finish_reason,
    }
    if first and rng.random() < 0.3:
        entry["x_choice"] = {"note": "first"}  # kept from the choice's first appearance
    return entry


def _usage(rng: random.Random) -> dict[str, Any]:
    prompt, completion = rng.randint(1, 50), rng.randint(1, 500)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if rng.random() < 0.5:
        usage["completion_tokens_details"] = {"reasoning_tokens": rng.randint(0, 9), "audio_tokens": 0}
    return usage


def _with_seq_and_retries(rng: random.Random, records: list[tuple[str, bytes]]) -> list[ShapeRecord]:
    """Number the records (``chunkfold.seq``); about one in twenty is published twice."""
    out: list[ShapeRecord] = []
    for seq, (kind, value) in enumerate(records):
        headers = [(SEQ_HEADER, str(seq).encode())]
        if kind in ("request", "abort"):
            headers.insert(0, (KIND_HEADER, kind.encode()))
        out.append((kind, value, headers))
        if kind == "chunk" and rng.random() < 0.05:
            out.append((kind, value, list(headers)))
    return out


# -- text -----------------------------------------------------------------------------------


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(1, 8)))


def _weather_json(rng: random.Random) -> str:
    value = {"city": rng.choice(["Paris", "Zürich", "東京"]), "temperature": rng.choice([21, -3.5, 0])}
    return codec.dumps(value).decode()


def _split(rng: random.Random, text: str) -> list[str]:
    """``text`` cut at random character positions into 1..5 pieces."""
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4))))
        if len(text) > 1
        else []
    )
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def _merge(rng: random.Random, sequences: list[list[Piece]]) -> list[Piece]:
    """The pieces of ``sequences`` merged at random, each sequence keeping its order."""
    pending = [list(s) for s in sequences if s]
    out: list[Piece] = []
    while pending:
        i = rng.randrange(len(pending))
        out.append(pending[i].pop(0))
        if not pending[i]:
            del pending[i]
    return out
