"""The records the worker publishes, as plain JSON-ready values (one shape for worker and replay)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Any

_SDK_HIDDEN = ("choice_index", "seq")


def event_value(completion_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """A ``completion-events`` value: the SDK event's fields plus completion id, choice and seq."""
    value = {
        "type": event["type"],
        "completion_id": completion_id,
        "choice_index": event["choice_index"],
        "seq": event["seq"],
    }
    value.update(event)  # keys already in value keep their place: the event's others follow, in order
    return value


def sdk_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event as openai-python's ``event.model_dump(mode="json")`` has it."""
    return {k: v for k, v in event.items() if k not in _SDK_HIDDEN}


def deadletter_value(
    *,
    reason: str,
    detail: str,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | None,
    topic: str,
    partition: int | None,
    offset: int | None,
    timestamp_ms: int | None,
) -> dict[str, Any]:
    """A ``completion-deadletter`` value; the original bytes travel base64-encoded (and as text
    when they are UTF-8) so nothing of a bad record is lost, with the value's size and SHA-256
    (which still identify it when the size policy keeps only a prefix)."""
    return {
        "version": 1,
        "reason": reason,
        "detail": detail,
        "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": timestamp_ms},
        "key": _text(key),
        "key_b64": None if key is None else base64.b64encode(key).decode("ascii"),
        "value_b64": None if value is None else base64.b64encode(value).decode("ascii"),
        "value_text": _text(value),
        "headers": [
            {"key": k, "value_b64": base64.b64encode(v or b"").decode("ascii")} for k, v in headers or ()
        ],
        "value_bytes": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
    }


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
