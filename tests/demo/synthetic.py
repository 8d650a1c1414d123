"""Deterministic synthetic Chat Completions streams, shaped like what the OpenAI API sends
(used by the demo producers of ``make run`` and deploy/compose.yaml, the benchmarks and tests;
development only, never packaged).

Every stream has exactly ``n_chunks`` chunks (role chunks, text/argument chunks, finish chunks
and the final ``usage`` chunk), each pre-encoded to JSON bytes once, plus the request context
record and ``[DONE]`` that chunkfold consumes from Kafka.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from chunkfold.core.records import KIND_HEADER

MODEL = "gpt-4o-2024-08-06"
FINGERPRINT = "fp_5050236cbd"
CREATED = 1_727_346_173
CHUNK_INTERVAL_MS = 15
TOP_LOGPROBS = 5

_WORD_LIST = (
    "the of and to in is that it for was on are as with be at this have from or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however sure means "
    "knew try told young miles sun ways thing whole hear example heard several change answer room sea "
    "against top turned learn point city play toward five using himself usually latency throughput "
    "partition offset consumer producer broker stream chunk token schema parse function argument"
)
_WORDS = tuple(_WORD_LIST.split())
_RARE_WORDS = ("café", "naïve", "Zürich", "über", "façade", "—", "日本語", "😀", "résumé", "Ångström")
_WORD_WEIGHTS = tuple(1.0 / (rank + 8) for rank in range(len(_WORDS)))
_TOKEN_RE = re.compile(r" ?[A-Za-z\u00c0-\u024f]+| ?\d{1,3}| ?[^\w\s]{1,3}|\s+|[\s\S]")


def _strict_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_STRING: dict[str, Any] = {"type": "string"}
_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}

SOLUTION_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "Solution",
        "strict": True,
        "schema": {
            "$defs": {
                "Step": _strict_object(
                    {
                        "explanation": {"type": "string"},
                        "output": {"type": "string"},
                        "confidence": {"type": "number"},
                    }
                )
            },
            **_strict_object(
                {
                    "title": {"type": "string"},
                    "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}},
                    "final_answer": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                }
            ),
        },
    },
}
"""The ``response_format`` openai-python sends for the ``Solution`` model of the benchmarks."""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city.",
            "strict": True,
            "parameters": _strict_object(
                {
                    "city": _STRING,
                    "state": _STRING,
                    "units": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer"},
                    "notes": _STRINGS,
                }
            ),
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_documents",
            "description": "Full-text search over the knowledge base.",
            "strict": True,
            "parameters": _strict_object(
                {
                    "query": _STRING,
                    "filters": {
                        "type": "array",
                        "items": _strict_object({"field": _STRING, "value": _STRING}),
                    },
                    "limit": {"type": "integer"},
                }
            ),
        },
    },
    {
        "type": "function",
        "function": {
            "name": "create_ticket",
            "description": "Open a ticket in the issue tracker.",
            "strict": True,
            "parameters": _strict_object(
                {
                    "title": _STRING,
                    "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                    "labels": _STRINGS,
                    "description": _STRING,
                }
            ),
        },
    },
]


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    offset: int
    timestamp_ms: int


@dataclass(frozen=True)
class Stream:
    """One completion. Only bytes and a few numbers are kept (no chunk dicts), so that holding
    every stream adds nothing for the garbage collector to traverse during timed runs.

    ``text_bytes``: what the stream accumulates (see ``text_bytes()``); ``finish_record``: index
    in ``records`` of the first chunk with a ``finish_reason``; ``text_bytes_before_finish``: the
    accumulated bytes of the chunks before it."""

    kind: str
    n_chunks: int
    completion_id: str
    request: dict[str, Any]
    chunk_bytes: list[bytes]
    records: list[KafkaRecord]
    text_bytes: int
    finish_record: int
    text_bytes_before_finish: int


def text_bytes(chunks: Iterable[dict[str, Any]]) -> int:
    """UTF-8 bytes of content, refusal and tool arguments plus the JSON bytes of logprob entries."""
    total = 0
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            for name in ("content", "refusal"):
                if delta.get(name):
                    total += len(delta[name].encode("utf-8"))
            for call in delta.get("tool_calls") or ():
                total += len(((call.get("function") or {}).get("arguments") or "").encode("utf-8"))
            logprobs = choice.get("logprobs") or {}
            for name in ("content", "refusal"):
                total += sum(len(orjson.dumps(entry)) for entry in logprobs.get(name) or ())
    return total


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def ident(self, prefix: str, length: int) -> str:
        return prefix + "".join(self.rng.choices(string.ascii_letters + string.digits, k=length))

    def word(self) -> str:
        if self.rng.random() < 0.02:
            return self.rng.choice(_RARE_WORDS)
        return self.rng.choices(_WORDS, weights=_WORD_WEIGHTS)[0]

    def sentence(self, words: int) -> str:
        text = " ".join(self.word() for _ in range(words))
        return text[:1].upper() + text[1:] + "."

    def text_tokens(self, count: int) -> list[str]:
        tokens: list[str] = []
        start = True
        for _ in range(count):
            roll = self.rng.random()
            if not start and roll < 0.07:
                token = self.rng.choice((",", ".", ".", ":", ";"))
            elif not start and roll < 0.08:
                token, start = "\n\n", True
                tokens.append(token)
                continue
            elif self.rng.random() < 0.03:
                token = f" {self.rng.randint(0, 999)}"
            else:
                word = self.word()
                token = word.capitalize() if start else " " + word
            start = False
            tokens.append(token)
        return tokens

    def logprob(self, below: float = 0.0, rate: float = 3.0) -> float:
        return float(f"{below - self.rng.expovariate(rate):.10g}")

    def logprob_entry(self, token: str) -> dict[str, Any]:
        chosen = self.logprob()
        alternatives = [token] + [" " + self.word() for _ in range(TOP_LOGPROBS - 1)]
        values = sorted([chosen] + [self.logprob(chosen, 0.5) for _ in range(TOP_LOGPROBS - 1)])
        top = [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
            for t, lp in zip(alternatives, reversed(values), strict=True)
        ]
        return {"token": token, "logprob": chosen, "bytes": list(token.encode("utf-8")), "top_logprobs": top}


def _tokenize(text: str) -> list[str]:
    tokens = _TOKEN_RE.findall(text)
    assert "".join(tokens) == text
    return tokens


def _fit(make: Callable[[_Gen, int], Any], pieces: int, seed: int) -> list[str]:
    """``pieces`` token-like slices of the compact JSON of ``make(gen, size)``, for the smallest
    size that has at least that many tokens."""
    size = 1
    while True:
        text = orjson.dumps(make(_Gen(seed), size)).decode("utf-8")
        tokens = _tokenize(text)
        if len(tokens) >= pieces:
            break
        size += max(1, (pieces - len(tokens)) // 24)
    cuts = sorted(random.Random(seed + 1).sample(range(1, len(tokens)), pieces - 1))
    bounds = [0, *cuts, len(tokens)]
    return ["".join(tokens[a:b]) for a, b in itertools.pairwise(bounds)]


def _solution(gen: _Gen, size: int) -> dict[str, Any]:
    return {
        "title": gen.sentence(6),
        "steps": [
            {
                "explanation": gen.sentence(gen.rng.randint(6, 14)),
                "output": gen.sentence(gen.rng.randint(2, 5)),
                "confidence": round(gen.rng.random(), 3),
            }
            for _ in range(size)
        ],
        "final_answer": gen.sentence(10),
        "tags": [gen.word() for _ in range(4)],
    }


def _weather_args(gen: _Gen, size: int) -> dict[str, Any]:
    return {
        "city": "San Francisco",
        "state": "CA",
        "units": "c",
        "days": 7,
        "notes": [gen.sentence(gen.rng.randint(3, 9)) for _ in range(size)],
    }


def _search_args(gen: _Gen, size: int) -> dict[str, Any]:
    return {
        "query": gen.sentence(8),
        "filters": [{"field": gen.word(), "value": gen.sentence(gen.rng.randint(2, 6))} for _ in range(size)],
        "limit": 20,
    }


def _ticket_args(gen: _Gen, size: int) -> dict[str, Any]:
    return {
        "title": gen.sentence(7),
        "priority": "high",
        "labels": [gen.word() for _ in range(3)],
        "description": " ".join(gen.sentence(gen.rng.randint(5, 12)) for _ in range(size)),
    }


_TOOL_ARGS: tuple[Callable[[_Gen, int], Any], ...] = (_weather_args, _search_args, _ticket_args)


def _usage(completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": 312,
        "completion_tokens": completion_tokens,
        "total_tokens": 312 + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


class _Builder:
    def __init__(self, completion_id: str) -> None:
        self.completion_id = completion_id
        self.chunks: list[dict[str, Any]] = []

    def add(
        self, index: int, delta: dict[str, Any], *, logprobs: Any = None, finish: str | None = None
    ) -> None:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        self.chunks.append(self._chunk([choice], None))

    def usage(self, completion_tokens: int) -> None:
        self.chunks.append(self._chunk([], _usage(completion_tokens)))

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage,
        }


def _role_delta(content: str | None = "") -> dict[str, Any]:
    return {"role": "assistant", "content": content, "refusal": None}


def _request(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def _text(b: _Builder, gen: _Gen, n: int) -> dict[str, Any]:
    b.add(0, _role_delta())
    for token in gen.text_tokens(n - 3):
        b.add(0, {"content": token})
    b.add(0, {}, finish="stop")
    b.usage(n - 3)
    return _request("Write a long essay about stream processing.")


def _structured(b: _Builder, gen: _Gen, n: int) -> dict[str, Any]:
    b.add(0, _role_delta())
    for piece in _fit(_solution, n - 3, gen.rng.randrange(1 << 30)):
        b.add(0, {"content": piece})
    b.add(0, {}, finish="stop")
    b.usage(n - 3)
    return _request("Solve the problem step by step.", response_format=SOLUTION_FORMAT)


def _tools(b: _Builder, gen: _Gen, n: int) -> dict[str, Any]:
    pieces = n - 5
    shares = [pieces // 3 + (1 if i < pieces % 3 else 0) for i in range(3)]
    for index, (tool, make, share) in enumerate(zip(TOOLS, _TOOL_ARGS, shares, strict=True)):
        header = {
            "index": index,
            "id": gen.ident("call_", 24),
            "type": "function",
            "function": {"name": tool["function"]["name"], "arguments": ""},
        }
        b.add(0, {**_role_delta(None), "tool_calls": [header]} if index == 0 else {"tool_calls": [header]})
        for piece in _fit(make, share, gen.rng.randrange(1 << 30)):
            b.add(0, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    b.add(0, {}, finish="tool_calls")
    b.usage(pieces)
    return _request(
        "Check the weather, search the docs and open a ticket.", tools=TOOLS, parallel_tool_calls=True
    )


def _logprobs(b: _Builder, gen: _Gen, n: int) -> dict[str, Any]:
    b.add(0, _role_delta(), logprobs={"content": [], "refusal": None})
    for token in gen.text_tokens(n - 3):
        b.add(0, {"content": token}, logprobs={"content": [gen.logprob_entry(token)], "refusal": None})
    b.add(0, {}, finish="stop")
    b.usage(n - 3)
    return _request("Write a long essay about stream processing.", logprobs=True, top_logprobs=TOP_LOGPROBS)


def _interleaved(gen: _Gen, counts: list[int]) -> Iterator[int]:
    left = list(counts)
    while any(left):
        index = gen.rng.choices(range(len(left)), weights=left)[0]
        left[index] -= 1
        yield index


def _two_choices(b: _Builder, gen: _Gen, n: int) -> dict[str, Any]:
    pieces = n - 5
    counts = [pieces - pieces // 2, pieces // 2]
    texts = [iter(gen.text_tokens(count)) for count in counts]
    b.add(0, _role_delta())
    b.add(1, _role_delta())
    for index in _interleaved(gen, counts):
        b.add(index, {"content": next(texts[index])})
    b.add(0, {}, finish="stop")
    b.add(1, {}, finish="stop")
    b.usage(pieces)
    return _request("Write two alternative essays about stream processing.", n=2)


_KINDS: dict[str, Callable[[_Builder, _Gen, int], dict[str, Any]]] = {
    "text": _text,
    "structured": _structured,
    "tools": _tools,
    "logprobs": _logprobs,
    "n=2": _two_choices,
}
KINDS: tuple[str, ...] = tuple(_KINDS)


def make_stream(kind: str, n_chunks: int, seed: int = 0) -> Stream:
    """The ``kind`` stream of exactly ``n_chunks`` chunks; the same arguments give the same bytes."""
    gen = _Gen(seed * 1_000_003 + n_chunks * 31 + KINDS.index(kind))
    completion_id = gen.ident("chatcmpl-", 29)
    builder = _Builder(completion_id)
    request = _KINDS[kind](builder, gen, n_chunks)
    chunks = builder.chunks
    assert len(chunks) == n_chunks, (kind, n_chunks, len(chunks))
    finish = next(i for i, chunk in enumerate(chunks) if any(c["finish_reason"] for c in chunk["choices"]))
    chunk_bytes = [orjson.dumps(chunk) for chunk in chunks]
    key = completion_id.encode("utf-8")
    base_ms = CREATED * 1000
    records = [KafkaRecord(key, orjson.dumps(request), [(KIND_HEADER, b"request")], 0, base_ms)]
    records += [
        KafkaRecord(key, value, [], i + 1, base_ms + (i + 1) * CHUNK_INTERVAL_MS)
        for i, value in enumerate(chunk_bytes)
    ]
    records.append(
        KafkaRecord(key, b"[DONE]", [], n_chunks + 1, base_ms + (n_chunks + 1) * CHUNK_INTERVAL_MS)
    )
    return Stream(
        kind=kind,
        n_chunks=n_chunks,
        completion_id=completion_id,
        request=request,
        chunk_bytes=chunk_bytes,
        records=records,
        text_bytes=text_bytes(chunks),
        finish_record=finish + 1,
        text_bytes_before_finish=text_bytes(chunks[:finish]),
    )


def capture(stream: Stream) -> str:
    """The stream as a JSON Lines capture ending in ``[DONE]``."""
    return "".join(chunk.decode("utf-8") + "\n" for chunk in stream.chunk_bytes) + "[DONE]\n"
