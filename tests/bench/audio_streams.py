"""An audio answer as a gateway publishes it, for the engine section's check that strings of the
message outside the text buffers (``audio.data``, ``audio.transcript``) cost per chunk what the
chunk adds: 4 KB of base64 audio and a transcript word per chunk, as gpt-4o-audio streams."""

from __future__ import annotations

import base64
import random

import orjson

from chunkfold.core import engine, persist
from chunkfold.core.records import decode_record
from chunkfold.core.state import AnyState
from tests.demo.synthetic import KafkaRecord

AUDIO_BYTES_PER_CHUNK = 3072
"""Raw audio per chunk: 4,096 bytes of base64."""


def audio_records(n_chunks: int, seed: int = 0) -> list[KafkaRecord]:
    """``n_chunks`` chunk records (the first opens the audio, the last finishes) and ``[DONE]``."""
    rng = random.Random(seed * 1_000_003 + n_chunks)
    cid = f"chatcmpl-audio-{n_chunks}"
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1727346173,
        "model": "gpt-4o-audio-preview",
    }
    deltas: list[dict[str, object]] = [
        {
            "role": "assistant",
            "audio": {"id": "audio_1", "data": "", "expires_at": 1727349773, "transcript": ""},
        }
    ]
    for i in range(n_chunks - 2):
        data = base64.b64encode(rng.randbytes(AUDIO_BYTES_PER_CHUNK)).decode()
        deltas.append({"audio": {"data": data, "transcript": f"word{i} "}})
    values = [
        orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        for delta in deltas
    ]
    values.append(orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    values.append(b"[DONE]")
    return [KafkaRecord(cid.encode(), value, [], offset, offset) for offset, value in enumerate(values)]


def fold_records(records: list[KafkaRecord], flush_every: int = 0) -> tuple[AnyState | None, int]:
    """Decode and fold ``records`` (each as the worker does); with ``flush_every``, write the
    state behind every that many records as the worker's write-behind does: the bytes written."""
    state: AnyState | None = None
    cursor = persist.Cursor()
    written = 0
    for r in records:
        completion_id, record = decode_record(
            r.key, r.value, r.headers, offset=r.offset, timestamp_ms=r.timestamp_ms
        )
        state = engine.fold(state, completion_id, record).state
        if flush_every and state is not None and r.offset % flush_every == 0:
            written += sum(
                len(key) + len(value or b"") for key, value in persist.flush_writes(state, cursor, 0)
            )
    return state, written
