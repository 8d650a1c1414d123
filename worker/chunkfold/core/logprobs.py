"""A choice's logprob buffers: its ``content`` and ``refusal`` entries, each normalized once
(as openai-python's ``model_dump`` has them) and kept as comma-joined JSON, so that appending a
chunk's entries is O(entries) and the done event and final completion read them back whole.

Written by ``accumulate`` (``fold_logprobs``), read by ``events`` and ``completion``
(``logprobs_value``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from chunkfold.core import codec, shape
from chunkfold.core.state import ChoiceState


class LogprobsDelta(NamedTuple):
    """A chunk's logprob entries, normalized (as openai-python's ``model_dump`` has them)."""

    content: list[Any] | None
    refusal: list[Any] | None


def fold_logprobs(cs: ChoiceState, logprobs: dict[str, Any]) -> LogprobsDelta:
    """Append the chunk's entries, normalized once, to the choice's buffers (which therefore
    hold exactly what the done event and the final completion carry)."""
    content, refusal = logprobs.get("content"), logprobs.get("refusal")
    step = LogprobsDelta(
        None if content is None else _tokens(content), None if refusal is None else _tokens(refusal)
    )
    if not cs.logprobs_seen:
        cs.logprobs_seen = True
        cs.logprobs_content = None if step.content is None else _entries(step.content)
        cs.logprobs_refusal = None if step.refusal is None else _entries(step.refusal)
    else:
        if step.content:
            cs.logprobs_content = _append_entries(cs.logprobs_content, step.content)
        if step.refusal:
            cs.logprobs_refusal = _append_entries(cs.logprobs_refusal, step.refusal)
    return step


def _entries(items: list[Any]) -> bytearray:
    return bytearray(b",".join(codec.dumps(item) for item in items))


def _append_entries(buf: bytearray | None, items: list[Any]) -> bytearray:
    if buf is None:
        return _entries(items)
    if buf:
        buf += b","
    buf += _entries(items)
    return buf


def logprobs_value(cs: ChoiceState, buf: bytearray, *, embed: bool) -> Any:
    """The entries in ``buf`` as an output value: with ``embed``, the buffer's JSON as it is
    (``codec.embedded``: no parse, no objects; O(bytes) at the end of a stream instead of a
    parse and a normalizing copy of every entry), else a list."""
    data = b"[" + buf + b"]"
    if cs.logprobs_wire:
        return _tokens(codec.loads(data))
    return codec.embedded(data) if embed else codec.loads(data)


def _tokens(items: list[Any]) -> list[Any]:
    return [shape.token_logprob(item) for item in items]
