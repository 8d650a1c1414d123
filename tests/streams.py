"""Builders for chunk streams used across the test tiers."""

from __future__ import annotations

from typing import Any

import orjson

CID = "chatcmpl-test"


def chunk(
    *choices: dict[str, Any], usage: dict[str, Any] | None = None, cid: str = CID, **extra: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1727346169,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_test",
        "choices": list(choices),
        "usage": usage,
        **extra,
    }


def choice(
    index: int = 0, finish_reason: str | None = None, logprobs: Any = None, **delta: Any
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_delta(
    index: int | None, arguments: str = "", id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"function": {"arguments": arguments}}
    if index is not None:
        call["index"] = index
    if id is not None:
        call["id"] = id
        call["type"] = "function"
    if name is not None:
        call["function"]["name"] = name
    return call


def jsonl(*chunks: dict[str, Any] | str) -> str:
    return "".join((c if isinstance(c, str) else orjson.dumps(c).decode()) + "\n" for c in chunks)


def sse(*chunks: dict[str, Any] | str) -> str:
    return "".join(f"data: {c if isinstance(c, str) else orjson.dumps(c).decode()}\n\n" for c in chunks)


USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}

LOCATION_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
    "required": ["city", "temperature"],
    "additionalProperties": False,
}


def structured_request() -> dict[str, Any]:
    return {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "weather?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "Location", "schema": LOCATION_SCHEMA, "strict": True},
        },
    }


def tools_request(strict: bool = True) -> dict[str, Any]:
    return {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": LOCATION_SCHEMA, "strict": strict},
            }
        ],
    }
