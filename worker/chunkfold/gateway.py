"""Captures as an LLM gateway publishes them: keyed records with ``chunkfold.seq`` headers, an
optional request context first and ``[DONE]`` last. Pure; used by ``produce``, the demo and tests."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunkfold.core import codec
from chunkfold.core.inputs import InputError, frames_to_keys, iter_frames, read_text
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER, RecordKind

CAPTURE_SUFFIXES = (".sse", ".jsonl", ".ndjson")


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def capture_records(
    text: str,
    request: dict[str, Any] | None = None,
    *,
    key_suffix: str = "",
    with_seq: bool = True,
    unnamed_key: str = "",
) -> dict[str, list[GatewayRecord]]:
    """The records of each completion in ``text``, in order, keyed by completion id (plus
    ``key_suffix``, to publish one capture several times as distinct completions).
    ``unnamed_key``: the id of a completion no frame names (Snowflake Cortex sends ``id: ""``),
    as a gateway would key it by the id it gave the request (a record without key is dead-lettered)."""
    streams: dict[str, list[GatewayRecord]] = {}
    for key, frame in frames_to_keys(iter_frames(text)):
        completion_id = (key or unnamed_key) + key_suffix
        records = streams.get(completion_id)
        if records is None:
            records = streams[completion_id] = []
            if request is not None:
                records.append(
                    GatewayRecord(completion_id.encode(), codec.dumps(request), [(KIND_HEADER, b"request")])
                )
        payload = frame.payload
        if frame.kind is RecordKind.CHUNK and key_suffix and payload.get("id") == key:
            payload = {**payload, "id": completion_id}
        if frame.kind is RecordKind.DONE:
            value = b"[DONE]"
        else:
            value = b"" if payload is None else codec.dumps(payload)
        headers = (
            []
            if frame.kind in (RecordKind.CHUNK, RecordKind.DONE)
            else [(KIND_HEADER, frame.kind.value.encode())]
        )
        records.append(GatewayRecord(completion_id.encode(), value, headers))
    if with_seq:
        for completion_id, records in streams.items():
            streams[completion_id] = [
                GatewayRecord(r.key, r.value, [*r.headers, (SEQ_HEADER, str(i).encode())])
                for i, r in enumerate(records)
            ]
    return streams


def load_captures(paths: Iterable[Path]) -> list[tuple[Path, str, dict[str, Any] | None]]:
    """``(path, text, request)`` for each capture file, expanding directories; a capture's
    request context is ``<name>.request.json`` beside it when present (its ``request_body``
    when it is a fixture file)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in CAPTURE_SUFFIXES)
        else:
            files.append(path)
    out = []
    for file in files:
        try:
            text = read_text(file.read_bytes(), str(file))
        except OSError as exc:
            raise InputError(f"{file}: {exc.strerror or exc}") from None
        request_file = file.with_suffix(".request.json")
        request = None
        if request_file.exists():
            value = codec.loads(request_file.read_bytes())
            request = value.get("request_body", value) if isinstance(value, dict) else None
        out.append((file, text, request))
    return out


def interleave(
    streams: list[list[GatewayRecord]], seed: int = 0, concurrency: int = 0
) -> Iterator[GatewayRecord]:
    """Merge per-completion streams the way concurrent requests arrive: each stream keeps its
    order, streams are mixed at random, at most ``concurrency`` at a time (0: all at once)."""
    rng = random.Random(seed)
    pending = [s for s in streams if s]
    pending.reverse()
    window = concurrency or len(pending)
    live: list[tuple[list[GatewayRecord], int]] = []
    while pending or live:
        while pending and len(live) < window:
            live.append((pending.pop(), 0))
        i = rng.randrange(len(live))
        stream, cursor = live[i]
        yield stream[cursor]
        if cursor + 1 == len(stream):
            live.pop(i)
        else:
            live[i] = (stream, cursor + 1)
